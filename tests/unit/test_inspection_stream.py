"""The content inspector reads a staged upload only as far as it must:
the head of a raw disk decides its format, and the rest is never read back
(README "Chunk store", "Uploads")."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest

from bms_image.common.model import DiskFormat
from bms_image.images.adapters.formats import ContentInspector

pytestmark = pytest.mark.asyncio

MiB = 1024 * 1024


async def test_a_raw_upload_is_decided_from_its_head_and_the_rest_is_not_read() -> None:
    read, closed = 0, False
    size = 64 * MiB

    async def pieces() -> AsyncIterator[bytes]:
        nonlocal read, closed
        try:
            for _ in range(size // MiB):
                read += 1
                yield os.urandom(MiB)
        finally:
            closed = True

    inspection = await ContentInspector().inspect(pieces(), size, "images/raw")

    assert inspection.format is DiskFormat.RAW
    assert inspection.virtual_size == size, "a raw disk's size is its bytes'"
    assert read <= 4, f"read {read} MiB of a raw upload to decide its format"
    assert closed, "the staged bytes were left open"
