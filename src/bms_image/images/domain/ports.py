"""What the domain needs from persistence. The store implements these."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bms_image.common.model import (
    Caller,
    CaptureSource,
    DiskFormat,
    Image,
    ImageStatus,
    Member,
    MemberStatus,
    RequestMethod,
)
from bms_image.images.domain.query import ImageQuery


class ImageRepository(Protocol):
    async def get(self, image_id: str) -> Image | None:
        """The stored image, deleted ones included; None if it never existed."""

    async def get_recent(self, image_id: str) -> Image | None:
        """Like get, but may answer from memory: current for this process's
        own changes, a little behind (seconds) for another process's."""

    async def list_visible(
        self, caller: Caller, query: ImageQuery, after_seq: int, limit: int
    ) -> list[Image]:
        """Images the caller can see that match the query, by ascending seq."""

    async def find_by_request_id(
        self, project: str, method: RequestMethod, request_id: str
    ) -> Image | None:
        """The image a project's call of this RPC created with this
        idempotency key, if any (in whatever status it is now)."""

    async def create_private(self, image: Image, quota_limit: int) -> Image:
        """Inserts a private image unless the owner already holds quota_limit
        counted images (QuotaExceeded), atomically with the count; returns the
        image of an earlier call with the same creator project, request_method
        and request_id instead, if any (in whatever status it is now)."""

    async def create_public(self, image: Image) -> Image:
        """Inserts a public image with its supported flavors."""

    async def update(
        self, image_id: str, expected_revision: int, changes: Mapping[str, Any]
    ) -> Image | None:
        """Applies changes if the revision still matches; None if it does not."""

    async def transition(
        self, image_id: str, from_statuses: Collection[ImageStatus], changes: Mapping[str, Any]
    ) -> Image | None:
        """Applies changes if the image is in one of from_statuses; None if not."""

    async def in_statuses(self, statuses: Collection[ImageStatus]) -> list[Image]:
        """Every image in one of these statuses (for recovery after a restart)."""

    async def count_quota_used(self, project: str) -> int:
        """Private images of the project that hold a quota slot."""


class MemberRepository(Protocol):
    async def get(self, image_id: str, project: str) -> Member | None:
        """The project's membership of the image, if any."""

    async def list(
        self, image_id: str, after_project: str, limit: int, only_project: str | None = None
    ) -> list[Member]:
        """Members ordered by project, after after_project; only one if asked."""

    async def add(self, image_id: str, project: str, limit: int) -> Member:
        """Adds a PENDING member unless it exists (then returns it unchanged);
        QuotaExceeded when the image already has `limit` members. Atomic."""

    async def set_status(self, image_id: str, project: str, status: MemberStatus) -> Member | None:
        """Changes the member's status; None if there is no such member."""

    async def remove(self, image_id: str, project: str) -> bool:
        """Removes the member; False if there was none."""


@dataclass(frozen=True)
class Inspection:
    """What an uploaded file really is."""

    format: DiskFormat
    virtual_size: int


class Inspector(Protocol):
    async def inspect(self, path: Path, subject: str) -> Inspection:
        """Detects the content's format and virtual size; raises
        FailedPrecondition for unknown, unsupported or unsafe content."""

    async def convert_to_raw(
        self, source: Path, disk_format: DiskFormat, target: Path, subject: str
    ) -> None:
        """Writes the raw disk that source (in disk_format) describes."""


class CaptureProvider(Protocol):
    """The fleet, as the catalog needs it to capture a server into an image."""

    async def prepare_capture(self, caller: Caller, token: str, server_id: str) -> CaptureSource:
        """Checks the server (owned, stopped, plug-ins intact) and holds it.
        `token` is the caller's, for a fleet that runs in another process."""

    async def start_capture(self, token: str, server_id: str, image_id: str) -> None:
        """Starts uploading the disk into the image; returns at once."""

    async def release_capture(self, token: str, server_id: str) -> None:
        """Lets go of a server held by prepare_capture that will not be captured."""
