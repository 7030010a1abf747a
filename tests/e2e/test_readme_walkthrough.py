"""The README's grpcurl walkthrough, exactly as written: its ```sh blocks are
extracted from README.md and pasted, command by command, into one bash
session (so TOKEN, OTHER, IMAGE, SERVER... carry over) against a real
`bms-image serve` started as `make run` starts it, with the real grpcurl.
Only the address changes (the README's 127.0.0.1:50051 → the test server's);
`bms-image token` finds the secret in `./data` because the session runs in
a directory whose `data` is the server's data directory."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from readme_support import (
    README_ADDRESS,
    WALKTHROUGH_SECTIONS,
    Command,
    Outcome,
    Session,
    run_session,
    walkthrough_blocks,
    walkthrough_commands,
)

from support.processes import ServerProcess, clean_environ

pytestmark = pytest.mark.e2e

VENV_BIN = Path(sys.executable).parent
SESSION_TIMEOUT = 60.0
PUBLIC_CENTOS = "images/635e3f9c-41bc-548f-87e3-da2a1bb02313"
IMAGE_SERVICE = "bms.image.v1.ImageService"
SHARING_SERVICE = "bms.image.v1.SharingService"
PROVISIONING_SERVICE = "bms.image.v1.ProvisioningService"


def ssh_public_key(home: Path) -> str:
    """Creates `~/.ssh/id_ed25519.pub` under `home` (ssh-keygen, or the
    cryptography package without it); returns the key line."""
    ssh = home / ".ssh"
    ssh.mkdir(parents=True, mode=0o700)
    keygen = shutil.which("ssh-keygen")
    if keygen is not None:
        argv = [keygen, "-q", "-t", "ed25519", "-N", "", "-C", "walkthrough@test"]
        subprocess.run(
            [*argv, "-f", str(ssh / "id_ed25519")],
            check=True,
            capture_output=True,
            timeout=30,
        )
    else:
        key = Ed25519PrivateKey.generate().public_key()
        line = key.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH) + b" walkthrough@test\n"
        (ssh / "id_ed25519.pub").write_bytes(line)
    return (ssh / "id_ed25519.pub").read_text().strip()


def fingerprint(public_key: str) -> str:
    """The OpenSSH SHA256 fingerprint of a public key line."""
    blob = base64.b64decode(public_key.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


@dataclass(frozen=True)
class Walkthrough:
    session: Session
    workdir: Path
    public_key: str

    def calls(self, rpc: str) -> list[Outcome]:
        """The outcomes of the commands calling `rpc` (`Service/Method`,
        `list` or `describe`), in README order."""
        return [
            outcome
            for outcome in self.session.outcomes
            if outcome.command.rpc is not None and outcome.command.rpc.endswith(rpc)
        ]

    def call(self, rpc: str, index: int = 0) -> Outcome:
        """The `index`-th command calling `rpc`, which must have run and succeeded."""
        calls = self.calls(rpc)
        assert len(calls) > index, f"the walkthrough has no call #{index + 1} of {rpc}"
        outcome = calls[index]
        assert outcome.ran, (
            f"the walkthrough stopped before this command:\n{outcome.command.describe()}\n"
            f"{self.first_failure()}"
        )
        assert outcome.exit == outcome.command.expected_exit, str(outcome)
        return outcome

    def variable(self, name: str) -> str:
        assert name in self.session.variables, (
            f"the walkthrough never set ${name} (or stopped early)\n{self.first_failure()}"
        )
        return self.session.variables[name]

    def first_failure(self) -> str:
        for outcome in self.session.outcomes:
            if outcome.exit != outcome.command.expected_exit:
                return f"first failing command:\n{outcome}\n{self.session.stderr}"
        return ""


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Walkthrough]:
    root = tmp_path_factory.mktemp("readme-walkthrough")
    workdir = root / "work"  # where a person stands: `make run` serves ./data
    data_dir = workdir / "data"
    data_dir.mkdir(parents=True)
    home = root / "home"
    public_key = ssh_public_key(home)
    env = clean_environ(
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        HOME=str(home),
    )
    commands = walkthrough_commands()
    server = ServerProcess(data_dir).start()
    try:
        session = run_session(commands, workdir, env, server.address, SESSION_TIMEOUT)
        yield Walkthrough(session, workdir, public_key)
        server.stop()
    finally:
        server.kill()


def by_rpc(commands: list[Command]) -> set[str]:
    return {command.rpc for command in commands if command.rpc is not None}


def test_the_walkthrough_is_extracted_from_the_readme() -> None:
    blocks = walkthrough_blocks()
    assert {block.section for block in blocks} == set(WALKTHROUGH_SECTIONS)
    commands = walkthrough_commands()
    grpcurl_calls = [command for command in commands if command.rpc is not None]
    assert len(grpcurl_calls) >= 25
    for command in grpcurl_calls:
        assert README_ADDRESS in command.text, command.describe()
    # the comment "another project cannot see it: Code: NotFound" is understood
    assert [(c.rpc, c.expected_exit) for c in commands if c.expected_code] == [
        (f"{IMAGE_SERVICE}/GetImage", 64 + 5)
    ]
    assert {
        "list",
        "describe",
        f"{IMAGE_SERVICE}/ListImages",
        f"{IMAGE_SERVICE}/CreateImage",
        f"{IMAGE_SERVICE}/UploadImageData",
        f"{IMAGE_SERVICE}/DownloadImageData",
        f"{SHARING_SERVICE}/CreateImageMember",
        f"{SHARING_SERVICE}/ReplicateImage",
        f"{PROVISIONING_SERVICE}/CreateServers",
        f"{PROVISIONING_SERVICE}/ReinstallServer",
    } <= by_rpc(commands)


def test_every_command_exits_as_the_readme_says(walkthrough: Walkthrough) -> None:
    failures = [
        str(outcome)
        for outcome in walkthrough.session.outcomes
        if outcome.exit != outcome.command.expected_exit
    ]
    assert not failures, "\n\n".join(failures[:1]) + "\n" + walkthrough.session.stderr
    expected_failure = next(o for o in walkthrough.session.outcomes if o.command.expected_code)
    assert f"Code: {expected_failure.command.expected_code}" in expected_failure.stderr


def test_listing_and_describing(walkthrough: Walkthrough) -> None:
    services = walkthrough.call("list").stdout.split()
    assert {IMAGE_SERVICE, SHARING_SERVICE, PROVISIONING_SERVICE, "grpc.health.v1.Health"} <= set(
        services
    )
    described = walkthrough.call("describe").stdout
    assert f"{IMAGE_SERVICE} is a service:" in described
    assert "rpc CreateImage (" in described
    assert walkthrough.call("Health/Check").message() == {"status": "SERVING"}

    everything = walkthrough.call("ImageService/ListImages", 0).message()["images"]
    assert len(everything) >= 6
    assert {image["type"] for image in everything} == {"IMAGE_TYPE_PUBLIC"}
    for_one_flavor = walkthrough.call("ImageService/ListImages", 1).message()["images"]
    assert for_one_flavor
    assert all("flavors/physical.s4.large" in i["supported_flavors"] for i in for_one_flavor)
    assert len(for_one_flavor) < len(everything)

    centos = walkthrough.call("ImageService/GetImage", 0).message()
    assert centos["name"] == PUBLIC_CENTOS
    assert centos["display_name"] == "CentOS 7.6 64bit"
    flavors = walkthrough.call("ListFlavors").message()["flavors"]
    assert "flavors/physical.s4.large" in [flavor["name"] for flavor in flavors]


def test_create_update_and_hide_from_another_project(walkthrough: Walkthrough) -> None:
    image = walkthrough.variable("IMAGE")
    created = walkthrough.call("ImageService/CreateImage", 0).message()
    assert created["name"] == image
    assert created["status"] == "IMAGE_STATUS_QUEUED"
    assert created["owner_project"] == "alpha"
    assert created["tags"] == ["web", "golden"]

    updated = walkthrough.call("UpdateImage").message()
    assert updated["name"] == image
    assert updated["description"] == "Nginx on CentOS 7.6"
    assert updated["tags"] == ["web", "nginx"]
    assert updated["display_name"] == "web-server-golden"  # not in the mask

    hidden = walkthrough.call("ImageService/GetImage", 1)
    assert hidden.exit == 64 + 5
    assert "Code: NotFound" in hidden.stderr
    assert "IMAGE_NOT_FOUND" in hidden.stderr


def test_upload_and_download(walkthrough: Walkthrough) -> None:
    disk = (walkthrough.workdir / "disk.raw").read_bytes()
    digest = hashlib.sha256(disk).hexdigest()

    uploaded = walkthrough.call("UploadImageData").message()
    assert uploaded["name"] == walkthrough.variable("IMAGE")
    assert uploaded["status"] == "IMAGE_STATUS_ACTIVE"
    assert int(uploaded["size_bytes"]) == len(disk) == 65536
    assert uploaded["sha256"] == digest

    messages = walkthrough.call("DownloadImageData").messages()
    assert messages[-1]["last"] is True
    assert messages[-1]["sha256"] == digest
    received = b"".join(base64.b64decode(m.get("chunk", "")) for m in messages)
    assert received == disk


def test_sharing(walkthrough: Walkthrough) -> None:
    image = walkthrough.variable("IMAGE")
    member = walkthrough.call("CreateImageMember").message()
    assert member["name"] == f"{image}/members/beta"
    assert member["status"] == "MEMBER_STATUS_PENDING"

    pending = walkthrough.call("ImageService/ListImages", 2).message()["images"]
    assert [i["name"] for i in pending] == [image]

    accepted = walkthrough.call("UpdateImageMember").message()
    assert accepted["status"] == "MEMBER_STATUS_ACCEPTED"

    shared = walkthrough.call("ImageService/ListImages", 3).message()["images"]
    assert [(i["name"], i["type"], i["owner_project"]) for i in shared] == [
        (image, "IMAGE_TYPE_SHARED", "alpha")
    ]

    replica = walkthrough.call("ReplicateImage").message()
    assert replica["name"] != image
    assert replica["owner_project"] == "beta"
    assert replica["type"] == "IMAGE_TYPE_PRIVATE"

    members = walkthrough.call("ListImageMembers").message()["members"]
    assert [m["member_project"] for m in members] == ["beta"]
    assert walkthrough.call("DeleteImageMember").message() == {}
    assert walkthrough.call("ImageService/DeleteImage").message() == {}


def last_events(messages: list[Any]) -> dict[str, Any]:
    """The last progress event of each server in a CreateServers/Reinstall stream."""
    return {event["server"]: event for event in messages}


def test_deploying_two_servers(walkthrough: Walkthrough) -> None:
    events = walkthrough.call("CreateServers").messages()
    last = last_events(events)
    assert len(last) == 2
    for event in last.values():
        assert event["stage"] == "PROVISIONING_STAGE_ACTIVE", event
        assert event["state"] == "SERVER_STATE_ACTIVE", event
    assert {event["stage"] for event in events} >= {
        "PROVISIONING_STAGE_VALIDATING",
        "PROVISIONING_STAGE_FIRST_BOOT",
        "PROVISIONING_STAGE_NETWORK_CONFIGURED",
    }
    server = walkthrough.variable("SERVER")
    assert server == events[0]["server"]

    watched = walkthrough.call("WatchServer").messages()
    assert watched[-1]["server"] == server
    assert watched[-1]["state"] == "SERVER_STATE_ACTIVE"

    stopped = walkthrough.call("StopServer").message()
    assert stopped["name"] == server
    assert stopped["state"] == "SERVER_STATE_STOPPED"
    assert stopped["ssh_key_fingerprint"] == fingerprint(walkthrough.public_key)


def test_capture_and_reinstall(walkthrough: Walkthrough) -> None:
    server = walkthrough.variable("SERVER")
    backup = walkthrough.variable("BACKUP")
    captured = walkthrough.call("ImageService/CreateImage", 1).message()
    assert captured["name"] == backup
    assert captured["source_server"] == server
    assert captured["status"] == "IMAGE_STATUS_QUEUED"
    assert captured["display_name"] == "web-golden"

    waited = walkthrough.call("ImageService/GetImage", 2)
    assert waited.command.program == "until"
    assert "IMAGE_STATUS_ACTIVE" in waited.stdout

    events = walkthrough.call("ReinstallServer").messages()
    assert {event["server"] for event in events} == {server}
    assert events[-1]["stage"] == "PROVISIONING_STAGE_ACTIVE", events[-1]
    assert events[-1]["state"] == "SERVER_STATE_ACTIVE"
