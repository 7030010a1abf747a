"""The sharing walkthrough, run for real: a `bms-image serve` process, tokens
from `bms-image token`, and the grpcurl binary using server reflection (no
proto files). Project alpha uploads an image and shares it with beta; beta
finds it pending, cannot use it yet, accepts it and then sees it as SHARED
and downloads it. Each call is written as a person types it (see the
README snippet)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
from typing import Any

import pytest

from support.processes import GRPCURL, ServerProcess

pytestmark = pytest.mark.e2e

# grpcurl exits with 64 + the gRPC status code when the call fails.
EXIT_NOT_FOUND = 64 + 5
EXIT_PERMISSION_DENIED = 64 + 7
EXIT_FAILED_PRECONDITION = 64 + 9

CREATE_IMAGE = (
    '{"image": {"display_name": "web-server-golden", "os_type": "OS_TYPE_LINUX", '
    '"os_distro": "centos", "os_version": "7.6", "architecture": "ARCHITECTURE_X86_64", '
    '"hardware_model": "s4-2288h-v5"}}'
)


def grpcurl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(GRPCURL), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def json_messages(text: str) -> list[Any]:
    """grpcurl prints each response message of a stream as its own JSON value."""
    decoder = json.JSONDecoder()
    messages: list[Any] = []
    position = 0
    while position < len(text):
        if text[position].isspace():
            position += 1
            continue
        message, position = decoder.raw_decode(text, position)
        messages.append(message)
    return messages


def ok(*args: str, stdin: str | None = None) -> Any:
    """A grpcurl call that must succeed: its one JSON response, parsed."""
    done = grpcurl(*args, stdin=stdin)
    assert done.returncode == 0, f"grpcurl {args} failed ({done.returncode}):\n{done.stderr}"
    [message] = json_messages(done.stdout)
    return message


def fails(expected_exit: int, code: str, *args: str) -> str:
    done = grpcurl(*args)
    assert done.returncode == expected_exit, (
        f"grpcurl {args}: exit {done.returncode}, expected {expected_exit}\n"
        f"stdout: {done.stdout}\nstderr: {done.stderr}"
    )
    assert f"Code: {code}" in done.stderr, done.stderr
    return done.stderr


def random_raw_bytes(size: int) -> bytes:
    """Random content that is raw for certain (no MBR signature at 510)."""
    data = bytearray(os.urandom(size))
    data[511] = 0
    return bytes(data)


def test_alpha_shares_an_image_with_beta_through_grpcurl(sharing_server: ServerProcess) -> None:
    address = sharing_server.address
    alpha = f"authorization: Bearer {sharing_server.token('alpha')}"
    beta = f"authorization: Bearer {sharing_server.token('beta')}"

    described = grpcurl("-plaintext", address, "describe", "bms.image.v1.SharingService")
    assert described.returncode == 0, described.stderr
    for method in ("CreateImageMember", "UpdateImageMember", "ReplicateImage"):
        assert f"rpc {method} (" in described.stdout

    # 1. alpha creates an image and uploads its bytes (a client stream: the
    #    metadata message, then chunk messages, bytes in base64).
    created = ok(
        "-plaintext", "-H", alpha, "-d", CREATE_IMAGE, address,
        "bms.image.v1.ImageService/CreateImage",
    )  # fmt: skip
    name = created["name"]
    assert created["status"] == "IMAGE_STATUS_QUEUED"
    data = random_raw_bytes(96 * 1024)
    stream = "\n".join(
        [
            json.dumps({"metadata": {"name": name}}),
            json.dumps({"chunk": base64.b64encode(data[: 64 * 1024]).decode()}),
            json.dumps({"chunk": base64.b64encode(data[64 * 1024 :]).decode()}),
        ]
    )
    uploaded = ok(
        "-plaintext", "-H", alpha, "-d", "@", address,
        "bms.image.v1.ImageService/UploadImageData",
        stdin=stream,
    )  # fmt: skip
    assert uploaded["status"] == "IMAGE_STATUS_ACTIVE"
    assert uploaded["size_bytes"] == str(len(data))  # int64 is a JSON string
    assert uploaded["sha256"] == hashlib.sha256(data).hexdigest()

    # beta cannot see alpha's private image yet.
    fails(
        EXIT_NOT_FOUND, "NotFound",
        "-plaintext", "-H", beta, "-d", f'{{"name": "{name}"}}', address,
        "bms.image.v1.ImageService/GetImage",
    )  # fmt: skip

    # 2. alpha shares it with beta: a PENDING member.
    member = ok(
        "-plaintext", "-H", alpha,
        "-d", f'{{"parent": "{name}", "member": {{"member_project": "beta"}}}}',
        address, "bms.image.v1.SharingService/CreateImageMember",
    )  # fmt: skip
    assert member["name"] == f"{name}/members/beta"
    assert (member["member_project"], member["status"]) == ("beta", "MEMBER_STATUS_PENDING")

    # 3. beta finds it among its pending shares, not in its default listing.
    pending = ok(
        "-plaintext", "-H", beta, "-d", '{"filter": "member_status = pending"}', address,
        "bms.image.v1.ImageService/ListImages",
    )["images"]  # fmt: skip
    assert [i["name"] for i in pending] == [name]
    assert pending[0]["type"] == "IMAGE_TYPE_SHARED"
    assert pending[0]["owner_project"] == "alpha"
    default = ok(
        "-plaintext", "-H", beta, address, "bms.image.v1.ImageService/ListImages"
    )["images"]  # fmt: skip
    assert name not in [i["name"] for i in default]

    # Pending, beta may not download it, and the error says what to do.
    stderr = fails(
        EXIT_FAILED_PRECONDITION, "FailedPrecondition",
        "-plaintext", "-H", beta, "-d", f'{{"name": "{name}"}}', address,
        "bms.image.v1.ImageService/DownloadImageData",
    )  # fmt: skip
    assert "accept it first" in stderr
    assert "SHARED_IMAGE_NOT_ACCEPTED" in stderr
    # Only beta answers: alpha cannot accept on beta's behalf.
    accept = (
        f'{{"member": {{"name": "{name}/members/beta", "status": "MEMBER_STATUS_ACCEPTED"}}, '
        '"update_mask": {"paths": ["status"]}}'
    )
    fails(
        EXIT_PERMISSION_DENIED, "PermissionDenied",
        "-plaintext", "-H", alpha, "-d", accept, address,
        "bms.image.v1.SharingService/UpdateImageMember",
    )  # fmt: skip

    # 4. beta accepts (grpcurl 1.8.6 needs the {"paths": [...]} form of the mask).
    accepted = ok(
        "-plaintext", "-H", beta, "-d", accept, address,
        "bms.image.v1.SharingService/UpdateImageMember",
    )  # fmt: skip
    assert accepted["status"] == "MEMBER_STATUS_ACCEPTED"

    # 5. beta sees it as a SHARED image owned by alpha, and downloads it.
    shared = ok(
        "-plaintext", "-H", beta, "-d", '{"filter": "type = shared"}', address,
        "bms.image.v1.ImageService/ListImages",
    )["images"]  # fmt: skip
    assert [i["name"] for i in shared] == [name]
    assert shared[0]["type"] == "IMAGE_TYPE_SHARED"
    assert shared[0]["owner_project"] == "alpha"
    assert shared[0]["status"] == "IMAGE_STATUS_ACTIVE"
    got = ok(
        "-plaintext", "-H", beta, "-d", f'{{"name": "{name}"}}', address,
        "bms.image.v1.ImageService/GetImage",
    )  # fmt: skip
    assert got == shared[0]

    done = grpcurl(
        "-plaintext", "-H", beta, "-d", f'{{"name": "{name}"}}', address,
        "bms.image.v1.ImageService/DownloadImageData",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    messages = json_messages(done.stdout)
    downloaded = b"".join(base64.b64decode(m.get("chunk", "")) for m in messages)
    assert downloaded == data
    assert messages[-1]["last"] is True
    assert messages[-1]["sha256"] == hashlib.sha256(data).hexdigest()

    # alpha sees beta's answer.
    members = ok(
        "-plaintext", "-H", alpha, "-d", f'{{"parent": "{name}"}}', address,
        "bms.image.v1.SharingService/ListImageMembers",
    )["members"]  # fmt: skip
    assert [(m["member_project"], m["status"]) for m in members] == [
        ("beta", "MEMBER_STATUS_ACCEPTED")
    ]
