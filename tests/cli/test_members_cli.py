"""`bms-image members ...`: alpha shares an image with beta, beta accepts,
lists and replicates it, then rejects it and alpha stops sharing."""

from __future__ import annotations

import os
from pathlib import Path

from cli_support import S4_MODEL, Cli, failed, ok, parsed


async def active_image(cli: Cli, tmp_path: Path, project: str) -> str:
    created = parsed(
        await cli(
            "images", "create", "shared-golden", "--os-type", "linux", "--os-distro", "centos",
            "--os-version", "7.6", "--architecture", "x86_64", "--hardware-model", S4_MODEL,
            "--json", project=project,
        )
    )  # fmt: skip
    disk = tmp_path / "disk.raw"
    disk.write_bytes(os.urandom(64 * 1024))
    image = parsed(await cli("images", "upload", created["name"], disk, "--json", project=project))
    assert image["status"] == "IMAGE_STATUS_ACTIVE"
    return str(image["name"])


def names(listing: dict[str, list[dict[str, str]]], key: str = "images") -> list[str]:
    return [item["name"] for item in listing.get(key, [])]


async def test_share_accept_replicate_reject_remove(cli: Cli, tmp_path: Path) -> None:
    image = await active_image(cli, tmp_path, "alpha")
    member = f"{image}/members/beta"

    added = parsed(await cli("members", "add", image, "beta", "--json"))
    assert added["name"] == member
    assert added["status"] == "MEMBER_STATUS_PENDING"

    # pending: beta sees it only when it asks for pending invitations
    assert image not in names(parsed(await cli("images", "list", "--json", project="beta")))
    pending = await cli(
        "images", "list", "--filter", "member_status = pending", "--json", project="beta"
    )
    assert image in names(parsed(pending))

    # only the member answers; beta's project comes from its token
    failed(await cli("members", "accept", image, "beta"), 1, "PERMISSION_DENIED")
    accepted = parsed(await cli("members", "accept", image, "--json", project="beta"))
    assert accepted["status"] == "MEMBER_STATUS_ACCEPTED"

    shared = parsed(
        await cli("images", "list", "--filter", "type = shared", "--json", project="beta")
    )
    [entry] = [i for i in shared["images"] if i["name"] == image]
    assert entry["type"] == "IMAGE_TYPE_SHARED" and entry["owner_project"] == "alpha"

    table = ok(await cli("members", "list", image)).stdout.splitlines()
    assert table[0].split()[:2] == ["PROJECT", "STATUS"]
    assert table[2].split()[:2] == ["beta", "ACCEPTED"]

    copy = parsed(
        await cli(
            "images", "replicate", image, "--display-name", "my-copy", "--json", project="beta"
        )
    )
    assert copy["name"] != image
    assert copy["type"] == "IMAGE_TYPE_PRIVATE" and copy["owner_project"] == "beta"
    assert copy["display_name"] == "my-copy"

    rejected = parsed(await cli("members", "reject", image, "beta", "--json", project="beta"))
    assert rejected["status"] == "MEMBER_STATUS_REJECTED"
    assert image not in names(parsed(await cli("images", "list", "--json", project="beta")))

    assert ok(await cli("members", "remove", image, "beta")).stdout.strip() == f"removed {member}"
    assert names(parsed(await cli("members", "list", image, "--json")), "members") == []
    failed(await cli("images", "show", image, project="beta"), 1, "NOT_FOUND", "IMAGE_NOT_FOUND")
    # the copy is beta's own and survives
    assert parsed(await cli("images", "show", copy["name"], "--json", project="beta"))["name"]
