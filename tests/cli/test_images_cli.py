"""`bms-image images ...` against a real service: tables and --json, the
image life cycle, and the data plane with its progress and verification."""

from __future__ import annotations

import hashlib
import io
import os
import uuid
from pathlib import Path

import pytest
from cli_support import CENTOS, S4_MODEL, Cli, failed, ok, parsed, progress_lines

from bms.image.v1 import image_pb2
from bms_image.cli.client import EXIT_VERIFY, CliError
from bms_image.cli.images import receive

CREATE = (
    "--os-type", "linux", "--os-distro", "centos", "--os-version", "7.6",
    "--architecture", "x86_64", "--hardware-model", S4_MODEL,
)  # fmt: skip


async def create_image(cli: Cli, display_name: str, *extra: str, project: str = "alpha") -> str:
    image = parsed(
        await cli("images", "create", display_name, *CREATE, *extra, "--json", project=project)
    )
    assert image["status"] == "IMAGE_STATUS_QUEUED"
    return str(image["name"])


async def test_list_prints_a_table_for_people_and_json_for_scripts(cli: Cli) -> None:
    listing = parsed(await cli("images", "list", "--json"))
    images = listing["images"]
    assert len(images) == 7  # the public catalog
    centos = next(i for i in images if i["name"] == CENTOS)
    # grpcurl's names: proto field names, enum value names, int64 as strings
    assert centos["display_name"] == "CentOS 7.6 64bit"
    assert centos["type"] == "IMAGE_TYPE_PUBLIC"
    assert int(centos["size_bytes"]) > 0

    table = ok(await cli("images", "list")).stdout.splitlines()
    assert table[0].split()[:4] == ["ID", "DISPLAY", "NAME", "TYPE"]
    row = next(line for line in table if CENTOS.removeprefix("images/") in line)
    assert "CentOS 7.6 64bit" in row and "PUBLIC" in row and "ACTIVE" in row
    listed = [line.split()[0] for line in table[2:] if line.strip()]
    assert listed == [i["name"].removeprefix("images/") for i in images]

    only_arm = parsed(await cli("images", "list", "--filter", "architecture = aarch64", "--json"))
    assert {i["architecture"] for i in only_arm["images"]} == {"ARCHITECTURE_AARCH64"}
    assert 0 < len(only_arm["images"]) < 7


async def test_create_show_update_delete(cli: Cli) -> None:
    name = await create_image(cli, "web-golden", "--tag", "web", "--description", "first")
    image_id = name.removeprefix("images/")

    shown = ok(await cli("images", "show", image_id)).stdout  # a bare id is enough
    assert "web-golden" in shown and "QUEUED" in shown and "flavors/physical.s4.large" in shown

    updated = parsed(
        await cli(
            "images", "update", name, "--description", "Nginx on CentOS",
            "--tag", "web", "--tag", "nginx", "--protected", "--json",
        )
    )  # fmt: skip
    assert updated["description"] == "Nginx on CentOS"
    assert updated["tags"] == ["web", "nginx"]
    assert updated["protected"] is True
    assert updated["display_name"] == "web-golden"  # not in the mask: unchanged

    message = failed(
        await cli("images", "delete", name), 1, "FAILED_PRECONDITION", "IMAGE_PROTECTED"
    )
    assert name in message
    ok(await cli("images", "update", name, "--unprotected"))
    assert ok(await cli("images", "delete", name)).stdout.strip() == f"deleted {name}"
    failed(await cli("images", "show", name), 1, "NOT_FOUND", "IMAGE_NOT_FOUND")


async def test_upload_then_download_with_progress(cli: Cli, tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    content = os.urandom(3 * 1024 * 1024 + 12345)  # several upload messages
    disk.write_bytes(content)
    digest = hashlib.sha256(content).hexdigest()
    name = await create_image(cli, "uploaded")

    uploading = ok(await cli("images", "upload", name, disk, "--json"))
    image = parsed(uploading)
    assert image["status"] == "IMAGE_STATUS_ACTIVE"
    assert image["sha256"] == digest
    assert int(image["size_bytes"]) == len(content)
    bar = progress_lines(uploading.stderr, "upload disk.raw")
    assert len(bar) == 1 and "3.0/3.0 MiB" in bar[0], uploading.stderr

    target = tmp_path / "copy.raw"
    downloading = ok(await cli("images", "download", name, "--output", target, "--json"))
    summary = parsed(downloading)
    assert target.read_bytes() == content
    assert summary == {
        "name": name,
        "file": str(target),
        "size_bytes": len(content),
        "sha256": digest,
    }
    assert not (tmp_path / "copy.raw.part").exists()
    bar = progress_lines(downloading.stderr, "download copy.raw")
    assert len(bar) == 1 and "3.0/3.0 MiB" in bar[0], downloading.stderr

    # uploading again is refused: the image is no longer QUEUED
    failed(await cli("images", "upload", name, disk), 1, "FAILED_PRECONDITION")


def _stream(content: bytes, chunk: int, sha256: str) -> list[image_pb2.DownloadImageDataResponse]:
    pieces = [
        image_pb2.DownloadImageDataResponse(
            offset=at, chunk=content[at : at + chunk], size_bytes=len(content)
        )
        for at in range(0, len(content), chunk)
    ]
    pieces.append(
        image_pb2.DownloadImageDataResponse(
            offset=len(content), size_bytes=len(content), sha256=sha256, last=True
        )
    )
    return pieces


def test_download_verification_catches_damaged_streams() -> None:
    content = os.urandom(10_000)
    good = _stream(content, 4096, hashlib.sha256(content).hexdigest())
    sink = io.BytesIO()
    assert receive(good, sink).last and sink.getvalue() == content

    damaged = _stream(content, 4096, hashlib.sha256(b"other bytes").hexdigest())
    gap = [good[0], *good[2:]]
    cut = good[:-1]
    for stream, words in ((damaged, "sha256 mismatch"), (gap, "jumped"), (cut, "without its last")):
        with pytest.raises(CliError) as raised:
            receive(stream, io.BytesIO())
        assert raised.value.exit_code == EXIT_VERIFY
        assert words in str(raised.value)


async def test_errors_are_one_line_with_code_reason_and_exit_code(cli: Cli) -> None:
    missing = f"images/{uuid.uuid4()}"
    message = failed(await cli("images", "show", missing), 1, "NOT_FOUND", "IMAGE_NOT_FOUND")
    assert missing in message

    # BadRequest violations are on the same line
    invalid = await cli("images", "create", "x" * 200, *CREATE)
    message = failed(invalid, 1, "INVALID_ARGUMENT")
    assert "image.display_name" in message
    assert len(invalid.stderr.splitlines()) == 1

    failed(
        await cli("images", "list", "--filter", "colour = blue"),
        1,
        "INVALID_ARGUMENT",
        "INVALID_FILTER",
    )

    # usage errors exit 2 without calling the service
    nothing = await cli("images", "update", CENTOS)
    assert nothing.exit_code == 2 and nothing.stderr.startswith("error: nothing to change")
    unknown = await cli("images", "create", "x", "--os-type", "beos")
    assert unknown.exit_code == 2
    half_mtls = await cli("images", "--client-cert", __file__, "list")
    assert half_mtls.exit_code == 2 and "--client-key" in half_mtls.stderr
