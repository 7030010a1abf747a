"""The image service's BlobStore over the chunk store: every image's bytes a
manifest of 1 MiB chunks named by their BLAKE3 hash, each chunk's bytes
stored once whoever uploaded them (README "Chunk store").

Blobs stored whole by an earlier version (the `legacy` store) stay readable
until the background conversion (`convert_legacy`) has turned each into a
manifest; a key with a complete manifest is read from its chunks.

Dedup is invisible to tenants: a put stores every chunk it is given, even
one the store already holds (the same bytes replace the same bytes, under
the same name), so the time and the answer of an upload are the same whether
or not another project stored those bytes first; only the records say that
the chunk is stored once."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import Connection

from bms_image.common.errors import DataLoss
from bms_image.common.telemetry.metrics import StoreFigures
from bms_image.images.adapters.chunks import manifests
from bms_image.images.adapters.chunks.chunking import (
    CHUNK_BYTES,
    Chunker,
    chunk_id,
    is_zero,
    object_name,
    parse_object_name,
    zeros,
)
from bms_image.images.adapters.chunks.manifests import Entry, Manifest
from bms_image.images.adapters.chunks.objects import ChunkMissing, ChunkObjects
from bms_image.images.domain.ports import DEFAULT_CHUNK_BYTES, BlobNotFound, BlobStore
from bms_image.store.db import Database

log = logging.getLogger(__name__)

#: Chunks hashed, referenced and stored together: one database round and one
#: durable write of the backend per batch.
BATCH_CHUNKS = 32
#: Chunks fetched ahead of the one a reader is at.
READ_AHEAD = 4
#: Manifest entries read from the database at a time.
ENTRIES_PAGE = 256
#: A put in progress touches its pending manifest with every batch; one left
#: untouched this long belongs to a process that died, and is collected.
PENDING_TTL = timedelta(minutes=15)
#: Chunk rows freed per transaction of a sweep.
FREE_BATCH = 500


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class SweepReport:
    abandoned_puts: int = 0
    freed_chunks: int = 0
    orphan_objects: int = 0


@dataclass
class GcCounters:
    """What the collector did since the process started (for the metrics)."""

    sweeps: int = 0
    freed_chunks: int = 0
    orphan_objects: int = 0
    abandoned_puts: int = 0
    last_sweep: datetime | None = None
    converted_blobs: int = 0
    legacy_left: int = field(default=-1)  # -1: not counted yet

    def add(self, report: SweepReport, when: datetime) -> None:
        self.sweeps += 1
        self.freed_chunks += report.freed_chunks
        self.orphan_objects += report.orphan_objects
        self.abandoned_puts += report.abandoned_puts
        self.last_sweep = when


async def _file_pieces(path: Path, size: int) -> AsyncIterator[bytes]:
    handle = await asyncio.to_thread(path.open, "rb")
    try:
        while piece := await asyncio.to_thread(handle.read, size):
            yield piece
    finally:
        handle.close()


def identify(pieces: Sequence[bytes]) -> list[str | None]:
    """Each chunk's id, None for a chunk of zeros. Blocking (hashes)."""
    return [None if is_zero(piece) else chunk_id(piece) for piece in pieces]


class ChunkStore:
    """BlobStore over manifests of chunks (see the module's doc)."""

    def __init__(
        self,
        database: Database,
        objects: ChunkObjects,
        legacy: BlobStore,
        chunk_bytes: int = CHUNK_BYTES,
        clock: Callable[[], datetime] = _now,
    ) -> None:
        self.name = legacy.name
        self._db = database
        self.objects = objects
        self._legacy = legacy
        self.chunk_bytes = chunk_bytes
        self._clock = clock
        self.gc = GcCounters()

    # -- writing -----------------------------------------------------------

    async def put_file(self, key: str, path: Path) -> None:
        """Stores the file's bytes under key as a manifest, then removes the
        file. Nothing is under key until the manifest is whole."""
        await self.put(key, _file_pieces(path, self.chunk_bytes))
        await asyncio.to_thread(path.unlink, missing_ok=True)

    async def put(self, key: str, pieces: AsyncIterator[bytes]) -> int:
        """Stores the bytes of `pieces` under key (replacing what was there)
        and returns their size. A failure leaves key as it was."""
        pending = manifests.pending_key()
        await self._db.run(
            lambda c: manifests.create(c, pending, self.chunk_bytes, self._clock()), write=True
        )
        try:
            size = await self._store_all(pending, pieces)
            await self.finish(pending, key, size)
            return size
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.release(pending))
            raise

    async def _store_all(self, pending: str, pieces: AsyncIterator[bytes]) -> int:
        chunker = Chunker(self.chunk_bytes)
        position = size = 0
        async for piece in pieces:
            chunker.add(piece)
            if chunker.ready >= BATCH_CHUNKS:
                chunks = chunker.take()
                await self.append(pending, chunks, position)
                position, size = position + len(chunks), size + sum(map(len, chunks))
        if chunker.buffered:
            chunks = chunker.take(final=True)
            await self.append(pending, chunks, position)
            size += sum(map(len, chunks))
        return size

    async def append(
        self,
        key: str,
        chunks: Sequence[bytes],
        position: int,
        ids: Sequence[str | None] | None = None,
    ) -> None:
        """Adds the chunks to the incomplete manifest `key` from `position`
        on: references them (before their bytes exist: see manifests), stores
        every one of them, then records them stored. `ids`: the chunks' ids
        if the caller has hashed them already (identify). ManifestGone if the
        manifest is not there."""
        if ids is None:
            ids = await asyncio.to_thread(identify, chunks)
        counts: dict[str, tuple[int, int]] = {}
        entries: list[tuple[int, str | None, int]] = []
        for offset, (data, chunk) in enumerate(zip(chunks, ids, strict=True)):
            entries.append((position + offset, chunk, len(data)))
            if chunk is not None:
                counts[chunk] = (counts.get(chunk, (0, 0))[0] + 1, len(data))
        now = self._clock()

        def reference(connection: Connection) -> dict[str, tuple[str, bool]]:
            generations = manifests.reference(connection, counts, now)
            manifests.append(connection, key, entries, now)
            return generations

        generations = await self._db.run(reference, write=True)
        items = {
            object_name(chunk, generations[chunk][0]): data
            for data, chunk in zip(chunks, ids, strict=True)
            if chunk is not None
        }
        await self.objects.put(list(items.items()))
        stored = {chunk: generations[chunk][0] for chunk in counts}
        await self._db.run(lambda c: manifests.mark_stored(c, stored), write=True)

    async def release(self, key: str) -> bool:
        """Drops the key's manifest, complete or not, and its references."""
        return await self._db.run(lambda c: manifests.release(c, key), write=True)

    # -- incomplete manifests (an upload's staged bytes: chunks.uploads) ----

    async def ensure(self, key: str) -> int:
        """Creates the incomplete manifest `key` unless it exists; returns
        its chunk size."""
        return await self._db.run(
            lambda c: manifests.ensure(c, key, self.chunk_bytes, self._clock()), write=True
        )

    async def durable_prefix(self, key: str) -> tuple[int, int, int] | None:
        """(entries, bytes, chunk size) of the key's manifest, counting only
        the entries from position 0 on whose bytes are durable, up to the
        first gap, chunk not stored or short chunk; None without a manifest."""
        chunk_bytes = await self._db.run(functools.partial(manifests.chunk_size, key=key))
        if chunk_bytes is None:
            return None
        count = size = 0
        async with contextlib.aclosing(self._entries(key, 0)) as found:
            async for entry in found:
                if entry.position != count or not entry.durable:
                    break
                count, size = count + 1, size + entry.length
                if entry.length != chunk_bytes:
                    break
        return count, size, chunk_bytes

    async def truncate(self, key: str, first: int) -> None:
        """Drops the key's entries from position `first` on."""
        await self._db.run(lambda c: manifests.truncate(c, key, first), write=True)

    async def finish(self, pending: str, key: str, size: int) -> None:
        """The incomplete manifest `pending` becomes the key's, complete;
        ManifestGone if it is not there."""
        await self._db.run(
            lambda c: manifests.finish(c, pending, key, size, self._clock()), write=True
        )

    async def keys_with_prefix(self, prefix: str) -> list[str]:
        return await self._db.run(functools.partial(manifests.keys_with_prefix, prefix=prefix))

    # -- reading -----------------------------------------------------------

    async def read(
        self, key: str, offset: int = 0, chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ) -> AsyncIterator[bytes]:
        """The bytes from offset on, each chunk checked against its id: a
        chunk whose bytes are missing or changed is DATA_LOSS naming the key
        and the offset, never bytes that are not the image's."""
        found = await self._db.run(functools.partial(manifests.manifest, key=key))
        if found is None:
            async for piece in self._legacy.read(key, offset, chunk_bytes):
                yield piece
            return
        async for piece in self.read_manifest(key, found, offset, chunk_bytes):
            yield piece

    async def read_manifest(
        self,
        key: str,
        found: Manifest,
        offset: int = 0,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        subject: str = "",
    ) -> AsyncGenerator[bytes, None]:
        """The bytes of the key's manifest (complete or not: `found` says
        its size) from offset on, verified as `read` does; damage is
        reported for `subject` (the key by default)."""
        subject = subject or key
        if offset >= found.size:
            # No bytes from there on: no chunk to fetch (the last one would
            # be read, hashed and its damage reported for nothing).
            return
        position, skip = divmod(offset, found.chunk_bytes)
        fetching: collections.deque[asyncio.Task[bytes]] = collections.deque()
        try:
            async for entry in self._entries(key, position):
                if entry.position * found.chunk_bytes >= found.size:
                    break
                fetching.append(
                    asyncio.ensure_future(self._fetch(subject, entry, found.chunk_bytes))
                )
                if len(fetching) > READ_AHEAD:
                    data = await fetching.popleft()
                    for piece in _split(data[skip:], chunk_bytes):
                        yield piece
                    skip = 0
            while fetching:
                data = await fetching.popleft()
                for piece in _split(data[skip:], chunk_bytes):
                    yield piece
                skip = 0
        finally:
            for task in fetching:
                task.cancel()

    async def _entries(self, key: str, position: int) -> AsyncGenerator[Entry, None]:
        while True:
            page = await self._db.run(
                functools.partial(manifests.entries, key=key, first=position, limit=ENTRIES_PAGE)
            )
            for entry in page:
                yield entry
            if len(page) < ENTRIES_PAGE:
                return
            position = page[-1].position + 1

    async def _fetch(self, key: str, entry: Entry, chunk_bytes: int) -> bytes:
        if entry.chunk_id is None:
            return zeros(entry.length)
        offset = entry.position * chunk_bytes
        if entry.generation is None or not entry.live:
            raise _damaged(key, offset, "its chunk is not in the store")
        try:
            data = await self.objects.get(object_name(entry.chunk_id, entry.generation))
        except ChunkMissing:
            raise _damaged(key, offset, "its chunk's bytes are missing") from None
        if len(data) != entry.length or await asyncio.to_thread(chunk_id, data) != entry.chunk_id:
            raise _damaged(key, offset, "its chunk's bytes changed")
        return data

    async def size(self, key: str) -> int:
        found = await self._db.run(functools.partial(manifests.manifest, key=key))
        if found is None:
            return await self._legacy.size(key)
        return found.size

    async def intact(self, key: str) -> bool:
        """Every chunk of the key's manifest is live and has its object
        (one existence check per chunk: for the catalog's images at start,
        not for every read); a key without a manifest asks the legacy store."""
        found = await self._db.run(functools.partial(manifests.manifest, key=key))
        if found is None:
            return await self._legacy.intact(key)
        async for entry in self._entries(key, 0):
            if entry.chunk_id is None:
                continue
            if entry.generation is None or not entry.live:
                return False
            if not await self.objects.exists(object_name(entry.chunk_id, entry.generation)):
                return False
        return True

    # -- the rest of BlobStore -----------------------------------------------

    async def copy(self, source_key: str, target_key: str) -> None:
        """A manifest naming the same chunks: no bytes move."""
        copied = await self._db.run(
            lambda c: manifests.copy(c, source_key, target_key, self._clock()), write=True
        )
        if not copied:
            await self._legacy.copy(source_key, target_key)

    async def delete(self, key: str) -> None:
        """Drops the key's references; the collector frees what nobody
        references any more."""
        await self.release(key)
        await self._legacy.delete(key)

    async def keys(self) -> list[str]:
        complete = await self._db.run(manifests.complete_keys)
        return sorted(set(complete) | set(await self._legacy.keys()))

    async def ping(self) -> None:
        await self.objects.ping()
        await self._legacy.ping()

    async def claim(self, deployment: str) -> None:
        await self._legacy.claim(deployment)

    # -- housekeeping --------------------------------------------------------

    async def collect_garbage(self, orphans: bool = False) -> SweepReport:
        """Drops puts abandoned by dead processes, frees the chunks nobody
        references (see manifests for why this is safe beside writers, in
        this process or another), and with `orphans` deletes objects that no
        chunk row of their generation claims."""
        report = SweepReport()
        before = self._clock() - PENDING_TTL
        for pending in await self._db.run(lambda c: manifests.abandoned(c, before)):
            if await self.release(pending):
                report.abandoned_puts += 1
        while True:
            freed = await self._db.run(lambda c: manifests.mark_freeable(c, FREE_BATCH), write=True)
            if not freed:
                break
            await self.objects.delete([object_name(chunk, gen) for chunk, gen in freed])
            report.freed_chunks += await self._db.run(
                functools.partial(manifests.forget, freed=freed), write=True
            )
        if orphans:
            report.orphan_objects = await self._delete_orphans()
        self.gc.add(report, self._clock())
        return report

    async def _delete_orphans(self) -> int:
        """Objects whose (chunk, generation) has no row: bytes of a freed
        generation whose deletion a crash interrupted, or that a writer
        stored after its references were dropped. A row is always made before
        its bytes are stored, so an object seen without one is never wanted."""
        named = [
            (name, parsed)
            for name in await self.objects.names()
            if (parsed := parse_object_name(name)) is not None
        ]
        deleted = 0
        for start in range(0, len(named), FREE_BATCH):
            batch = named[start : start + FREE_BATCH]
            ids = sorted({chunk for _, (chunk, _) in batch})
            known = await self._db.run(functools.partial(manifests.live_generations, chunks=ids))
            orphans = [name for name, pair in batch if pair not in known]
            await self.objects.delete(orphans)
            deleted += len(orphans)
        return deleted

    async def convert_legacy(self, wanted: Callable[[str], bool] | None = None) -> int:
        """Turns blobs stored whole into manifests, one at a time, each blob
        deleted once its manifest is complete (until then both read the
        same). Returns how many were converted."""
        converted = 0
        legacy = await self._legacy.keys()
        self.gc.legacy_left = len(legacy)
        for key in legacy:
            if wanted is not None and not wanted(key):
                continue
            if await self._db.run(functools.partial(manifests.manifest, key=key)) is None:
                try:
                    await self.put(key, self._legacy.read(key))
                except BlobNotFound:
                    continue  # deleted meanwhile
            await self._legacy.delete(key)
            converted += 1
            self.gc.converted_blobs += 1
            self.gc.legacy_left -= 1
        return converted

    async def stats(self) -> manifests.StoreStats:
        return await self._db.run(manifests.stats)

    async def figures(self) -> StoreFigures:
        """The store as the metrics show it."""
        stats, gc = await self.stats(), self.gc
        return StoreFigures(
            logical_bytes=stats.logical_bytes,
            stored_bytes=stats.stored_bytes,
            chunks=stats.chunks,
            unreferenced_chunks=stats.unreferenced,
            legacy_blobs=gc.legacy_left,
            gc_sweeps=gc.sweeps,
            gc_freed_chunks=gc.freed_chunks,
            gc_orphan_objects=gc.orphan_objects,
            gc_abandoned_puts=gc.abandoned_puts,
            gc_last_sweep=gc.last_sweep.timestamp() if gc.last_sweep else None,
            converted_blobs=gc.converted_blobs,
            requests=dict(self.objects.requests),
        )


def _split(data: bytes, size: int) -> list[bytes]:
    if len(data) <= size:
        return [data] if data else []
    return [data[i : i + size] for i in range(0, len(data), size)]


def _damaged(key: str, offset: int, why: str) -> DataLoss:
    return DataLoss(
        "IMAGE_DATA_DAMAGED",
        f"images/{key}: the stored bytes at offset {offset} are damaged ({why}); "
        "restore the image from a copy, or delete it and upload it again",
    )
