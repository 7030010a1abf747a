"""Uploaded disk formats, with real files made by qemu-img: QCOW2, VMDK, VHD
and VHDX are detected, converted and stored as raw; a declared format must
match the content; unsafe or oversized images are refused."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import dataplane_support as dp
import grpc
import pytest

from bms.image.v1 import image_pb2
from bms_image.common.serving import RunningService
from support import chunk_store
from support.builders import MiB, random_bytes, sha256_hex
from support.tokens import Metadata

pytestmark = [dp.needs_qemu_img, pytest.mark.asyncio(loop_scope="module")]

QCOW2 = image_pb2.DISK_FORMAT_QCOW2
VMDK = image_pb2.DISK_FORMAT_VMDK
VHD = image_pb2.DISK_FORMAT_VHD
VHDX = image_pb2.DISK_FORMAT_VHDX
RAW = image_pb2.DISK_FORMAT_RAW


@dataclass(frozen=True)
class DiskFiles:
    """A raw disk of known random content and its conversions."""

    directory: Path
    raw: bytes

    def path(self, name: str) -> Path:
        return self.directory / name

    def read(self, name: str) -> bytes:
        return self.path(name).read_bytes()


def virtual_size(path: Path) -> int:
    return int(json.loads(dp.qemu_img("info", "--output=json", str(path)))["virtual-size"])


#: file name -> (qemu-img output format, its -o options, the format reported)
CONVERSIONS = {
    "disk.qcow2": ("qcow2", "", QCOW2),
    "disk.vmdk": ("vmdk", "", VMDK),
    # force_size keeps the exact size; without it VHD rounds up to a CHS geometry.
    "disk.vhd": ("vpc", "force_size=on", VHD),
    "disk-chs.vhd": ("vpc", "", VHD),
    "disk.vhdx": ("vhdx", "block_size=1M,log_size=1M", VHDX),
}


@pytest.fixture(scope="module")
def disks(tmp_path_factory: pytest.TempPathFactory) -> DiskFiles:
    directory = tmp_path_factory.mktemp("disks")
    content = bytearray(random_bytes(3 * MiB + 3 * 512))
    content[MiB : MiB + 512 * 1024] = bytes(512 * 1024)  # a hole, stored sparsely
    raw = bytes(content)
    (directory / "disk.raw").write_bytes(raw)
    for name, (fmt, options, _) in CONVERSIONS.items():
        argv = ["convert", "-f", "raw", "-O", fmt]
        if options:
            argv += ["-o", options]
        dp.qemu_img(*argv, str(directory / "disk.raw"), str(directory / name))
    # A QCOW2 whose content lives in a backing file.
    (directory / "base.raw").write_bytes(random_bytes(MiB))
    dp.qemu_img(
        "create", "-f", "qcow2", "-b", str(directory / "base.raw"), "-F", "raw",
        str(directory / "top.qcow2"),
    )  # fmt: skip
    # A QCOW2 whose clusters live in an external data file.
    dp.qemu_img(
        "create", "-f", "qcow2", "-o", f"data_file={directory / 'x.raw'}",
        str(directory / "external.qcow2"), "1M",
    )  # fmt: skip
    # Tiny files that claim huge disks.
    dp.qemu_img("create", "-f", "qcow2", str(directory / "20m.qcow2"), "20M")
    dp.qemu_img("create", "-f", "qcow2", str(directory / "2t.qcow2"), "2T")
    # A QCOW2 whose header passes inspection but whose L1 table offset is
    # not cluster-aligned: qemu-img refuses to open it.
    corrupt = bytearray((directory / "disk.qcow2").read_bytes())
    corrupt[40:48] = (0x1234).to_bytes(8, "big")
    (directory / "corrupt.qcow2").write_bytes(bytes(corrupt))
    # A format the service does not take.
    dp.qemu_img("convert", "-f", "raw", "-O", "vdi", str(directory / "disk.raw"),
                str(directory / "disk.vdi"))  # fmt: skip
    return DiskFiles(directory, raw)


@pytest.mark.parametrize("file_name", list(CONVERSIONS))
@pytest.mark.parametrize("declare", [False, True], ids=["detected", "declared"])
async def test_format_is_detected_and_stored_as_raw(
    images: dp.Stub,
    alpha: Metadata,
    data_dir: Path,
    disks: DiskFiles,
    file_name: str,
    declare: bool,
) -> None:
    expected_format = CONVERSIONS[file_name][2]
    uploaded_bytes = disks.read(file_name)
    size = virtual_size(disks.path(file_name))
    assert size >= len(disks.raw)
    expected = disks.raw + bytes(size - len(disks.raw))  # the CHS VHD is zero-padded
    assert uploaded_bytes != expected
    created = await dp.create_image(images, alpha)

    # The declared size and checksum are those of the uploaded file.
    active = await dp.upload(
        images,
        alpha,
        created.name,
        uploaded_bytes,
        disk_format=expected_format if declare else image_pb2.DISK_FORMAT_UNSPECIFIED,
    )

    assert active.status == dp.ACTIVE, dp.status_name(active.status)
    assert active.disk_format == expected_format
    assert active.size_bytes == size
    assert active.sha256 == sha256_hex(expected)
    data = await dp.download_verified(images, alpha, created.name)
    assert data == expected
    dp.assert_only_stored(data_dir, created.name)
    assert chunk_store.stored_bytes(data_dir, created.name) == expected


async def test_raw_is_detected_as_raw(
    service: RunningService,
    images: dp.Stub,
    alpha: Metadata,
    disks: DiskFiles,
) -> None:
    created = await dp.create_image(images, alpha)
    active = await dp.upload(images, alpha, created.name, disks.raw, disk_format=RAW)
    assert (active.status, active.disk_format) == (dp.ACTIVE, RAW)
    assert active.sha256 == sha256_hex(disks.raw)


FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize(
    ("file_name", "declared"),
    [
        ("disk.qcow2", RAW),
        ("disk.raw", QCOW2),
        ("disk.vmdk", VHDX),
        ("disk.vhdx", VHD),
        ("disk.vhd", VMDK),
    ],
)
async def test_declared_format_that_differs_from_the_content_kills_the_upload(
    images: dp.Stub,
    alpha: Metadata,
    data_dir: Path,
    disks: DiskFiles,
    file_name: str,
    declared: int,
) -> None:
    content = disks.read(file_name)
    await dp.killed_upload(
        images,
        alpha,
        data_dir,
        content,
        FAILED_PRECONDITION,
        "IMAGE_FORMAT_MISMATCH",
        disk_format=declared,
    )


@pytest.mark.parametrize("file_name", ["top.qcow2", "external.qcow2"])
async def test_qcow2_referring_to_other_files_is_unsafe(
    images: dp.Stub,
    alpha: Metadata,
    data_dir: Path,
    disks: DiskFiles,
    file_name: str,
) -> None:
    unsafe = await dp.killed_upload(
        images, alpha, data_dir, disks.read(file_name), FAILED_PRECONDITION, "IMAGE_UNSAFE"
    )
    assert unsafe.error.precondition_failure is not None


async def test_qcow2_claiming_more_than_the_default_maximum_is_too_large(
    service: RunningService,
    images: dp.Stub,
    alpha: Metadata,
    data_dir: Path,
    disks: DiskFiles,
) -> None:
    assert virtual_size(disks.path("2t.qcow2")) > service.settings.max_image_bytes
    huge = disks.read("2t.qcow2")
    await dp.killed_upload(images, alpha, data_dir, huge, FAILED_PRECONDITION, "IMAGE_TOO_LARGE")


async def test_qcow2_claiming_more_than_a_configured_maximum_is_too_large(
    tmp_path: Path, disks: DiskFiles
) -> None:
    async with dp.own_service(tmp_path, max_image_bytes=10 * MiB) as own:
        alpha = own.metadata("alpha")
        small_file = disks.read("20m.qcow2")
        assert len(small_file) < MiB

        await dp.killed_upload(
            own.images, alpha, own.data_dir, small_file, FAILED_PRECONDITION, "IMAGE_TOO_LARGE"
        )

        # A 3 MiB disk in QCOW2 fits under the same limit.
        fits = await dp.create_image(own.images, alpha, display_name="fits")
        active = await dp.upload(own.images, alpha, fits.name, disks.read("disk.qcow2"))
        assert (active.status, active.size_bytes) == (dp.ACTIVE, len(disks.raw))


@pytest.mark.parametrize(
    ("file_name", "reason"),
    [
        pytest.param("disk.vdi", "IMAGE_FORMAT_UNSUPPORTED", id="unsupported-format"),
        pytest.param("corrupt.qcow2", "IMAGE_CONVERSION_FAILED", id="qemu-img-cannot-convert"),
    ],
)
async def test_content_the_service_cannot_take_kills_the_upload(
    service: RunningService,
    images: dp.Stub,
    alpha: Metadata,
    data_dir: Path,
    disks: DiskFiles,
    file_name: str,
    reason: str,
) -> None:
    """A format the service does not take (VDI), and content qemu-img
    cannot convert (a corrupt QCOW2)."""
    content = disks.read(file_name)
    await dp.killed_upload(images, alpha, data_dir, content, FAILED_PRECONDITION, reason)


async def test_conversion_errors_do_not_reveal_server_paths(
    service: RunningService,
    images: dp.Stub,
    alpha: Metadata,
    disks: DiskFiles,
) -> None:
    """The client learns why its image was refused, not where the server
    keeps its files (qemu-img's stderr names the staging file's full path)."""
    created = await dp.create_image(images, alpha)

    rich = await dp.expect_error(
        dp.upload(images, alpha, created.name, disks.read("corrupt.qcow2")),
        grpc.StatusCode.FAILED_PRECONDITION,
    )

    data_dir = str(service.settings.data_dir)
    assert data_dir not in rich.status.message
    assert data_dir not in str(rich.precondition_failure)
    image = await dp.get_image(images, alpha, created.name)
    assert data_dir not in image.status_reason
