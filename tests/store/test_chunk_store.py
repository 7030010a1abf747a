"""The chunk store on SQLite and PostgreSQL: manifests of deduplicated
chunks, verified reads, copies that share chunks, the conversion of whole
blobs, and a collector that never frees a chunk a writer is about to use."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Connection

from bms_image.common.errors import DataLoss
from bms_image.images.adapters.blobs.local import LocalBlobStore
from bms_image.images.adapters.chunks import manifests
from bms_image.images.adapters.chunks.chunking import CHUNK_BYTES, chunk_id, parse_object_name
from bms_image.images.adapters.chunks.objects import LocalChunkObjects
from bms_image.images.adapters.chunks.store import ChunkStore
from bms_image.images.domain.ports import BlobNotFound
from bms_image.store.db import Database

pytestmark = pytest.mark.asyncio

MiB = 1024 * 1024


def _store(database: Database, root: Path) -> ChunkStore:
    return ChunkStore(database, LocalChunkObjects(root / "chunks"), LocalBlobStore(root / "blobs"))


async def _pieces(data: bytes, size: int = 3 * MiB + 17) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def _read(store: ChunkStore, key: str, offset: int = 0) -> bytes:
    return b"".join([piece async for piece in store.read(key, offset)])


def _objects(root: Path) -> list[Path]:
    return sorted(p for p in (root / "chunks").glob("*/*") if not p.name.startswith("."))


def _image(random_mib: int, zero_mib: int = 0, tail: int = 0) -> bytes:
    return os.urandom(random_mib * MiB) + bytes(zero_mib * MiB) + os.urandom(tail)


async def test_bytes_come_back_whole_and_from_any_offset(
    database: Database, tmp_path: Path
) -> None:
    store = _store(database, tmp_path)
    data = _image(3, zero_mib=2, tail=12_345)
    assert await store.put("a", _pieces(data)) == len(data)
    assert await store.size("a") == len(data)
    assert await _read(store, "a") == data
    for offset in (1, CHUNK_BYTES - 1, CHUNK_BYTES, 3 * CHUNK_BYTES + 5, len(data) - 1, len(data)):
        assert await _read(store, "a", offset) == data[offset:], offset
    # Zero chunks are never stored: 3 random chunks and the tail's.
    assert len(_objects(tmp_path)) == 4


async def test_the_same_bytes_are_stored_once_whoever_stores_them(
    database: Database, tmp_path: Path
) -> None:
    store = _store(database, tmp_path)
    base = _image(8)
    await store.put("first", _pieces(base))
    before = await store.stats()
    await store.put("again", _pieces(base, size=MiB // 3))  # other message sizes, same chunks
    after = await store.stats()
    assert (after.chunks, after.chunk_bytes) == (before.chunks, before.chunk_bytes)
    assert after.logical_bytes == 2 * len(base)
    # One changed chunk in 8: one new chunk.
    changed = base[: 3 * MiB] + os.urandom(MiB) + base[4 * MiB :]
    await store.put("changed", _pieces(changed))
    assert (await store.stats()).chunks == before.chunks + 1
    assert await _read(store, "changed") == changed
    assert (await store.stats()).stored_bytes < 1.2 * len(base)


async def test_a_damaged_or_missing_chunk_is_data_loss_naming_the_image_and_offset(
    database: Database, tmp_path: Path
) -> None:
    store = _store(database, tmp_path)
    data = _image(4)
    await store.put("img", _pieces(data))
    victim = next(
        p for p in _objects(tmp_path) if p.name.startswith(chunk_id(data[2 * MiB : 3 * MiB]))
    )
    victim.write_bytes(b"\x00" + victim.read_bytes()[1:])
    with pytest.raises(DataLoss) as damaged:
        await _read(store, "img")
    assert "images/img" in damaged.value.message and f"offset {2 * MiB}" in damaged.value.message
    victim.unlink()
    with pytest.raises(DataLoss) as missing:
        await _read(store, "img", MiB)
    assert f"offset {2 * MiB}" in missing.value.message
    assert await _read(store, "img", 3 * MiB) == data[3 * MiB :], "the rest is intact"


async def test_a_copy_shares_chunks_and_outlives_its_source(
    database: Database, tmp_path: Path
) -> None:
    store = _store(database, tmp_path)
    data = _image(3, tail=99)
    await store.put("source", _pieces(data))
    objects = _objects(tmp_path)
    await store.copy("source", "copy")
    assert _objects(tmp_path) == objects, "no bytes moved"
    await store.delete("source")
    await store.collect_garbage(orphans=True)
    assert await _read(store, "copy") == data
    await store.delete("copy")
    report = await store.collect_garbage(orphans=True)
    assert report.freed_chunks == 4 and _objects(tmp_path) == []
    assert (await store.stats()).chunks == 0
    with pytest.raises(BlobNotFound):
        await store.size("copy")


async def test_whole_blobs_stay_readable_and_are_converted(
    database: Database, tmp_path: Path
) -> None:
    legacy = LocalBlobStore(tmp_path / "blobs")
    data = _image(2, zero_mib=1, tail=7)
    (tmp_path / "old.raw").write_bytes(data)
    await legacy.put_file("old", tmp_path / "old.raw")
    store = _store(database, tmp_path)
    assert await store.keys() == ["old"]
    assert await _read(store, "old", 5) == data[5:], "read whole before the conversion"
    assert await store.convert_legacy() == 1
    assert await legacy.keys() == [], "the whole blob is gone once its manifest is complete"
    assert await store.keys() == ["old"]
    assert await _read(store, "old") == data
    assert await store.convert_legacy() == 0


async def test_a_failed_put_leaves_the_key_as_it_was(database: Database, tmp_path: Path) -> None:
    store = _store(database, tmp_path)
    data = _image(2)
    await store.put("key", _pieces(data))

    async def breaking() -> AsyncIterator[bytes]:
        yield os.urandom(40 * MiB)  # a batch is stored before the stream breaks
        raise ConnectionError("the client went away")

    with pytest.raises(ConnectionError):
        await store.put("key", breaking())
    assert await _read(store, "key") == data
    await store.collect_garbage(orphans=True)
    assert await _read(store, "key") == data
    assert len(_objects(tmp_path)) == 2, "the broken put's chunks were freed"


async def test_an_abandoned_put_is_collected(database: Database, tmp_path: Path) -> None:
    """A process that died mid-put leaves a pending manifest; once it is
    older than the TTL, a sweep drops it and frees its chunks."""
    store = _store(database, tmp_path)
    pending = manifests.pending_key()
    old = datetime.now(UTC) - timedelta(hours=1)
    chunk = os.urandom(MiB)
    ident = chunk_id(chunk)

    def begin(connection: Connection) -> dict[str, tuple[str, bool]]:
        manifests.create(connection, pending, CHUNK_BYTES, old)
        generations = manifests.reference(connection, {ident: (1, MiB)}, old)
        manifests.append(connection, pending, [(0, ident, MiB)], old)
        return generations

    generations = await database.run(begin, write=True)
    await store.objects.put([(f"{ident}.{generations[ident][0]}", chunk)])
    report = await store.collect_garbage(orphans=True)
    assert report.abandoned_puts == 1 and report.freed_chunks == 1
    assert _objects(tmp_path) == []


class GatedObjects(LocalChunkObjects):
    """Local objects whose puts wait for a gate: a writer caught between
    referencing its chunks and storing their bytes."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def put(self, items: Sequence[tuple[str, bytes]]) -> None:
        self.entered.set()
        await self.gate.wait()
        await super().put(items)


async def test_no_chunk_is_freed_while_a_writer_is_about_to_store_it(
    database: Database, tmp_path: Path
) -> None:
    """A writer references a chunk nobody else holds any more (refs 0, about
    to be freed), then stalls before storing its bytes; a sweep runs. The
    writer's image must read back whole afterwards."""
    data = _image(2)
    plain = _store(database, tmp_path)
    await plain.put("old", _pieces(data))
    await plain.delete("old")  # both chunks now unreferenced

    gated = GatedObjects(tmp_path / "chunks")
    writer = ChunkStore(database, gated, LocalBlobStore(tmp_path / "blobs"))
    put = asyncio.create_task(writer.put("new", _pieces(data)))
    await gated.entered.wait()
    report = await plain.collect_garbage(orphans=True)
    assert report.freed_chunks == 0, "the writer's references keep them"
    gated.gate.set()
    await put
    await plain.collect_garbage(orphans=True)
    assert await _read(plain, "new") == data


async def test_a_writer_taking_over_a_chunk_being_freed_keeps_its_bytes(
    database: Database, tmp_path: Path
) -> None:
    """The sweep marked a chunk `deleting` and stalls before deleting its
    object; a writer stores the same bytes meanwhile (a new generation);
    the sweep then finishes. The writer's bytes survive."""
    data = _image(1)
    store = _store(database, tmp_path)
    await store.put("old", _pieces(data))
    await store.delete("old")
    freed = await database.run(lambda c: manifests.mark_freeable(c, 10), write=True)
    assert len(freed) == 1
    await store.put("new", _pieces(data))  # the sweep is stalled here
    [(chunk, old_generation)] = freed
    await store.objects.delete([f"{chunk}.{old_generation}"])
    assert await database.run(lambda c: manifests.forget(c, freed), write=True) == 0
    assert await _read(store, "new") == data
    await store.collect_garbage(orphans=True)
    assert await _read(store, "new") == data


async def test_a_sweep_cut_off_after_marking_is_finished_by_the_next(
    database: Database, tmp_path: Path
) -> None:
    """kill -9 between marking and deleting: the rows stay `deleting`; the
    next sweep deletes their objects and rows; no manifest ever named them."""
    store = _store(database, tmp_path)
    await store.put("gone", _pieces(_image(2)))
    await store.put("kept", _pieces(kept := _image(1)))
    await store.delete("gone")
    assert len(await database.run(lambda c: manifests.mark_freeable(c, 10), write=True)) == 2
    report = await store.collect_garbage(orphans=True)
    assert report.freed_chunks == 2
    assert len(_objects(tmp_path)) == 1
    assert await _read(store, "kept") == kept


async def test_orphan_objects_are_swept_and_others_are_left_alone(
    database: Database, tmp_path: Path
) -> None:
    store = _store(database, tmp_path)
    await store.put("img", _pieces(data := _image(1)))
    stray = "ab" * 32 + ".0123456789abcdef"
    await store.objects.put([(stray, b"bytes of a freed generation")])
    foreign = tmp_path / "chunks" / "zz"
    foreign.mkdir()
    (foreign / "not-a-chunk").write_bytes(b"x")
    report = await store.collect_garbage(orphans=True)
    assert report.orphan_objects == 1
    left = _objects(tmp_path)
    assert [p.name for p in left if parse_object_name(p.name)] == [
        p.name for p in left if p.name.startswith(chunk_id(data))
    ], "only the image's chunk is left of the store's objects"
    assert (foreign / "not-a-chunk").exists(), "what is not a chunk object is left alone"
    assert await _read(store, "img") == data


async def test_writers_and_collectors_of_two_processes_race_safely(
    database_url: str, database: Database, tmp_path: Path
) -> None:
    """Two processes' stores on one database (and one chunk directory): puts
    of overlapping bytes, deletes and sweeps all at once. Every image still
    present reads back whole; nothing unreferenced is left after a sweep."""
    other = Database(database_url)
    try:
        first, second = _store(database, tmp_path), _store(other, tmp_path)
        shared = [os.urandom(MiB) for _ in range(4)]
        datas = {f"k{i}": b"".join(shared[j % 4] for j in range(i, i + 3)) for i in range(8)}

        async def churn(store: ChunkStore, keys: list[str]) -> None:
            for round_ in range(3):
                for key in keys:
                    await store.put(key, _pieces(datas[key], size=MiB // 2))
                    if round_ < 2:
                        await store.delete(key)
                await store.collect_garbage()

        await asyncio.gather(
            churn(first, ["k0", "k1", "k2", "k3"]),
            churn(second, ["k4", "k5", "k6", "k7"]),
            first.collect_garbage(orphans=True),
            second.collect_garbage(orphans=True),
        )
        for key, data in datas.items():
            assert await _read(first, key) == data, key
        await first.collect_garbage(orphans=True)
        assert (await first.stats()).unreferenced == 0
        assert len(_objects(tmp_path)) == 4
    finally:
        await other.close()
