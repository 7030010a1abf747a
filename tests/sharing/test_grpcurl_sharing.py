"""The sharing walkthrough, run for real: a `bms-image serve` process, tokens
from `bms-image token`, and the grpcurl binary using server reflection (no
proto files). Project alpha uploads an image and shares it with beta; beta
finds it pending, cannot use it yet, accepts it and then sees it as SHARED
and downloads it. Each call is the command a person types (see the README
snippet; support/grpcurl.py spells the command line out)."""

from __future__ import annotations

import base64
import hashlib
import json
import os

import pytest

from support.grpcurl import (
    EXIT_FAILED_PRECONDITION,
    EXIT_NOT_FOUND,
    EXIT_PERMISSION_DENIED,
    Caller,
    by_name,
    grpcurl,
    json_messages,
)
from support.processes import ServerProcess

pytestmark = pytest.mark.e2e

CREATE_IMAGE = (
    '{"image": {"display_name": "web-server-golden", "os_type": "OS_TYPE_LINUX", '
    '"os_distro": "centos", "os_version": "7.6", "architecture": "ARCHITECTURE_X86_64", '
    '"hardware_model": "s4-2288h-v5"}}'
)
LIST_IMAGES = "bms.image.v1.ImageService/ListImages"
GET_IMAGE = "bms.image.v1.ImageService/GetImage"
DOWNLOAD = "bms.image.v1.ImageService/DownloadImageData"
UPDATE_MEMBER = "bms.image.v1.SharingService/UpdateImageMember"


def random_raw_bytes(size: int) -> bytes:
    """Random content that is raw for certain (no MBR signature at 510)."""
    data = bytearray(os.urandom(size))
    data[511] = 0
    return bytes(data)


def test_alpha_shares_an_image_with_beta_through_grpcurl(sharing_server: ServerProcess) -> None:
    address = sharing_server.address
    alpha = Caller(address, sharing_server.token("alpha"))
    beta = Caller(address, sharing_server.token("beta"))

    described = grpcurl("-plaintext", address, "describe", "bms.image.v1.SharingService")
    assert described.returncode == 0, described.stderr
    for method in ("CreateImageMember", "UpdateImageMember", "ReplicateImage"):
        assert f"rpc {method} (" in described.stdout

    # 1. alpha creates an image and uploads its bytes (a client stream: the
    #    metadata message, then chunk messages, bytes in base64).
    created = alpha.ok("bms.image.v1.ImageService/CreateImage", CREATE_IMAGE)
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
    uploaded = alpha.ok("bms.image.v1.ImageService/UploadImageData", "@", stdin=stream)
    assert uploaded["status"] == "IMAGE_STATUS_ACTIVE"
    assert uploaded["size_bytes"] == str(len(data))  # int64 is a JSON string
    assert uploaded["sha256"] == hashlib.sha256(data).hexdigest()

    # beta cannot see alpha's private image yet.
    beta.fails(EXIT_NOT_FOUND, "NotFound", GET_IMAGE, by_name(name))

    # 2. alpha shares it with beta: a PENDING member.
    member = alpha.ok(
        "bms.image.v1.SharingService/CreateImageMember",
        f'{{"parent": "{name}", "member": {{"member_project": "beta"}}}}',
    )
    assert member["name"] == f"{name}/members/beta"
    assert (member["member_project"], member["status"]) == ("beta", "MEMBER_STATUS_PENDING")

    # 3. beta finds it among its pending shares, not in its default listing.
    pending = beta.ok(LIST_IMAGES, '{"filter": "member_status = pending"}')["images"]
    assert [i["name"] for i in pending] == [name]
    assert pending[0]["type"] == "IMAGE_TYPE_SHARED"
    assert pending[0]["owner_project"] == "alpha"
    default = beta.ok(LIST_IMAGES)["images"]
    assert name not in [i["name"] for i in default]

    # Pending, beta may not download it, and the error says what to do.
    stderr = beta.fails(EXIT_FAILED_PRECONDITION, "FailedPrecondition", DOWNLOAD, by_name(name))
    assert "accept it first" in stderr
    assert "SHARED_IMAGE_NOT_ACCEPTED" in stderr
    # Only beta answers: alpha cannot accept on beta's behalf.
    accept = (
        f'{{"member": {{"name": "{name}/members/beta", "status": "MEMBER_STATUS_ACCEPTED"}}, '
        '"update_mask": {"paths": ["status"]}}'
    )
    alpha.fails(EXIT_PERMISSION_DENIED, "PermissionDenied", UPDATE_MEMBER, accept)

    # 4. beta accepts (grpcurl 1.8.6 needs the {"paths": [...]} form of the mask).
    accepted = beta.ok(UPDATE_MEMBER, accept)
    assert accepted["status"] == "MEMBER_STATUS_ACCEPTED"

    # 5. beta sees it as a SHARED image owned by alpha, and downloads it.
    shared = beta.ok(LIST_IMAGES, '{"filter": "type = shared"}')["images"]
    assert [i["name"] for i in shared] == [name]
    assert shared[0]["type"] == "IMAGE_TYPE_SHARED"
    assert shared[0]["owner_project"] == "alpha"
    assert shared[0]["status"] == "IMAGE_STATUS_ACTIVE"
    got = beta.ok(GET_IMAGE, by_name(name))
    assert got == shared[0]

    done = beta.run(DOWNLOAD, by_name(name))
    assert done.returncode == 0, done.stderr
    messages = json_messages(done.stdout)
    downloaded = b"".join(base64.b64decode(m.get("chunk", "")) for m in messages)
    assert downloaded == data
    assert messages[-1]["last"] is True
    assert messages[-1]["sha256"] == hashlib.sha256(data).hexdigest()

    # alpha sees beta's answer.
    listed = alpha.ok("bms.image.v1.SharingService/ListImageMembers", f'{{"parent": "{name}"}}')
    members = listed["members"]
    assert [(m["member_project"], m["status"]) for m in members] == [
        ("beta", "MEMBER_STATUS_ACCEPTED")
    ]
