"""What the image service's use cases drive: persistence (the store
implements the repositories), the blob store, the staging area of uploads,
the release of an image's bytes, the content inspector and the fleet's
captures. Adapters implement these; the bootstrap wires them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Collection, Mapping
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
from bms_image.images.domain.query import ImageQuery, ListedImage


class ImageRepository(Protocol):
    async def get(self, image_id: str) -> Image | None:
        """The stored image, deleted ones included; None if it never existed."""

    async def get_recent(self, image_id: str) -> Image | None:
        """Like get, but may answer from memory: current for this process's
        own changes, a little behind (seconds) for another process's."""

    async def list_visible(
        self,
        caller: Caller,
        query: ImageQuery,
        after_seq: int,
        limit: int,
        known: Callable[[ListedImage], bool] | None = None,
    ) -> tuple[list[ListedImage], list[Image]]:
        """Images the caller can see that match the query, by ascending seq,
        and, read in the same unit of work, the images of those for which
        `known` is false (all of them without `known`). `known` may be called
        from another thread: it must only read."""

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
    async def inspect(self, pieces: AsyncIterator[bytes], size: int, subject: str) -> Inspection:
        """Detects the format and virtual size of content of `size` bytes
        read from `pieces` (only as far as it needs: it closes them); raises
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

    async def intact(self, key: str) -> bool:
        """Whether every part of the key's bytes is there (present, not
        re-hashed: a read checks the bytes); False for an absent blob."""

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


class StagedBytes(Protocol):
    """One upload's staged bytes, open for appending and hashing as they
    go, made durable piece by piece where any process can resume them.
    After `close`, `size` counts the durable bytes: what a resume may
    continue from."""

    @property
    def size(self) -> int:
        """Bytes written (the durable ones after close)."""

    def hexdigest(self) -> str:
        """SHA-256 (hex) of the bytes staged (complete after close)."""

    async def write(self, chunk: bytes) -> None:
        """Appends a chunk; it may still be in flight when this returns
        (drain waits for every one). A failure breaks the upload: STORAGE_FULL
        (QuotaExceeded) for a full store, NotFound when the image's staged
        bytes were discarded meanwhile (it was deleted), OSError otherwise."""

    async def drain(self) -> None:
        """Waits for every chunk handed to write; raises the first failure.
        Call it on every path, failures included."""

    async def close(self) -> None:
        """Makes what was written durable; safe to call again. Raises what
        kept the bytes from being made durable (`size` then counts those
        that are)."""

    def read(self) -> AsyncIterator[bytes]:
        """The staged bytes from the first on (after close), verified."""

    async def materialize(self, path: Path) -> None:
        """Writes the staged bytes into a local file (for a converter)."""

    async def commit(self, key: str) -> None:
        """The staged bytes become the blob store's blob under key, as
        they are; NotFound if they were discarded meanwhile."""


class ByteStaging(Protocol):
    """Where uploads in progress keep their bytes, across broken streams,
    restarts and processes, so that they can resume; plus local scratch
    files for what needs a file (a conversion)."""

    async def open(self, key: str, offset: int) -> StagedBytes:
        """The upload's staged bytes, resumed at offset (its first `offset`
        bytes hashed again, anything past them dropped). Raises
        common.errors.StagedBytesMissing when fewer bytes are staged."""

    async def size(self, key: str) -> int:
        """Bytes staged durably under key (0 if none)."""

    def scratch(self, key: str, suffix: str) -> Path:
        """A local scratch file for the upload (e.g. its conversion to raw)."""

    async def digest(self, path: Path) -> tuple[str, int]:
        """SHA-256 (hex) and size of a scratch file."""

    async def discard(self, key: str) -> None:
        """Removes the staged bytes and scratch files of key."""

    async def discard_scratch(self, key: str) -> None:
        """Removes the scratch files of key but keeps its staged bytes."""

    async def keys(self) -> list[str]:
        """Every key with staged bytes or scratch files."""


class ByteRelease(Protocol):
    """Removes every byte stored for a deleted image (its blob and any staged
    upload); what the catalog calls when it deletes an image."""

    async def __call__(self, image_id: str) -> None: ...
