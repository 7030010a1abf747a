"""`bms-image servers ...` and `flavors list`: a batch deployment followed
to ACTIVE with a bar per server, watch, power, reinstall and delete."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import typer
from cli_support import CENTOS, S4, UBUNTU, Cli, failed, ok, parsed, progress_lines
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from bms.image.v1 import provisioning_pb2
from bms_image.cli.output import Output
from bms_image.cli.progress import Deployment
from bms_image.cli.servers import finish

pb = provisioning_pb2


def ssh_key(tmp_path: Path) -> Path:
    path = tmp_path / "id_ed25519.pub"
    key = Ed25519PrivateKey.generate().public_key()
    path.write_bytes(key.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH) + b" ops@example\n")
    return path


async def test_flavors_list(cli: Cli) -> None:
    listing = parsed(await cli("flavors", "list", "--json"))
    flavors = {f["name"]: f for f in listing["flavors"]}
    assert len(flavors) == 5
    assert flavors[f"flavors/{S4}"]["hardware_model"] == "s4-2288h-v5"
    assert CENTOS in flavors[f"flavors/{S4}"]["public_images"]

    table = ok(await cli("flavors", "list")).stdout.splitlines()
    assert table[0].split()[:2] == ["NAME", "MODEL"]
    row = next(line for line in table if line.split()[0] == S4)
    assert row.split()[1:3] == ["s4-2288h-v5", "36"]


async def test_batch_of_two_follows_each_server_to_active(cli: Cli, tmp_path: Path) -> None:
    user_data = tmp_path / "user-data"
    user_data.write_text("#cloud-config\nwrite_files:\n  - path: /etc/motd\n    content: hello\n")
    created = ok(
        await cli(
            "servers", "create", "--flavor", S4, "--image", CENTOS, "--count", "2",
            "--name-prefix", "web", "--boot-source", "local",
            "--ssh-key-file", ssh_key(tmp_path), "--user-data-file", user_data,
        )
    )  # fmt: skip
    # one progress bar per server, each at 100% and active
    bars = progress_lines(created.stderr, "servers/")
    assert len(bars) == 2, created.stderr
    assert all(re.search(r"100% active$", bar.rstrip()) for bar in bars), bars
    short_ids = {bar.split()[0].removeprefix("servers/") for bar in bars}
    assert len(short_ids) == 2

    # then the servers as a table: web-1 and web-2, active, on local disk
    rows = [line.split() for line in created.stdout.splitlines()[2:] if line.strip()]
    assert sorted(row[1] for row in rows) == ["web-1", "web-2"]
    assert {row[2] for row in rows} == {"ACTIVE"} and {row[6] for row in rows} == {"LOCAL_DISK"}
    assert {row[0][:8] for row in rows} == short_ids

    servers = parsed(await cli("servers", "list", "--json"))["servers"]
    assert len(servers) == 2
    assert all(s["state"] == "SERVER_STATE_ACTIVE" and s["ssh_key_fingerprint"] for s in servers)
    assert parsed(await cli("servers", "list", "--json", project="beta")) == {}


async def test_json_events_watch_stop_reinstall_start_delete(cli: Cli) -> None:
    created = ok(
        await cli(
            "servers", "create", "--flavor", S4, "--image", CENTOS, "--name-prefix", "db", "--json"
        )
    )
    events = [json.loads(line) for line in created.stdout.splitlines()]
    assert events[0]["stage"] == "PROVISIONING_STAGE_VALIDATING"
    assert events[-1]["stage"] == "PROVISIONING_STAGE_ACTIVE"
    assert events[-1]["state"] == "SERVER_STATE_ACTIVE"
    server = events[-1]["server"]
    assert {e["server"] for e in events} == {server}
    assert len(progress_lines(created.stderr, "servers/")) == 1  # progress still on stderr

    watched = ok(await cli("servers", "watch", server))
    assert re.search(r"100% active\s*$", watched.stderr, re.MULTILINE)
    assert "ACTIVE" in watched.stdout.splitlines()[2].split()

    message = failed(await cli("servers", "start", server), 1, "FAILED_PRECONDITION")
    assert server in message

    stopped = parsed(await cli("servers", "stop", server, "--json"))
    assert stopped["state"] == "SERVER_STATE_STOPPED"
    reinstall = ok(await cli("servers", "reinstall", server, "--image", UBUNTU))
    assert re.search(r"100% active\s*$", reinstall.stderr, re.MULTILINE)
    shown = parsed(await cli("servers", "show", server, "--json"))
    assert shown["image"] == UBUNTU and shown["state"] == "SERVER_STATE_ACTIVE"

    ok(await cli("servers", "stop", server))
    started = parsed(await cli("servers", "start", server, "--json"))
    assert started["state"] == "SERVER_STATE_ACTIVE"

    ok(await cli("servers", "stop", server))
    assert ok(await cli("servers", "delete", server)).stdout.strip() == f"deleted {server}"
    failed(await cli("servers", "show", server), 1, "NOT_FOUND")


async def test_incompatible_image_fails_before_any_progress(cli: Cli) -> None:
    arm = parsed(await cli("images", "list", "--filter", "architecture = aarch64", "--json"))
    result = await cli(
        "servers",
        "create",
        "--flavor",
        S4,
        "--image",
        arm["images"][0]["name"],
        "--name-prefix",
        "x",
    )
    message = failed(result, 1, "FAILED_PRECONDITION", "IMAGE_FLAVOR_INCOMPATIBLE")
    assert S4 in message
    assert progress_lines(result.stderr, "servers/") == []


def test_a_failed_deployment_prints_its_error_and_exits_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    view = Deployment()
    failure = pb.ServerEvent(
        server="servers/0b7d7c1e-0000-4000-8000-000000000001",
        stage=pb.PROVISIONING_STAGE_FAILED,
        state=pb.SERVER_STATE_ERROR,
        error_code="DATA_LOSS",
        error_reason="IMAGE_CHECKSUM_MISMATCH",
        message="the streamed image does not match its sha256",
    )
    with view:
        view.update(failure)
    with pytest.raises(typer.Exit) as exited:
        finish(None, Output(json_output=True), view)  # type: ignore[arg-type]
    assert exited.value.exit_code == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: servers/0b7d7c1e-0000-4000-8000-000000000001: DATA_LOSS "
        "(IMAGE_CHECKSUM_MISMATCH): the streamed image does not match its sha256"
    )
