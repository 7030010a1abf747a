"""The blob store interface every backend implements."""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

from bms_image.common.errors import QuotaExceeded, QuotaViolation, Unavailable

#: Bytes per chunk when streaming blobs out; downloads use the same size.
DEFAULT_CHUNK_BYTES = 1024 * 1024


_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_storage_full(error: OSError) -> bool:
    """ENOSPC (the file system is full) or EDQUOT (the user's quota is)."""
    return error.errno in _FULL_ERRNOS


def storage_full(storage: str) -> QuotaExceeded:
    """The domain error for a full file system or bucket: it names the kind
    of storage (`staging area`, `image store`), never a host path."""
    return QuotaExceeded(
        "STORAGE_FULL",
        f"the service's {storage} is full; retry later (an administrator must free space)",
        [QuotaViolation(f"storage/{storage.replace(' ', '-')}", "no space left")],
    )


def store_unavailable() -> Unavailable:
    """The domain error for a blob store that cannot be reached (refused or
    timed-out connections, 5xx answers): retryable, and its text is fixed so
    that no backend message, host name or key reaches a client."""
    return Unavailable(
        "BLOB_STORE_UNAVAILABLE", "the image store cannot be reached now; retry later"
    )


#: The object (or file) under a store's prefix that names the deployment
#: owning it. Keys never start with ".", so it is never taken for a blob.
DEPLOYMENT_MARKER = ".bms-image-deployment"


class PrefixOwned(Exception):
    """The store's prefix (or directory) belongs to another deployment."""

    def __init__(self, owner: str) -> None:
        super().__init__(f"owned by deployment {owner!r}")
        self.owner = owner


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

    async def claim(self, deployment: str) -> None:
        """Marks the store's prefix as this deployment's, unless it is
        already; raises PrefixOwned if another deployment marked it. Every
        blob under a claimed prefix is this deployment's, so its orphan sweep
        deletes only what this deployment wrote. An unmarked prefix (a store
        from before markers) is claimed by the first deployment that starts
        on it."""
