"""What an uploaded image's header can make the service do is bounded. A
200 KiB qcow2 that claims a 1 TiB disk is refused (FAILED_PRECONDITION
IMAGE_TOO_LARGE) before qemu-img runs, and so is one whose raw disk the
staging area cannot hold (RESOURCE_EXHAUSTED STAGING_SPACE_EXHAUSTED).
qemu-img runs under resource limits and BMS_IMAGE_CONVERT_TIMEOUT_SECONDS,
and is killed (and reaped) on timeout and when its upload is cancelled."""

from __future__ import annotations

import asyncio
import os
import struct
import time
from pathlib import Path

import dataplane_support as dp
import grpc
import pytest

from bms.image.v1 import image_pb2
from bms_image.common.errors import FailedPrecondition
from bms_image.common.model import DiskFormat
from bms_image.images.adapters.formats import (
    CONVERT_MEMORY_BYTES,
    MAX_VIRTUAL_BYTES,
    ContentInspector,
)
from support.builders import MiB, random_bytes
from support.errors import RichError, decode
from support.tokens import Metadata

pytestmark = dp.needs_qemu_img

#: Hang guard of one upload: before the bound, the 1 TiB qcow2 was
#: converted and its terabyte of zeros hashed, which takes hours.
UPLOAD_GUARD = 60.0


def qcow2(directory: Path, name: str, size: str, content: bytes = b"") -> Path:
    path = directory / name
    if content:
        raw = directory / f"{name}.raw"
        raw.write_bytes(content)
        dp.qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(path))
    else:
        dp.qemu_img("create", "-q", "-f", "qcow2", str(path), size)
    return path


async def refused_and_killed(
    own: dp.OwnService, md: Metadata, content: bytes, reason: str, within: float | None = None
) -> RichError:
    """An upload of `content` to a new image of `own` refused with
    FAILED_PRECONDITION `reason`; the image is KILLED and clean."""
    killed = await dp.killed_upload(
        own.images,
        md,
        own.data_dir,
        content,
        grpc.StatusCode.FAILED_PRECONDITION,
        reason,
        within=within,
    )
    return killed.error


def qemu_img_processes_under(directory: Path) -> list[int]:
    """qemu-img processes whose arguments name a file under `directory`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"qemu-img" in arg for arg in argv[:6]) and any(
            str(directory).encode() in arg for arg in argv
        ):
            found.append(int(entry.name))
    return found


async def test_a_small_qcow2_claiming_1_tib_is_too_large(tmp_path: Path) -> None:
    """With the default settings: 1 TiB is within BMS_IMAGE_MAX_IMAGE_BYTES
    (1 TiB) but over BMS_IMAGE_MAX_VIRTUAL_BYTES (256 GiB)."""
    big = qcow2(tmp_path, "1t.qcow2", "1T")
    assert big.stat().st_size < 1 * MiB
    async with dp.own_service(tmp_path / "service") as own:
        md = own.metadata("alpha")
        rich = await refused_and_killed(
            own, md, big.read_bytes(), "IMAGE_TOO_LARGE", within=UPLOAD_GUARD
        )
        assert "BMS_IMAGE_MAX_VIRTUAL_BYTES" in rich.status.message
        assert str(MAX_VIRTUAL_BYTES) in rich.status.message


async def test_max_virtual_bytes_is_a_setting(tmp_path: Path) -> None:
    over = qcow2(tmp_path, "3m.qcow2", "", random_bytes(3 * MiB))
    fits = qcow2(tmp_path, "1m.qcow2", "", random_bytes(MiB))
    async with dp.own_service(tmp_path / "service", max_virtual_bytes=2 * MiB) as own:
        md = own.metadata("alpha")
        await refused_and_killed(own, md, over.read_bytes(), "IMAGE_TOO_LARGE")
        accepted = await dp.create_image(own.images, md, display_name="fits")
        active = await dp.upload(own.images, md, accepted.name, fits.read_bytes())
        assert (active.status, active.size_bytes) == (dp.ACTIVE, MiB)


async def test_a_raw_disk_the_staging_area_cannot_hold_is_refused(tmp_path: Path) -> None:
    """Limits raised far above the free space: the free space decides."""
    space = os.statvfs(tmp_path)
    free = space.f_bavail * space.f_frsize
    claimed = (free * 2 // MiB + 1) * MiB
    huge = qcow2(tmp_path, "huge.qcow2", str(claimed))
    async with dp.own_service(
        tmp_path / "service", max_virtual_bytes=2**62, max_image_bytes=2**62
    ) as own:
        md = own.metadata("alpha")
        created = await dp.create_image(own.images, md)
        rich = await dp.expect_error(
            asyncio.wait_for(
                dp.upload(own.images, md, created.name, huge.read_bytes()), UPLOAD_GUARD
            ),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "STAGING_SPACE_EXHAUSTED",
        )
        quota_failure = decode(rich.error).quota_failure  # support.errors.decode checks it is there
        assert quota_failure is not None
        assert quota_failure.violations[0].subject == "staging area"
        # Like every lack of space, it keeps the upload: once space is freed,
        # a resume from uploaded_bytes (with no more bytes) converts it.
        image = await own.images.GetImage(image_pb2.GetImageRequest(name=created.name), metadata=md)
        assert image.status == image_pb2.IMAGE_STATUS_QUEUED
        assert image.uploaded_bytes == len(huge.read_bytes())


async def test_a_conversion_over_the_timeout_is_killed(tmp_path: Path) -> None:
    """A timeout no qemu-img can meet (it takes longer to start)."""
    disk = qcow2(tmp_path, "disk.qcow2", "", random_bytes(4 * MiB))
    async with dp.own_service(tmp_path / "service", convert_timeout_seconds=0.001) as own:
        md = own.metadata("alpha")
        rich = await refused_and_killed(own, md, disk.read_bytes(), "IMAGE_CONVERSION_TIMEOUT")
        assert "BMS_IMAGE_CONVERT_TIMEOUT_SECONDS" in rich.status.message
        assert qemu_img_processes_under(own.data_dir) == []


async def test_a_vmdk_header_without_its_descriptor_is_refused(tmp_path: Path) -> None:
    """oslo.utils cannot check it (it raised ImageFormatError, answered INTERNAL)."""
    header = struct.pack(
        "<4sIIQQQQIQQQBccccH",
        b"KDMV", 1, 3, 2**40, 128, 1, 2**40, 512, 0, 0, 0, 0, b"\n", b" ", b"\r", b"\n", 0,
    ).ljust(4096, b"\0")  # fmt: skip
    async with dp.own_service(tmp_path / "service") as own:
        md = own.metadata("alpha")
        await refused_and_killed(own, md, header, "IMAGE_UNSAFE")


# -- the conversion itself, with a qemu-img that never ends ---------------------------------------


def stuck_qemu_img(directory: Path) -> Path:
    """A stand-in for qemu-img that records its pid and limits, then hangs."""
    script = directory / "stuck-qemu-img"
    script.write_text(
        "#!/bin/sh\n"
        f"cat /proc/self/limits > {directory}/limits\n"
        f"echo $$ > {directory}/pid.tmp && mv {directory}/pid.tmp {directory}/pid\n"
        "exec sleep 600\n"
    )
    script.chmod(0o755)
    return script


async def started_pid(directory: Path, within: float = 20.0) -> int:
    deadline = time.monotonic() + within
    while not (directory / "pid").exists():
        assert time.monotonic() < deadline, "the stand-in qemu-img never started"
        await asyncio.sleep(0.02)
    return int((directory / "pid").read_text())


def assert_gone(pid: int) -> None:
    """Killed and reaped: no such process (not even a zombie)."""
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def limit(limits: str, name: str) -> str:
    (line,) = [line for line in limits.splitlines() if line.startswith(name)]
    return line[len(name) :].split()[0]


@pytest.mark.parametrize("prlimit", ["binary", "preexec_fn"])
async def test_qemu_img_is_killed_when_its_upload_is_cancelled(
    tmp_path: Path, prlimit: str
) -> None:
    source = qcow2(tmp_path, "disk.qcow2", "", random_bytes(MiB))
    target = tmp_path / "disk.raw"
    inspector = ContentInspector(
        str(stuck_qemu_img(tmp_path)),
        max_virtual_bytes=64 * MiB,
        timeout_seconds=600,
        **({"prlimit": None} if prlimit == "preexec_fn" else {}),
    )
    converting = asyncio.create_task(
        inspector.convert_to_raw(source, DiskFormat.QCOW2, target, "images/x")
    )
    pid = await started_pid(tmp_path)
    converting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await converting
    assert_gone(pid)
    assert not target.exists()
    limits = (tmp_path / "limits").read_text()
    assert limit(limits, "Max address space") == str(CONVERT_MEMORY_BYTES)
    assert limit(limits, "Max file size") == str(64 * MiB)
    assert limit(limits, "Max cpu time") == "600"


async def test_qemu_img_is_killed_on_timeout(tmp_path: Path) -> None:
    source = qcow2(tmp_path, "disk.qcow2", "", random_bytes(MiB))
    inspector = ContentInspector(str(stuck_qemu_img(tmp_path)), timeout_seconds=1.0)
    with pytest.raises(FailedPrecondition) as caught:
        await asyncio.wait_for(
            inspector.convert_to_raw(source, DiskFormat.QCOW2, tmp_path / "x.raw", "images/x"),
            UPLOAD_GUARD,
        )
    assert caught.value.reason == "IMAGE_CONVERSION_TIMEOUT"
    assert_gone(await started_pid(tmp_path))
