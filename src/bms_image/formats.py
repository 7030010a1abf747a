"""What an uploaded file really is, and its conversion to raw.

Detection and safety checks use oslo.utils' format_inspector (the inspector
OpenStack Glance and Nova use): it reads headers, never trusts the name, and
flags QCOW2 backing files, external data files and the like. Conversion uses
`qemu-img convert`, run only on files that passed those checks."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from oslo_utils.imageutils import format_inspector

from .domain.errors import FailedPrecondition, PreconditionViolation
from .domain.model import DiskFormat
from .domain.ports import Inspection

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


def _inspect(path: Path, subject: str) -> Inspection:
    try:
        inspector = format_inspector.detect_file_format(str(path))
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
    return Inspection(_FORMATS[name], int(inspector.virtual_size))


def _without_paths(text: str, *paths: Path) -> str:
    """qemu-img names the files it read; clients must not learn server paths."""
    for path in paths:
        text = text.replace(str(path), "the image")
    return text.strip()


class ContentInspector:
    """Detects formats and converts to raw, off the event loop."""

    def __init__(self, qemu_img: str | None = None) -> None:
        self._qemu_img = qemu_img or shutil.which("qemu-img")

    async def inspect(self, path: Path, subject: str) -> Inspection:
        return await asyncio.to_thread(_inspect, path, subject)

    async def convert_to_raw(
        self, source: Path, disk_format: DiskFormat, target: Path, subject: str
    ) -> None:
        if self._qemu_img is None:
            raise _refuse(
                "CONVERTER_MISSING",
                "qemu-img",
                f"{disk_format.value} images need qemu-img (Debian package qemu-utils) to convert",
            )
        process = await asyncio.create_subprocess_exec(
            self._qemu_img, "convert", "-q",
            "-f", _QEMU_DRIVERS.get(disk_format, disk_format.value), "-O", "raw",
            str(source), str(target),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, stderr = await process.communicate()
        if process.returncode != 0:
            await asyncio.to_thread(target.unlink, missing_ok=True)
            raise _refuse(
                "IMAGE_CONVERSION_FAILED",
                subject,
                f"qemu-img could not convert the {disk_format.value} image: "
                + _without_paths(stderr.decode(errors="replace"), source, target)[:300],
            )
