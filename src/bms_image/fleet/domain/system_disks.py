"""The provisioner's own record of what makes up a server's system disk.

A disk's bytes may be a tenant's, so what a disk is made of is never read
from them: the fleet keeps this record in its database, where another
provisioner finds it too. Host paths are derived from it alone, and every
part of it is checked to be one of our own names: a uuid, a SHA-256 digest,
a file name the fleet generated."""

from __future__ import annotations

import enum
import re
import secrets
import uuid
from dataclasses import dataclass

#: The file name of a local system disk inside its server's directory.
LOCAL_DISK_FILE = "system.disk"
_SHA256 = re.compile(r"^[0-9a-f]{64}\Z")
_OVERLAY_FILE = re.compile(r"^overlay-[0-9a-f]{32}\.disk\Z")


class DiskKind(enum.StrEnum):
    #: A copy of the image on the server's own disk.
    LOCAL = "local"
    #: An EVS clone: the cached image (read-only) under an overlay of its own.
    EVS = "evs"


class InvalidDiskRecord(ValueError):
    """A record that names anything but our own ids and file names."""


def is_sha256(text: str) -> bool:
    return bool(_SHA256.match(text))


def is_uuid(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False


def new_overlay_file() -> str:
    """A fresh overlay file name: each EVS clone writes only to its own."""
    return f"overlay-{secrets.token_hex(16)}.disk"


@dataclass(frozen=True)
class SystemDisk:
    """Local: the server's `system.disk`. EVS: the cache entry of image
    `base_image_id` with SHA-256 `base_sha256` (never written) under the
    overlay `top` in the server's directory."""

    kind: DiskKind
    top: str
    base_image_id: str = ""
    base_sha256: str = ""

    def __post_init__(self) -> None:
        if self.kind is DiskKind.LOCAL:
            valid = self.top == LOCAL_DISK_FILE and not self.base_image_id and not self.base_sha256
        else:
            valid = (
                bool(_OVERLAY_FILE.match(self.top))
                and is_uuid(self.base_image_id)
                and is_sha256(self.base_sha256)
            )
        if not valid:
            raise InvalidDiskRecord(f"not a system disk record of ours: {self!r}")

    @classmethod
    def local(cls) -> SystemDisk:
        return cls(DiskKind.LOCAL, LOCAL_DISK_FILE)

    @classmethod
    def evs(cls, image_id: str, sha256: str, overlay: str) -> SystemDisk:
        return cls(DiskKind.EVS, overlay, image_id, sha256)
