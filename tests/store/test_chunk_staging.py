"""Uploads staged in the chunk store (images.adapters.chunks.uploads), on
SQLite and PostgreSQL: what is durable is a prefix of whole chunks in the
database and the blob store, so another process (here: a second store on
the same database and directory) resumes where the first left off, with the
same SHA-256; what is not durable is never counted; a deletion during an
upload leaves no references; and the collector leaves staged uploads alone."""

from __future__ import annotations

import asyncio
import hashlib
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from bms_image.common.errors import NotFound, StagedBytesMissing
from bms_image.common.staging import Staging
from bms_image.images.adapters.blobs.local import LocalBlobStore
from bms_image.images.adapters.chunks import manifests
from bms_image.images.adapters.chunks.objects import LocalChunkObjects
from bms_image.images.adapters.chunks.store import ChunkStore
from bms_image.images.adapters.chunks.uploads import BATCH_CHUNKS, ChunkStaging, StagedChunks
from bms_image.store.db import Database

pytestmark = pytest.mark.asyncio

MiB = 1024 * 1024
KEY = "3f7c1b9e-0000-4000-8000-000000000001"


def _staging(
    database: Database, root: Path, clock_offset: timedelta = timedelta()
) -> tuple[ChunkStore, ChunkStaging]:
    """A chunk store and its staging over `root`, as one process has them;
    a second call on the same database and root is another process."""
    store = ChunkStore(
        database,
        LocalChunkObjects(root / "chunks"),
        LocalBlobStore(root / "blobs"),
        clock=lambda: datetime.now(UTC) + clock_offset,
    )
    return store, ChunkStaging(store, Staging(root / "staging"))


async def _write(staged: StagedChunks, data: bytes, piece: int = 300_001) -> None:
    try:
        for start in range(0, len(data), piece):
            await staged.write(data[start : start + piece])
    finally:
        await staged.drain()
    await staged.close()


async def _read(staged: StagedChunks) -> bytes:
    return b"".join([piece async for piece in staged.read()])


async def test_an_upload_broken_off_resumes_in_another_process_with_the_same_digest(
    database: Database, tmp_path: Path
) -> None:
    content = os.urandom(19 * MiB + 12_345)
    first = 11 * MiB + 7  # not on a chunk boundary: the tail is stored short, then continued
    _, here = _staging(database, tmp_path)
    staged = await here.open(KEY, 0)
    await _write(staged, content[:first])
    assert staged.size == first
    assert await here.size(KEY) == first

    # Another process on the same database and blob store.
    store, there = _staging(database, tmp_path)
    assert await there.size(KEY) == first
    resumed = await there.open(KEY, first)
    assert resumed.size == first
    await _write(resumed, content[first:], piece=MiB + 1)

    assert resumed.size == len(content)
    assert resumed.hexdigest() == hashlib.sha256(content).hexdigest()
    assert await _read(resumed) == content
    await resumed.commit(KEY)
    assert b"".join([p async for p in store.read(KEY)]) == content
    assert await there.keys() == [], "the staged manifest became the image's"


async def test_a_resume_past_the_durable_bytes_is_refused_with_what_is_there(
    database: Database, tmp_path: Path
) -> None:
    _, staging = _staging(database, tmp_path)
    staged = await staging.open(KEY, 0)
    await _write(staged, os.urandom(2 * MiB + 5))
    with pytest.raises(StagedBytesMissing) as missing:
        await staging.open(KEY, 2 * MiB + 6)
    assert missing.value.available == 2 * MiB + 5
    with pytest.raises(StagedBytesMissing) as nothing:
        await staging.open("no-such-upload", 10)
    assert nothing.value.available == 0


async def test_a_resume_before_the_end_drops_what_follows(
    database: Database, tmp_path: Path
) -> None:
    content = os.urandom(5 * MiB)
    _, staging = _staging(database, tmp_path)
    await _write(await staging.open(KEY, 0), content)
    other = os.urandom(MiB)
    resumed = await staging.open(KEY, 2 * MiB + 3)
    await _write(resumed, other)
    expected = content[: 2 * MiB + 3] + other
    assert await _read(resumed) == expected
    assert resumed.hexdigest() == hashlib.sha256(expected).hexdigest()
    assert await staging.size(KEY) == len(expected)
    stats = await database.run(manifests.stats)
    assert stats.entries == 4, "the dropped chunks' entries are gone"


async def test_only_whole_stored_batches_count_when_a_batch_fails(
    database: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch whose bytes could not be stored (the store is full) ends the
    durable prefix, even if a later batch made it: size falls back to it."""
    store, staging = _staging(database, tmp_path)
    real_put = store.objects.put
    calls = 0

    async def put(items: object) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError("the second batch fails")
        await real_put(items)  # type: ignore[arg-type]

    monkeypatch.setattr(store.objects, "put", put)
    staged = await staging.open(KEY, 0)
    content = os.urandom(3 * BATCH_CHUNKS * MiB + 5)
    with pytest.raises(OSError):
        await _write(staged, content, piece=MiB)
    with pytest.raises(OSError):  # what the upload does next (and would count the bytes)
        await staged.close()
    assert staged.size == BATCH_CHUNKS * MiB
    assert await staging.size(KEY) == BATCH_CHUNKS * MiB
    resumed = await staging.open(KEY, BATCH_CHUNKS * MiB)
    monkeypatch.setattr(store.objects, "put", real_put)
    await _write(resumed, content[BATCH_CHUNKS * MiB :])
    assert resumed.hexdigest() == hashlib.sha256(content).hexdigest()


async def test_an_upload_whose_image_was_deleted_stops_and_leaves_no_references(
    database: Database, tmp_path: Path
) -> None:
    _, staging = _staging(database, tmp_path)
    staged = await staging.open(KEY, 0)
    await staged.write(os.urandom(BATCH_CHUNKS * MiB))
    await staged.drain()
    await staging.discard(KEY)  # what deleting the image does
    with pytest.raises(NotFound):
        await staged.write(os.urandom(BATCH_CHUNKS * MiB))
        await staged.drain()
    with pytest.raises(NotFound):
        await staged.commit(KEY)
    stats = await database.run(manifests.stats)
    assert (stats.entries, stats.manifests) == (0, 0)
    assert stats.unreferenced == stats.chunks, "a chunk is still referenced"
    assert await staging.keys() == []


async def test_an_upload_holds_at_most_two_batches_in_flight(
    database: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Memory stays bounded however fast the client sends: with two batches
    not yet stored, the next write waits for the oldest of them."""
    store, staging = _staging(database, tmp_path)
    release = asyncio.Event()
    real_append = store.append

    async def slow_append(*args: Any, **kwargs: Any) -> None:
        await release.wait()
        await real_append(*args, **kwargs)

    monkeypatch.setattr(store, "append", slow_append)
    staged = await staging.open(KEY, 0)
    batch = os.urandom(BATCH_CHUNKS * MiB)
    await staged.write(batch)  # in flight: one batch
    second = asyncio.ensure_future(staged.write(batch))  # two in flight: it waits
    done, _ = await asyncio.wait([second], timeout=0.5)
    assert not done, "a write went on with two batches in flight"
    release.set()
    await second
    await staged.drain()
    await staged.close()
    assert await staging.size(KEY) == 2 * len(batch)


async def test_the_collector_leaves_a_paused_upload_alone(
    database: Database, tmp_path: Path
) -> None:
    content = os.urandom(3 * MiB)
    _, staging = _staging(database, tmp_path)
    await _write(await staging.open(KEY, 0), content)
    later, _ = _staging(database, tmp_path, clock_offset=timedelta(days=2))
    report = await later.collect_garbage(orphans=True)
    assert (report.abandoned_puts, report.freed_chunks, report.orphan_objects) == (0, 0, 0)
    resumed = await staging.open(KEY, len(content))
    assert await _read(resumed) == content


async def test_a_legacy_staging_file_is_moved_into_the_store(
    database: Database, tmp_path: Path
) -> None:
    content = os.urandom(2 * MiB + 99)
    legacy = tmp_path / "staging" / f"{KEY}.part"
    legacy.parent.mkdir(parents=True)
    legacy.write_bytes(content)
    _, staging = _staging(database, tmp_path)
    assert await staging.adopt_staging_files() == 1
    assert not legacy.exists()
    assert await staging.size(KEY) == len(content)
    resumed = await staging.open(KEY, len(content))
    await resumed.close()
    assert resumed.hexdigest() == hashlib.sha256(content).hexdigest()
    assert await _read(resumed) == content
