"""An upload's bytes staged durably in the chunk store (the ByteStaging
port): as they arrive they are cut into chunks and appended to the
incomplete manifest `upload-<image id>`, so that what is durable is in the
database and the blob store, and a resume continues at the last durable
chunk on any process that shares them (README "Chunk store", "Uploads").

Each batch of chunks is hashed (the image's SHA-256, in order, and each
chunk's BLAKE3 id) in a thread of the upload's own, then referenced and
stored; at most two batches are in flight, so memory stays bounded and the
event loop receives the next messages meanwhile. The tail of an upload that
ends or breaks off short of a chunk is stored as a short last chunk; a
resume reads it back, drops it and continues it.

Only what needs local files uses them: scratch files of a conversion
(`scratch`), under the scratch root (`<data dir>/staging`)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import os
from collections.abc import AsyncGenerator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bms_image.common.errors import (
    DataLoss,
    NotFound,
    StagedBytesMissing,
    is_storage_full,
    storage_full,
)
from bms_image.common.staging import Staging, sha256_of_file
from bms_image.images.adapters.chunks import manifests
from bms_image.images.adapters.chunks.chunking import Chunker
from bms_image.images.adapters.chunks.manifests import Manifest, ManifestGone
from bms_image.images.adapters.chunks.store import ChunkStore, identify

log = logging.getLogger(__name__)

#: Chunks cut, hashed and stored together: one database round and one
#: durable write of the backend per batch (8 MiB of 1 MiB chunks).
BATCH_CHUNKS = 8
#: Batches being hashed or stored at once for one upload.
BATCHES_IN_FLIGHT = 2
#: Legacy staging files (of versions that staged uploads whole on local disk).
_LEGACY_SUFFIX = ".part"
_READ_BYTES = 4 * 1024 * 1024


def _deleted(image_key: str) -> NotFound:
    return NotFound("IMAGE_NOT_FOUND", f"images/{image_key} was deleted during the upload")


def _hash(sha256: hashlib._Hash, chunks: Sequence[bytes]) -> list[str | None]:
    """Adds the chunks to the image's SHA-256 and returns their ids. Blocking."""
    for chunk in chunks:
        sha256.update(chunk)
    return identify(chunks)


class StagedChunks:
    """One upload's staged bytes, open for appending (StagedBytes)."""

    def __init__(
        self,
        store: ChunkStore,
        image_key: str,
        chunk_bytes: int,
        position: int,
        sha256: hashlib._Hash,
        head: bytes = b"",
    ) -> None:
        self._store = store
        self._image_key = image_key
        self._key = manifests.upload_key(image_key)
        self._chunk_bytes = chunk_bytes
        #: Position of the next chunk to cut.
        self._position = position
        self._chunker = Chunker(chunk_bytes, head)
        self._sha256 = sha256
        self._size = position * chunk_bytes + len(head)
        self._batches: collections.deque[asyncio.Task[None]] = collections.deque()
        self._failure: BaseException | None = None
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="upload-hasher")
        self._closing: asyncio.Future[None] | None = None

    @property
    def size(self) -> int:
        return self._size

    def hexdigest(self) -> str:
        return self._sha256.hexdigest()

    async def write(self, chunk: bytes) -> None:
        if self._failure is not None:
            raise self._translated(self._failure)
        self._chunker.add(chunk)
        self._size += len(chunk)
        if self._chunker.ready >= BATCH_CHUNKS:
            await self._submit(self._chunker.take())

    async def _submit(self, chunks: list[bytes]) -> None:
        position, self._position = self._position, self._position + len(chunks)
        self._batches.append(asyncio.ensure_future(self._store_batch(chunks, position)))
        while len(self._batches) >= BATCHES_IN_FLIGHT:
            await self._collect()

    async def _store_batch(self, chunks: list[bytes], position: int) -> None:
        loop = asyncio.get_running_loop()
        ids = await loop.run_in_executor(self._hasher, _hash, self._sha256, chunks)
        await self._store.append(self._key, chunks, position, ids)

    async def _collect(self) -> None:
        """Waits for the oldest batch (which goes on if the caller is
        cancelled: it stays in flight for `drain`); raises its failure."""
        oldest = self._batches[0]
        await asyncio.wait([oldest])
        self._batches.popleft()
        failure = oldest.exception()
        if failure is not None:
            self._failure = self._failure or failure
            raise self._translated(failure)

    def _translated(self, failure: BaseException) -> BaseException:
        if isinstance(failure, ManifestGone):
            return _deleted(self._image_key)
        return failure

    async def drain(self) -> None:
        first: BaseException | None = None
        while self._batches:
            try:
                await self._collect()
            except Exception as error:
                first = first or error
        if first is not None:
            raise first

    async def close(self) -> None:
        """Stores the tail (a short last chunk) and waits for every batch;
        safe to call again, and a second call (say, after the first was
        cancelled) waits for the same outcome. On a failure `size` becomes
        the durable prefix: what a resume may continue from."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        try:
            if self._failure is None and self._chunker.buffered:
                await self._submit(self._chunker.take(final=True))
            await self.drain()
            if self._failure is not None:  # a batch failed: what came after it is not durable
                raise self._translated(self._failure)
        except BaseException:
            self._chunker.clear()
            try:
                found = await self._store.durable_prefix(self._key)
                self._size = found[1] if found is not None else 0
            except Exception as error:  # the database is down too: nothing is known durable
                log.warning(
                    "reading the durable bytes of images/%s failed: %r", self._image_key, error
                )
                self._size = 0
            raise
        finally:
            self._hasher.shutdown(wait=False)

    def read(self) -> AsyncGenerator[bytes, None]:
        """The staged bytes, verified chunk by chunk (after close)."""
        found = Manifest(self._size, self._chunk_bytes)
        return self._store.read_manifest(self._key, found, subject=self._image_key)

    async def materialize(self, path: Path) -> None:
        """Writes the staged bytes into a local file (for a converter);
        STORAGE_FULL when the staging area has no room for them."""
        try:
            handle = await asyncio.to_thread(path.open, "wb")
            try:
                async with contextlib.aclosing(self.read()) as pieces:
                    async for piece in pieces:
                        await asyncio.to_thread(handle.write, piece)
            finally:
                await asyncio.to_thread(handle.close)
        except OSError as error:
            if is_storage_full(error):
                raise storage_full("staging area") from None
            raise

    async def commit(self, key: str) -> None:
        """The staged bytes become the blob of `key`, whole: no byte moves.
        NotFound if they were discarded meanwhile (the image was deleted)."""
        try:
            await self._store.finish(self._key, key, self._size)
        except ManifestGone:
            raise _deleted(self._image_key) from None


class ChunkStaging:
    """The ByteStaging port over the chunk store (see the module's doc)."""

    def __init__(self, store: ChunkStore, scratch: Staging) -> None:
        self._store = store
        self._scratch = scratch

    async def open(self, key: str, offset: int) -> StagedChunks:
        upload = manifests.upload_key(key)
        found = await self._store.durable_prefix(upload)
        if found is None:
            if offset:
                raise StagedBytesMissing(f"images/{key}", offset, 0)
            chunk_bytes = await self._store.ensure(upload)
            return StagedChunks(self._store, key, chunk_bytes, 0, hashlib.sha256())
        _, durable, chunk_bytes = found
        if durable < offset:
            raise StagedBytesMissing(f"images/{key}", offset, durable)
        first, head_bytes = divmod(offset, chunk_bytes)
        sha256, head = await self._rehash(upload, key, first * chunk_bytes, head_bytes, chunk_bytes)
        await self._store.truncate(upload, first)
        return StagedChunks(self._store, key, chunk_bytes, first, sha256, head)

    async def _rehash(
        self, upload: str, key: str, whole: int, head_bytes: int, chunk_bytes: int
    ) -> tuple[hashlib._Hash, bytes]:
        """The SHA-256 of the first `whole` bytes (read back and verified: a
        resume continues the digest) and the `head_bytes` after them (the
        head of the chunk a resume continues, hashed when it is cut)."""
        sha256 = hashlib.sha256()
        head = bytearray()
        found = Manifest(whole + head_bytes, chunk_bytes)
        pieces = self._store.read_manifest(upload, found, 0, chunk_bytes, subject=key)
        position = 0
        try:
            async with contextlib.aclosing(pieces):
                async for piece in pieces:
                    hashed = piece[: max(0, whole - position)]
                    if hashed:
                        await asyncio.to_thread(sha256.update, hashed)
                    head += piece[len(hashed) :]
                    position += len(piece)
        except DataLoss:
            # A chunk's bytes are missing or changed (the store was restored,
            # say): what is there ends before it. A resume from there drops it.
            position -= position % chunk_bytes
            log.warning("images/%s: staged bytes damaged after %d bytes", key, position)
            raise StagedBytesMissing(f"images/{key}", whole + head_bytes, position) from None
        head = head[:head_bytes]
        if position < whole + head_bytes:
            raise StagedBytesMissing(f"images/{key}", whole + head_bytes, position)
        return sha256, bytes(head)

    async def size(self, key: str) -> int:
        found = await self._store.durable_prefix(manifests.upload_key(key))
        return found[1] if found is not None else 0

    def scratch(self, key: str, suffix: str) -> Path:
        return self._scratch.scratch(key, suffix)

    async def digest(self, path: Path) -> tuple[str, int]:
        return await asyncio.to_thread(sha256_of_file, path)

    async def discard(self, key: str) -> None:
        await self._store.release(manifests.upload_key(key))
        await asyncio.to_thread(self._scratch.discard, key)

    async def discard_scratch(self, key: str) -> None:
        await asyncio.to_thread(self._scratch.discard, key)

    async def keys(self) -> list[str]:
        staged = await self._store.keys_with_prefix(manifests.UPLOAD_PREFIX)
        named = {key.removeprefix(manifests.UPLOAD_PREFIX) for key in staged}
        return sorted(named | set(await asyncio.to_thread(self._scratch.keys)))

    async def adopt_staging_files(self) -> int:
        """Moves the uploads an earlier version staged whole on local disk
        (`<key>.part` in the scratch root) into the chunk store, so that they
        stay resumable; returns how many. Each file is removed once its bytes
        are durable in the store."""
        adopted = 0
        for path in await asyncio.to_thread(self._scratch.legacy_files, _LEGACY_SUFFIX):
            key = path.name.removesuffix(_LEGACY_SUFFIX)
            await self._store.release(manifests.upload_key(key))
            staged = await self.open(key, 0)
            try:
                handle = await asyncio.to_thread(path.open, "rb")
                try:
                    while piece := await asyncio.to_thread(handle.read, _READ_BYTES):
                        await staged.write(piece)
                finally:
                    await asyncio.to_thread(handle.close)
            finally:
                await staged.drain()
                await staged.close()
            await asyncio.to_thread(os.unlink, path)
            adopted += 1
        return adopted
