"""What an uploaded file really is, and its conversion to raw.

Detection and safety checks use oslo.utils' format_inspector (the inspector
OpenStack Glance and Nova use): it reads headers, never trusts the name, and
flags QCOW2 backing files, external data files and the like. Conversion uses
`qemu-img convert`, run only on files that passed those checks."""

from __future__ import annotations

import asyncio
import functools
import json
import math
import os
import resource
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from oslo_utils.imageutils import format_inspector

from bms_image.common.errors import (
    FailedPrecondition,
    PreconditionViolation,
    QuotaExceeded,
    QuotaViolation,
)
from bms_image.common.model import DiskFormat
from bms_image.images.domain.ports import Inspection

#: Inspector names -> our formats. A raw disk with a GPT label is still raw.
_FORMATS = {
    "raw": DiskFormat.RAW,
    "gpt": DiskFormat.RAW,
    "qcow2": DiskFormat.QCOW2,
    "vmdk": DiskFormat.VMDK,
    "vhd": DiskFormat.VHD,
    "vhdx": DiskFormat.VHDX,
}


#: qemu-img's driver names where they differ from ours.
_QEMU_DRIVERS = {DiskFormat.VHD: "vpc"}


def _refuse(reason: str, subject: str, description: str) -> FailedPrecondition:
    return FailedPrecondition(
        reason, f"{subject}: {description}", [PreconditionViolation(reason, subject, description)]
    )


class _Feed:
    """What an InspectWrapper reads from: the piece handed to it last."""

    def __init__(self) -> None:
        self.piece = b""

    def read(self, size: int) -> bytes:
        piece, self.piece = self.piece, b""
        return piece


class HeaderInspection:
    """The inspector fed piece by piece, as the bytes are read: every
    format's inspector at once, until each has matched or is sure it does
    not (a few MiB at most for real images). The inspector reads only the
    regions each format's header names, each bounded by a constant of
    oslo.utils (a VMDK descriptor at most 1 MiB, VHDX region and metadata
    tables at most 2,047 entries and 64 KiB, the others a few KiB), never a
    length the content claims; so a hostile header costs little memory
    whatever it says. Blocking: feed it off the event loop."""

    def __init__(self) -> None:
        self._feed = _Feed()
        self._wrapper = format_inspector.InspectWrapper(self._feed)  # type: ignore[arg-type]

    def feed(self, piece: bytes) -> bool:
        """Inspects the next piece; True once the format is decided."""
        self._feed.piece = piece
        self._wrapper.read(len(piece))
        try:
            return self._wrapper.format is not None
        except format_inspector.ImageFormatError:
            return True  # ambiguous: result() says so

    def result(self, size: int, subject: str) -> Inspection:
        """What the content of `size` bytes is; FailedPrecondition for
        unknown, ambiguous, unsupported or unsafe content."""
        self._wrapper.close()
        try:
            inspector = self._wrapper.format
        except format_inspector.ImageFormatError as error:
            raise _refuse(
                "IMAGE_FORMAT_UNKNOWN", subject, f"content format is ambiguous: {error}"
            ) from None
        if inspector is None:
            raise _refuse("IMAGE_FORMAT_UNKNOWN", subject, "content format could not be detected")
        name = inspector.NAME
        if name not in _FORMATS:
            raise _refuse(
                "IMAGE_FORMAT_UNSUPPORTED",
                subject,
                f"content is {name}; supported formats are raw, qcow2, vmdk, vhd and vhdx",
            )
        try:
            inspector.safety_check()
        except format_inspector.SafetyCheckFailed as error:
            failures = "; ".join(f"{check}: {why}" for check, why in error.failures.items())
            raise _refuse(
                "IMAGE_UNSAFE", subject, f"unsafe {name} image refused ({failures})"
            ) from None
        except format_inspector.ImageFormatError as error:  # e.g. a VMDK without its descriptor
            raise _refuse(
                "IMAGE_UNSAFE", subject, f"{name} image refused: it cannot be checked ({error})"
            ) from None
        disk_format = _FORMATS[name]
        if disk_format is DiskFormat.RAW:
            return Inspection(disk_format, size)  # the inspector saw only the head
        try:
            virtual_size = int(inspector.virtual_size)
        except Exception:  # a header the inspector matched but cannot read a size from
            raise _refuse(
                "IMAGE_FORMAT_UNKNOWN", subject, f"the {name} header names no readable virtual size"
            ) from None
        return Inspection(disk_format, virtual_size)


_FILE_PIECE_BYTES = 64 * 1024


def _inspect(path: Path, subject: str) -> Inspection:
    """A local file's inspection (HeaderInspection). Blocking."""
    inspection = HeaderInspection()
    with open(path, "rb") as handle:
        while piece := handle.read(_FILE_PIECE_BYTES):
            if inspection.feed(piece):
                break
        size = os.fstat(handle.fileno()).st_size
    return inspection.result(size, subject)


def _without_paths(text: str, *paths: Path) -> str:
    """qemu-img names the files it read; clients must not learn server paths."""
    for path in paths:
        text = text.replace(str(path), "the image")
    return text.strip()


#: What qemu-img may use: address space and, by default, wall-clock seconds.
#: Its buffers, coroutine and thread stacks need a few hundred MiB at most
#: once glibc keeps to two malloc arenas (_CHILD_ENV); with glibc's default
#: of 8 per core, 64 MiB of address space each, even 1 GiB failed at times
#: ("qemu_thread_create: Resource temporarily unavailable").
CONVERT_MEMORY_BYTES = 2 * 1024**3
CONVERT_TIMEOUT_SECONDS = 1800.0
#: The largest raw disk a conversion may produce (BMS_IMAGE_MAX_VIRTUAL_BYTES).
MAX_VIRTUAL_BYTES = 256 * 1024**3
#: What of qemu-img's output and errors is kept (the rest is read and dropped).
_STDOUT_BYTES = 1024 * 1024
_STDERR_BYTES = 64 * 1024


def _set_limits(memory_bytes: int, file_bytes: int, cpu_seconds: int) -> None:
    """In the child, before exec, when there is no prlimit binary."""
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))


async def _read_bounded(stream: asyncio.StreamReader, limit: int) -> bytes:
    kept = bytearray()
    while chunk := await stream.read(65536):
        kept += chunk[: max(0, limit - len(kept))]
    return bytes(kept)


class ContentInspector:
    """Detects formats and converts to raw, off the event loop.

    The image's header is the caller's: a 200 KiB qcow2 may claim a 1 TiB
    disk. So a conversion is refused before qemu-img runs when the raw disk
    it would write is larger than max_virtual_bytes (FAILED_PRECONDITION
    IMAGE_TOO_LARGE) or than the free space where it would be written
    (RESOURCE_EXHAUSTED STAGING_SPACE_EXHAUSTED: the service's resource, not
    the caller's fault, and worth retrying once space is freed). qemu-img then
    runs under resource limits (address space, the largest file it may write,
    CPU seconds) and a wall-clock timeout, and is killed when it exceeds them
    or when the upload that waits for it is cancelled."""

    def __init__(
        self,
        qemu_img: str | None = None,
        *,
        max_virtual_bytes: int = MAX_VIRTUAL_BYTES,
        timeout_seconds: float = CONVERT_TIMEOUT_SECONDS,
        memory_bytes: int = CONVERT_MEMORY_BYTES,
        prlimit: str | None = shutil.which("prlimit"),
    ) -> None:
        """`prlimit`: util-linux's binary, which sets the limits and exec's
        qemu-img; without one (None) the limits are set by a preexec_fn."""
        self._qemu_img = qemu_img or shutil.which("qemu-img")
        self._prlimit = prlimit
        self.max_virtual_bytes = max_virtual_bytes
        self.timeout_seconds = timeout_seconds
        self.memory_bytes = memory_bytes

    async def inspect(self, pieces: AsyncIterator[bytes], size: int, subject: str) -> Inspection:
        header = HeaderInspection()
        try:
            async for piece in pieces:
                if await asyncio.to_thread(header.feed, piece):
                    break
        finally:
            aclose = getattr(pieces, "aclose", None)
            if aclose is not None:
                await aclose()
        inspection = await asyncio.to_thread(header.result, size, subject)
        if inspection.format is not DiskFormat.RAW:
            self._require_convertible(inspection, subject)
        return inspection

    def _require_convertible(self, inspection: Inspection, subject: str) -> None:
        if inspection.virtual_size > self.max_virtual_bytes:
            raise FailedPrecondition(
                "IMAGE_TOO_LARGE",
                f"{subject}: the {inspection.format.value} image claims a virtual size of "
                f"{inspection.virtual_size} bytes; its raw disk may have at most "
                f"{self.max_virtual_bytes} (BMS_IMAGE_MAX_VIRTUAL_BYTES)",
                [PreconditionViolation("SIZE", subject, "virtual size over the limit")],
            )

    async def convert_to_raw(
        self, source: Path, disk_format: DiskFormat, target: Path, subject: str
    ) -> None:
        if self._qemu_img is None:
            raise _refuse(
                "CONVERTER_MISSING",
                "qemu-img",
                f"{disk_format.value} images need qemu-img (Debian package qemu-utils) to convert",
            )
        driver = _QEMU_DRIVERS.get(disk_format, disk_format.value)
        # The size qemu-img itself reads from the header is the one it will
        # write, whatever the inspector made of that header: both are bounded.
        inspection = await asyncio.to_thread(_inspect, source, subject)
        self._require_convertible(inspection, subject)
        code, out, err = await self._run(
            subject, disk_format, "info", "--output=json", "-f", driver, str(source)
        )
        if code != 0:
            raise self._failed(subject, disk_format, code, err, source, target)
        try:
            virtual_size = int(json.loads(out)["virtual-size"])
        except (ValueError, KeyError, TypeError):
            raise self._failed(subject, disk_format, 0, b"no virtual size", source) from None
        raw = Inspection(inspection.format, max(virtual_size, inspection.virtual_size))
        self._require_convertible(raw, subject)
        space = await asyncio.to_thread(os.statvfs, target.parent)
        free = space.f_bavail * space.f_frsize
        if raw.virtual_size > free:
            raise QuotaExceeded(
                "STAGING_SPACE_EXHAUSTED",
                f"{subject}: its raw disk needs {raw.virtual_size} bytes and the staging "
                f"area has {free} free; try again later",
                [QuotaViolation("staging area", "not enough free space for the raw disk")],
            )
        try:
            code, _, err = await self._run(
                subject, disk_format, "convert", "-q", "-f", driver, "-O", "raw",
                str(source), str(target),
            )  # fmt: skip
            if code != 0:
                raise self._failed(subject, disk_format, code, err, source, target)
        except BaseException:  # failed, timed out or cancelled: no partial raw disk stays
            await asyncio.shield(asyncio.to_thread(target.unlink, missing_ok=True))
            raise

    def _failed(
        self,
        subject: str,
        disk_format: DiskFormat,
        code: int,
        stderr: bytes,
        *paths: Path,
    ) -> FailedPrecondition:
        said = _without_paths(stderr.decode(errors="replace"), *paths)[:300]
        return _refuse(
            "IMAGE_CONVERSION_FAILED",
            subject,
            f"qemu-img could not convert the {disk_format.value} image: "
            + (said or f"it ended with status {code}"),
        )

    async def _run(
        self, subject: str, disk_format: DiskFormat, *arguments: str
    ) -> tuple[int, bytes, bytes]:
        """qemu-img with `arguments` under the limits: (exit status, the
        first MiB of its output, the first 64 KiB of its errors). It is killed
        (and waited for) when it overruns the timeout, raising
        IMAGE_CONVERSION_TIMEOUT, or when the caller is cancelled."""
        assert self._qemu_img is not None
        file_bytes = max(self.max_virtual_bytes, 1)
        cpu_seconds = max(1, math.ceil(self.timeout_seconds))
        command = [self._qemu_img, *arguments]
        preexec: Callable[[], None] | None = None
        if self._prlimit is not None:  # it exec's qemu-img itself: the pid stays the same
            command = [
                self._prlimit,
                f"--as={self.memory_bytes}",
                f"--fsize={file_bytes}",
                f"--cpu={cpu_seconds}",
                "--",
                *command,
            ]
        else:
            preexec = functools.partial(_set_limits, self.memory_bytes, file_bytes, cpu_seconds)
        process = await asyncio.create_subprocess_exec(
            *command,
            env={**os.environ, "MALLOC_ARENA_MAX": "2"},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=preexec,
        )
        assert process.stdout is not None and process.stderr is not None
        try:
            async with asyncio.timeout(self.timeout_seconds):
                out, err = await asyncio.gather(
                    _read_bounded(process.stdout, _STDOUT_BYTES),
                    _read_bounded(process.stderr, _STDERR_BYTES),
                )
                code = await process.wait()
        except TimeoutError:
            raise _refuse(
                "IMAGE_CONVERSION_TIMEOUT",
                subject,
                f"qemu-img did not convert the {disk_format.value} image within "
                f"{self.timeout_seconds:g} seconds (BMS_IMAGE_CONVERT_TIMEOUT_SECONDS)",
            ) from None
        finally:  # timed out, or cancelled with its upload: never left running
            if process.returncode is None:
                process.kill()
                await asyncio.shield(process.wait())
        return code, out, err
