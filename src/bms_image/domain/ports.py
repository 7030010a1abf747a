"""What the domain needs from persistence. The store implements these."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .model import Caller, DiskFormat, Flavor, Image, ImageStatus
from .query import ImageQuery


class ImageRepository(Protocol):
    async def get(self, image_id: str) -> Image | None:
        """The stored image, deleted ones included; None if it never existed."""

    async def list_visible(
        self, caller: Caller, query: ImageQuery, after_seq: int, limit: int
    ) -> list[Image]:
        """Images the caller can see that match the query, by ascending seq."""

    async def find_by_request_id(self, project: str, request_id: str) -> Image | None:
        """The image a project created with this idempotency key, if any."""

    async def create_private(self, image: Image, quota_limit: int) -> Image:
        """Inserts a private image unless the owner already holds quota_limit
        counted images (QuotaExceeded), atomically with the count; returns the
        image of an earlier call with the same request_id instead, if any."""

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


class FlavorRepository(Protocol):
    async def list_flavors(self) -> list[Flavor]:
        """Every flavor, by name."""


@dataclass(frozen=True)
class Inspection:
    """What an uploaded file really is."""

    format: DiskFormat
    virtual_size: int


class Inspector(Protocol):
    async def inspect(self, path: Path, subject: str) -> Inspection:
        """Detects the content's format and virtual size; raises
        FailedPrecondition for unknown, unsupported or unsafe content."""

    async def convert_to_raw(self, source: Path, disk_format: DiskFormat, target: Path) -> None:
        """Writes the raw disk that source (in disk_format) describes."""
