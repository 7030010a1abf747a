"""bms.image.v1 is stable: `buf breaking` (FILE rules, see buf.yaml) compares
the protos with the released v1 committed as api/bms-image-v1.binpb, in the
suite as in `make lint`. The tests below also prove the check bites, on a
copy of the protos with one breaking change each, and that it lets
compatible additions through."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from support.processes import buf_binary

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "api" / "bms-image-v1.binpb"
V1 = Path("bms/image/v1")


def buf_breaking(workspace: Path) -> subprocess.CompletedProcess[str]:
    """`buf breaking protos --against api/bms-image-v1.binpb`, run in `workspace`."""
    return subprocess.run(
        [buf_binary(), "breaking", "protos", "--against", str(BASELINE)],
        cwd=workspace,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_protos_do_not_break_the_released_v1() -> None:
    result = buf_breaking(ROOT)

    assert result.returncode == 0, (
        "the protos break bms.image.v1 as released (api/bms-image-v1.binpb):\n"
        f"{result.stdout}{result.stderr}\n"
        "v1 is stable: make the change compatible, or make it in a new package "
        "bms.image.v2 (see the README, API stability)"
    )


def test_the_baseline_is_the_whole_v1_api() -> None:
    """An empty or partial baseline would make `buf breaking` pass trivially."""
    baseline = descriptor_pb2.FileDescriptorSet.FromString(BASELINE.read_bytes())
    ours = {f.name: f for f in baseline.file if f.package == "bms.image.v1"}

    files = ("image.proto", "sharing.proto", "provisioning.proto")
    assert set(ours) == {f"{V1}/{name}" for name in files}
    services = {s.name: len(s.method) for f in ours.values() for s in f.service}
    assert services == {"ImageService": 8, "SharingService": 6, "ProvisioningService": 11}
    messages = {m.name for f in ours.values() for m in f.message_type}
    assert {"Image", "ImageMember", "Flavor", "Server", "ServerEvent"} <= messages


def test_make_lint_runs_buf_breaking_against_the_baseline() -> None:
    makefile = (ROOT / "Makefile").read_text()

    assert "buf breaking protos --against api/bms-image-v1.binpb" in makefile


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A copy of the buf workspace (buf.yaml and protos/) to change freely."""
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    return tmp_path


def edit(workspace: Path, proto: str, old: str, new: str) -> None:
    path = workspace / "protos" / V1 / proto
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} is not in {proto} exactly once"
    path.write_text(text.replace(old, new))


BREAKING_CHANGES = {
    "remove a field": (
        "image.proto",
        "  string description = 3;\n",
        "",
        'Previously present field "3" with name "description" on message "Image" was deleted',
    ),
    "rename an RPC": (
        "image.proto",
        "rpc GetImage(GetImageRequest)",
        "rpc FetchImage(GetImageRequest)",
        'Previously present RPC "GetImage" on service "ImageService" was deleted',
    ),
    "rename a field (JSON and generated code)": (
        "image.proto",
        "string display_name = 2;",
        "string title = 2;",
        'changed name from "display_name" to "title"',
    ),
    "change a field's type": (
        "image.proto",
        "int32 min_disk_gb = 12;",
        "int64 min_disk_gb = 12;",
        'changed type from "int32" to "int64"',
    ),
    "renumber a field": (
        "provisioning.proto",
        "string error_reason = 9;",
        "string error_reason = 12;",
        'Previously present field "9" with name "error_reason" on message "ServerEvent"',
    ),
    "rename an enum value": (
        "sharing.proto",
        "MEMBER_STATUS_REJECTED = 3;",
        "MEMBER_STATUS_DECLINED = 3;",
        'changed name from "MEMBER_STATUS_REJECTED" to "MEMBER_STATUS_DECLINED"',
    ),
    "make a response a stream": (
        "provisioning.proto",
        "rpc GetServer(GetServerRequest) returns (Server);",
        "rpc GetServer(GetServerRequest) returns (stream Server);",
        'RPC "GetServer" on service "ProvisioningService" changed from server unary to '
        "server streaming",
    ),
}


@pytest.mark.parametrize("change", BREAKING_CHANGES)
def test_buf_breaking_catches(workspace: Path, change: str) -> None:
    proto, old, new, expected = BREAKING_CHANGES[change]
    assert buf_breaking(workspace).returncode == 0, "the unchanged copy passes"
    edit(workspace, proto, old, new)

    result = buf_breaking(workspace)

    assert result.returncode != 0, f"buf breaking let {change!r} through"
    assert expected in result.stdout + result.stderr


def test_buf_breaking_lets_compatible_additions_through(workspace: Path) -> None:
    edit(
        workspace,
        "image.proto",
        "  repeated Partition partitions = 27;\n",
        "  repeated Partition partitions = 27;\n"
        "  // Where the image came from, for people.\n"
        "  string origin = 28;\n",
    )
    edit(
        workspace,
        "provisioning.proto",
        "  rpc InjectNetworkFault(InjectNetworkFaultRequest) returns (Server);\n",
        "  rpc InjectNetworkFault(InjectNetworkFaultRequest) returns (Server);\n\n"
        "  // Counts the caller's servers.\n"
        "  rpc CountServers(CountServersRequest) returns (CountServersResponse);\n",
    )
    with (workspace / "protos" / V1 / "provisioning.proto").open("a") as proto:
        proto.write(
            "\n// Request of ProvisioningService.CountServers.\n"
            "message CountServersRequest {}\n\n"
            "// Response of ProvisioningService.CountServers.\n"
            "message CountServersResponse {\n"
            "  // How many.\n"
            "  int32 count = 1;\n"
            "}\n"
        )
    edit(
        workspace,
        "sharing.proto",
        "  MEMBER_STATUS_REJECTED = 3;\n",
        "  MEMBER_STATUS_REJECTED = 3;\n"
        "  // Withdrawn by the owner.\n"
        "  MEMBER_STATUS_WITHDRAWN = 4;\n",
    )

    result = buf_breaking(workspace)

    assert result.returncode == 0, result.stdout + result.stderr
