"""What every blob store backend shares beyond the BlobStore port (which the
domain defines, in images.domain.ports)."""

from __future__ import annotations

from bms_image.common.errors import Unavailable, is_storage_full, storage_full
from bms_image.images.domain.ports import DEFAULT_CHUNK_BYTES, BlobNotFound, BlobStore

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEPLOYMENT_MARKER",
    "BlobNotFound",
    "BlobStore",
    "PrefixOwned",
    "is_storage_full",
    "storage_full",
    "store_unavailable",
]


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
