"""What the domain needs from persistence. The store implements these."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from .model import Caller, Flavor, Image
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

    async def count_quota_used(self, project: str) -> int:
        """Private images of the project that hold a quota slot."""


class FlavorRepository(Protocol):
    async def list_flavors(self) -> list[Flavor]:
        """Every flavor, by name."""
