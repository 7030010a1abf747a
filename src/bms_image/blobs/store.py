"""The blob store interface every backend implements."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

#: Bytes per chunk when streaming blobs out; downloads use the same size.
DEFAULT_CHUNK_BYTES = 1024 * 1024


class BlobNotFound(Exception):
    """The blob store has no blob under this key."""


class BlobStore(Protocol):
    """Immutable blobs under string keys. A blob is either absent or whole:
    `put_file` never leaves a partial blob under its key, even on a crash."""

    name: str

    async def put_file(self, key: str, path: Path) -> None:
        """Stores the file's bytes under key (replacing any blob there). The
        file may be moved away, not only copied."""

    def read(
        self, key: str, offset: int = 0, chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ) -> AsyncIterator[bytes]:
        """Streams the blob from offset on; raises BlobNotFound if absent."""

    async def size(self, key: str) -> int:
        """Size in bytes; raises BlobNotFound if absent."""

    async def copy(self, source_key: str, target_key: str) -> None:
        """Stores a copy of one blob under another key."""

    async def delete(self, key: str) -> None:
        """Removes the blob; no error if it is already gone."""

    async def keys(self) -> list[str]:
        """Every key stored (for collecting orphans)."""

    async def ping(self) -> None:
        """Raises if the backend cannot be reached."""
