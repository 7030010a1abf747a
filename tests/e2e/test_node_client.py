"""A client no one here wrote: `tests/e2e/node/client.mjs`, a Node.js program
using @grpc/grpc-js and @grpc/proto-loader on the repository's own .proto
files (no reflection, no generated code), against a real `bms-image serve`
process. If the protos stop being usable outside Python — they no longer load,
a message or method the README documents is gone, the rich error details do
not decode — these tests fail."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Protocol

import pytest
from google.rpc import status_pb2

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CLIENT = Path(__file__).parent / "node" / "client.mjs"
NODE_MODULES = ROOT / "node_modules"
#: Where google/rpc/{status,error_details}.proto are, for the client to decode
#: the error details: the googleapis-common-protos wheel's copy (the directory
#: that holds google/rpc/).
GOOGLEAPIS = Path(status_pb2.__file__).resolve().parents[2]
PROJECT_A = "node-a"
PROJECT_B = "node-b"
CLIENT_TIMEOUT = 120


class ServerProcess(Protocol):
    """What these tests use of the e2e `server` fixture (tests/e2e/conftest.py):
    a running `bms-image serve` process."""

    address: str

    def token(self, project: str, admin: bool = False) -> str: ...

    def output(self) -> str: ...


def _unavailable(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        _unavailable("node is not on PATH (Node.js is a requirement, see the README)")
    for package in ("@grpc/grpc-js", "@grpc/proto-loader", "protobufjs"):
        if not (NODE_MODULES / package / "package.json").exists():
            _unavailable(f"{package} is not installed: run `npm ci` (make test does)")
    assert node is not None
    return node


def run_client(
    address: str, token_a: str, token_b: str, **env: str
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """`node client.mjs ADDRESS`, tokens in the environment; its JSON output."""
    done = subprocess.run(
        [_node(), str(CLIENT), address],
        env={
            **os.environ,
            "BMS_TOKEN_A": token_a,
            "BMS_TOKEN_B": token_b,
            "BMS_PROJECT_B": PROJECT_B,
            "BMS_GOOGLEAPIS_DIR": str(GOOGLEAPIS),
            **env,
        },
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
        check=False,
    )
    try:
        output = json.loads(done.stdout)
    except json.JSONDecodeError:
        pytest.fail(
            f"the Node client printed no JSON (exit {done.returncode})\n"
            f"stdout: {done.stdout}\nstderr: {done.stderr}"
        )
    assert isinstance(output, dict)
    return done, output


@pytest.fixture(scope="module")
def walkthrough(server: ServerProcess) -> dict[str, Any]:
    """One run of the Node client against the module's server; it must succeed."""
    done, output = run_client(server.address, server.token(PROJECT_A), server.token(PROJECT_B))
    assert done.returncode == 0 and output.get("ok") is True, (
        f"the Node client failed at step {output.get('step')!r}: {output.get('error')}\n"
        f"{json.dumps(output, indent=2)}\nstderr: {done.stderr}\n{server.output()}"
    )
    return output


def test_the_client_loads_every_proto_file(walkthrough: dict[str, Any]) -> None:
    expected = sorted(
        f"bms/image/v1/{path.name}" for path in (ROOT / "protos/bms/image/v1").glob("*.proto")
    )
    assert walkthrough["protos"] == expected
    assert walkthrough["grpc_js"].startswith("1.14.")
    assert walkthrough["proto_loader"].startswith("0.8.")


def test_lists_the_public_catalog_page_by_page(walkthrough: dict[str, Any]) -> None:
    catalog = walkthrough["catalog"]

    assert catalog["count"] >= 6, "more than two pages of 3"
    assert catalog["types"] == ["IMAGE_TYPE_PUBLIC"]
    assert catalog["statuses"] == ["IMAGE_STATUS_ACTIVE"]
    assert len(set(catalog["names"])) == catalog["count"], "no image twice across pages"


def test_creates_and_uploads_a_private_image(walkthrough: dict[str, Any]) -> None:
    image = walkthrough["private_image"]

    assert image["name"].startswith("images/")
    assert image["created_status"] == "IMAGE_STATUS_QUEUED"
    assert image["status"] == "IMAGE_STATUS_ACTIVE"
    assert image["type"] == "IMAGE_TYPE_PRIVATE"
    assert image["owner_project"] == PROJECT_A
    assert image["size_bytes"] == str(256 * 1024), "int64 arrives as a decimal string"
    assert image["disk_format"] == "DISK_FORMAT_RAW"
    assert image["supported_flavors"] == ["flavors/physical.s4.large"]
    assert image["create_time_is_timestamp"] is True


def test_shares_it_with_another_project_that_accepts(walkthrough: dict[str, Any]) -> None:
    name = walkthrough["private_image"]["name"]
    member = walkthrough["member"]

    assert member["name"] == f"{name}/members/{PROJECT_B}"
    assert member["status"] == "MEMBER_STATUS_PENDING"
    assert member["pending_for_b"] == [name]
    assert member["accepted_status"] == "MEMBER_STATUS_ACCEPTED"

    listed = walkthrough["listed_by_b"]
    assert listed["shared"] == [
        {
            "name": name,
            "type": "IMAGE_TYPE_SHARED",
            "owner_project": PROJECT_A,
            "status": "IMAGE_STATUS_ACTIVE",
        }
    ]
    assert listed["filtered_shared"] == [name]
    assert walkthrough["download"]["bytes"] == 256 * 1024
    assert walkthrough["download"]["sha256"] == walkthrough["private_image"]["sha256"]


def test_follows_a_deployment_stream_to_active(walkthrough: dict[str, Any]) -> None:
    deployment = walkthrough["deployment"]

    assert deployment["flavor"] in walkthrough["flavors"]
    assert deployment["image"] in walkthrough["catalog"]["names"]
    assert deployment["failures"] == []
    assert deployment["last"] == {
        "stage": "PROVISIONING_STAGE_ACTIVE",
        "state": "SERVER_STATE_ACTIVE",
        "percent": 100,
    }
    assert len(deployment["servers"]) == 2
    for stages in deployment["servers"].values():
        assert stages[0] == "PROVISIONING_STAGE_VALIDATING"
        assert stages[-3:] == [
            "PROVISIONING_STAGE_FIRST_BOOT",
            "PROVISIONING_STAGE_NETWORK_CONFIGURED",
            "PROVISIONING_STAGE_ACTIVE",
        ]
        assert (
            "PROVISIONING_STAGE_IMAGE_STREAMING" in stages
            or "PROVISIONING_STAGE_EVS_CLONING" in stages
        )


@pytest.mark.parametrize(
    ("case", "code", "reason", "detail"),
    [
        ("get_before_sharing", "NOT_FOUND", "IMAGE_NOT_FOUND", None),
        ("owner_accepts", "PERMISSION_DENIED", "ONLY_MEMBER_ANSWERS", None),
        ("bad_name", "INVALID_ARGUMENT", "INVALID_FIELD", "google.rpc.BadRequest"),
        (
            "incompatible",
            "FAILED_PRECONDITION",
            "IMAGE_FLAVOR_INCOMPATIBLE",
            "google.rpc.PreconditionFailure",
        ),
    ],
)
def test_errors_carry_code_and_error_info_from_status_details(
    walkthrough: dict[str, Any], case: str, code: str, reason: str, detail: str | None
) -> None:
    error = walkthrough["errors"][case]

    assert error["code"] == code
    assert error["reason"] == reason
    assert error["domain"] == "image.bms.cloud"
    assert error["status_code_matches"] is True
    types = [d["@type"] for d in error["details"]]
    assert types[0] == "google.rpc.ErrorInfo"
    if detail is not None:
        assert detail in types


def test_the_client_fails_when_the_protos_do_not_load(tmp_path: Path) -> None:
    """The guard itself: a proto that protoc-less tooling cannot load must make
    the client exit non-zero, before it calls anything."""
    protos = tmp_path / "protos"
    shutil.copytree(ROOT / "protos", protos)
    image_proto = protos / "bms/image/v1/image.proto"
    text = image_proto.read_text()
    assert "  repeated Plugin plugins = 18;" in text
    image_proto.write_text(
        text.replace("  repeated Plugin plugins = 18;", "  repeated Plug plugins = 18;")
    )

    done, output = run_client("127.0.0.1:9", "a", "b", BMS_PROTOS_DIR=str(protos))

    assert done.returncode == 1
    assert output["ok"] is False
    assert output["step"] == "start"
    assert "Plug" in output["error"]
