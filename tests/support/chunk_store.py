"""The chunk store as tests see it from a service's data directory: which
images have their bytes stored (a complete manifest), the files of their
chunks, and ways to damage them. Reads the SQLite database directly (the
default `<data_dir>/bms-image.db`, or the URL given) and the local chunk
objects under `<data_dir>/blobs/chunks/`.

`collect` runs one collection of the store as the service's collector does,
and `inconsistencies` lists what a store after a collection must not hold
(on any database URL: they go through the service's own Database)."""

from __future__ import annotations

import os
import sqlite3
import uuid
from collections import Counter
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Connection, make_url, text, update

from bms_image.images.adapters.chunks import manifests
from bms_image.images.adapters.chunks import manifests as manifests_module
from bms_image.images.adapters.chunks.chunking import parse_object_name
from bms_image.images.adapters.chunks.objects import ChunkObjects, LocalChunkObjects
from bms_image.images.adapters.chunks.store import PENDING_TTL, ChunkStore, SweepReport
from bms_image.images.domain.ports import BlobStore
from bms_image.store.db import Database


def _database(data_dir: Path, database_url: str = "") -> Path:
    if database_url:
        database = make_url(database_url).database
        assert database, f"not a SQLite URL: {database_url}"
        return Path(database)
    return data_dir / "bms-image.db"


def _image_id(image: str) -> str:
    return image.removeprefix("images/")


def chunks_root(data_dir: Path) -> Path:
    return data_dir / "blobs" / "chunks"


def stored(data_dir: Path, image: str, database_url: str = "") -> bool:
    """Whether the image's bytes are stored: a complete manifest, or a
    whole blob an earlier version wrote and the conversion has not reached."""
    with closing(sqlite3.connect(_database(data_dir, database_url))) as connection:
        row = connection.execute(
            "SELECT 1 FROM manifests WHERE key = ? AND complete", (_image_id(image),)
        ).fetchone()
    return row is not None or whole_blob(data_dir, image).exists()


def whole_blob(data_dir: Path, image: str) -> Path:
    """Where an earlier version kept an image's bytes whole."""
    return data_dir / "blobs" / f"{_image_id(image)}.blob"


def chunk_files(data_dir: Path, image: str, database_url: str = "") -> list[Path]:
    """The files of the chunks the image's manifest names, in its order
    (a chunk named twice is listed twice; zero chunks have none)."""
    with closing(sqlite3.connect(_database(data_dir, database_url))) as connection:
        rows = connection.execute(
            "SELECT c.id, c.generation FROM manifest_chunks m JOIN chunks c ON c.id = m.chunk_id"
            " WHERE m.key = ? ORDER BY m.position",
            (_image_id(image),),
        ).fetchall()
    root = chunks_root(data_dir)
    return [root / chunk[:2] / f"{chunk}.{generation}" for chunk, generation in rows]


def stored_bytes(data_dir: Path, image: str, database_url: str = "") -> bytes:
    """The image's bytes as its manifest and chunk files hold them (zeros
    for a chunk of zeros, which has no file), unchecked."""
    with closing(sqlite3.connect(_database(data_dir, database_url))) as connection:
        rows = connection.execute(
            "SELECT m.chunk_id, m.length, c.generation FROM manifest_chunks m"
            " LEFT JOIN chunks c ON c.id = m.chunk_id WHERE m.key = ? ORDER BY m.position",
            (_image_id(image),),
        ).fetchall()
    assert stored(data_dir, image, database_url), f"{image} is not stored"
    root = chunks_root(data_dir)
    return b"".join(
        bytes(length) if chunk is None else (root / chunk[:2] / f"{chunk}.{gen}").read_bytes()
        for chunk, length, gen in rows
    )


def staged_bytes(data_dir: Path, image: str, database_url: str = "") -> bytes | None:
    """The bytes of the image's upload staged durably in the chunk store
    (its manifest `upload-<id>`, from position 0 up to the first gap or
    chunk not stored), as a resume would find them; None if nothing is
    staged for it."""
    key = manifests.upload_key(_image_id(image))
    with closing(sqlite3.connect(_database(data_dir, database_url))) as connection:
        if connection.execute("SELECT 1 FROM manifests WHERE key = ?", (key,)).fetchone() is None:
            return None
        rows = connection.execute(
            "SELECT m.position, m.chunk_id, m.length, c.generation, c.state, c.stored"
            " FROM manifest_chunks m LEFT JOIN chunks c ON c.id = m.chunk_id"
            " WHERE m.key = ? ORDER BY m.position",
            (key,),
        ).fetchall()
    root = chunks_root(data_dir)
    pieces: list[bytes] = []
    for expected, (position, chunk, length, generation, state, stored_) in enumerate(rows):
        if position != expected:
            break
        if chunk is None:
            pieces.append(bytes(length))
        elif state == "live" and stored_:
            pieces.append((root / chunk[:2] / f"{chunk}.{generation}").read_bytes())
        else:
            break
        if length != 1024 * 1024:
            break
    return b"".join(pieces)


def staged(data_dir: Path, image: str, database_url: str = "") -> bytes | None:
    """staged_bytes (a shorter name for assertions)."""
    return staged_bytes(data_dir, image, database_url)


def staged_size(data_dir: Path, image: str, database_url: str = "") -> int | None:
    """How many bytes of the image's upload are staged durably (None: none)."""
    staged = staged_bytes(data_dir, image, database_url)
    return None if staged is None else len(staged)


def object_names(data_dir: Path, image: str, database_url: str = "") -> set[str]:
    """The names of the objects of the image's chunks (on any backend)."""
    return {path.name for path in chunk_files(data_dir, image, database_url)}


def all_chunk_files(data_dir: Path) -> list[Path]:
    """Every chunk object on disk (temporary files of a put excluded)."""
    root = chunks_root(data_dir)
    if not root.exists():
        return []
    return sorted(p for p in root.glob("*/*") if not p.name.startswith("."))


def lose_bytes(data_dir: Path, image: str, database_url: str = "") -> None:
    """Deletes the files of the image's chunks (a lost or wiped store)."""
    files = chunk_files(data_dir, image, database_url)
    assert files, f"{image} has no chunk files"
    for path in files:
        path.unlink(missing_ok=True)
    whole_blob(data_dir, image).unlink(missing_ok=True)


def damage_bytes(data_dir: Path, image: str, offset: int = 0, database_url: str = "") -> Path:
    """Flips a byte of the chunk that holds `offset` (bit rot, a bad disk);
    returns that chunk's file."""
    position = offset // (1024 * 1024)
    with closing(sqlite3.connect(_database(data_dir, database_url))) as connection:
        row = connection.execute(
            "SELECT c.id, c.generation FROM manifest_chunks m JOIN chunks c ON c.id = m.chunk_id"
            " WHERE m.key = ? AND m.position = ?",
            (_image_id(image), position),
        ).fetchone()
    assert row is not None, f"{image} has no stored chunk at offset {offset}"
    path = chunks_root(data_dir) / row[0][:2] / f"{row[0]}.{row[1]}"
    data = bytearray(path.read_bytes())
    data[offset % (1024 * 1024)] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def temp_chunk_files(data_dir: Path) -> list[Path]:
    """Temporary files of chunk puts (`.tmp-*` beside the chunks)."""
    root = chunks_root(data_dir)
    if not root.exists():
        return []
    return sorted(root.glob("*/.tmp-*"))


def url_of(data_dir: Path, database_url: str = "") -> str:
    """The service's database URL (its default: SQLite in the data dir)."""
    return database_url or f"sqlite:///{data_dir / 'bms-image.db'}"


class _NoWholeBlobs:
    """The legacy store a collection never reads (LocalBlobStore's
    constructor would sweep the blob directory's temporary files)."""

    name = "local"


async def collect(
    data_dir: Path,
    database_url: str = "",
    *,
    later: timedelta = PENDING_TTL + timedelta(seconds=1),
    orphans: bool = True,
    objects: ChunkObjects | None = None,
) -> SweepReport:
    """One collection (ChunkStore.collect_garbage) on the service's store,
    as the service's collector would run it `later` from now: by default
    once a put a killed process left counts as abandoned. Safe beside a
    running service (the collector's protocol), but by default it takes
    any put in progress for abandoned: call it when none is. `objects`:
    where the chunks are (the local files of the data dir by default)."""
    database = Database(url_of(data_dir, database_url))
    try:
        store = ChunkStore(
            database,
            objects or LocalChunkObjects(chunks_root(data_dir)),
            cast(BlobStore, _NoWholeBlobs()),
            clock=lambda: datetime.now(UTC) + later,
        )
        return await store.collect_garbage(orphans=orphans)
    finally:
        await database.close()


def _records(connection: Connection) -> dict[str, list[Any]]:
    def rows(sql: str) -> list[Any]:
        return list(connection.execute(text(sql)).all())

    return {
        "manifests": rows("SELECT key, size, complete FROM manifests"),
        "entries": rows("SELECT key, position, chunk_id, length FROM manifest_chunks"),
        "chunks": rows("SELECT id, generation, size, refs, state, stored FROM chunks"),
    }


async def staged_sizes(data_dir: Path, database_url: str = "") -> dict[str, int]:
    """Image id -> bytes staged durably for its upload (as staged_bytes
    counts them, from the records alone), for every staged upload; on any
    database URL."""
    database = Database(url_of(data_dir, database_url))
    try:
        records = await database.run(_records)
    finally:
        await database.close()
    chunks = {row[0]: row for row in records["chunks"]}
    sizes: dict[str, int] = {}
    entries = sorted(records["entries"], key=lambda e: (e[0], e[1]))
    for key, _, complete in records["manifests"]:
        if complete or not key.startswith(manifests_module.UPLOAD_PREFIX):
            continue
        size = 0
        for expected, (_, position, chunk, length) in enumerate(e for e in entries if e[0] == key):
            row = chunks.get(chunk) if chunk is not None else None
            if position != expected or (
                chunk is not None and (row is None or row[4] != "live" or not row[5])
            ):
                break
            size += length
            if length != 1024 * 1024:
                break
        sizes[key.removeprefix(manifests_module.UPLOAD_PREFIX)] = size
    return sizes


async def complete_keys(data_dir: Path, database_url: str = "") -> list[str]:
    """The keys (image ids) of every complete manifest."""
    database = Database(url_of(data_dir, database_url))
    try:
        records = await database.run(_records)
    finally:
        await database.close()
    return sorted(key for key, _, complete in records["manifests"] if complete)


async def inconsistencies(data_dir: Path, database_url: str = "") -> list[tuple[str, str]]:
    """(code, detail) of everything wrong with a store after a collection:
    - "pending-manifest": a put's manifest not finished (after a restart and
      a collection past PENDING_TTL, none is left; an upload's staged
      manifest, `upload-<id>`, waits for its resume and is not one);
    - "manifest-wrong": a complete manifest whose entries are not positions
      0..n-1 or whose lengths do not add up to its size, or entries of no
      manifest;
    - "chunk-missing": an entry of a complete manifest naming a chunk
      without a live, stored row, without its file, or whose file has not
      the entry's length (a staged upload's last batch may have been in
      flight when its process died: a resume drops those entries);
    - "chunk-refs-wrong": a chunk row whose refs differ from the entries
      naming it (a collection frees those with none: no row is unreferenced);
    - "orphan-chunk": a chunk file of no row of its generation (temporary
      files of a put, `.tmp-*`, are no chunks and are not counted)."""
    database = Database(url_of(data_dir, database_url))
    try:
        records = await database.run(_records)
    finally:
        await database.close()
    found: list[tuple[str, str]] = []
    root = chunks_root(data_dir)
    manifests = {key: (size, bool(complete)) for key, size, complete in records["manifests"]}
    chunks = {row[0]: row for row in records["chunks"]}
    by_key: dict[str, list[Any]] = {}
    for entry in records["entries"]:
        by_key.setdefault(entry[0], []).append(entry)
    for key, (_, complete) in sorted(manifests.items()):
        if not complete and not key.startswith(manifests_module.UPLOAD_PREFIX):
            found.append(("pending-manifest", key))
    for key, entries in sorted(by_key.items()):
        if key not in manifests:
            found.append(("manifest-wrong", f"{key}: {len(entries)} entries of no manifest"))
            continue
        size, complete = manifests[key]
        entries.sort(key=lambda e: e[1])
        if complete and (
            [e[1] for e in entries] != list(range(len(entries)))
            or sum(e[3] for e in entries) != size
        ):
            found.append(("manifest-wrong", f"{key}: entries do not make its {size} bytes"))
        for _, position, chunk, length in entries:
            if chunk is None or not complete:
                continue  # zeros: no chunk; or a staged upload's
            row = chunks.get(chunk)
            where = f"{key} at chunk {position}: {chunk[:12]}"
            if row is None or row[4] != "live" or not row[5]:
                found.append(("chunk-missing", f"{where}: row {row}"))
                continue
            path = root / chunk[:2] / f"{chunk}.{row[1]}"
            if not path.exists() or path.stat().st_size != length:
                found.append(("chunk-missing", f"{where}: no file of {length} bytes"))
    named = Counter(e[2] for e in records["entries"] if e[2] is not None)
    for chunk, row in sorted(chunks.items()):
        if row[3] != named[chunk] or named[chunk] == 0:
            found.append(
                ("chunk-refs-wrong", f"{chunk[:12]}: refs {row[3]}, {named[chunk]} entries")
            )
    for path in all_chunk_files(data_dir):
        parsed = parse_object_name(path.name)
        row = chunks.get(parsed[0]) if parsed else None
        if parsed is None or row is None or row[1] != parsed[1]:
            found.append(("orphan-chunk", str(path.relative_to(data_dir))))
    return found


async def plant_manifest(
    data_dir: Path,
    source: str,
    key: str,
    database_url: str = "",
    *,
    pending_for: timedelta | None = None,
) -> None:
    """Gives `key` (an image name, or a put's pending key) a manifest naming
    the chunks of `source`'s, as a copy does (the chunks' refs count it):
    what a crash or an earlier process could leave. With `pending_for`, the
    manifest is an unfinished put's, untouched for that long."""
    target = _image_id(key)
    database = Database(url_of(data_dir, database_url))

    def plant(connection: Connection) -> None:
        now = datetime.now(UTC)
        assert manifests.copy(connection, _image_id(source), target, now), f"{source} not stored"
        if pending_for is not None:
            connection.execute(
                update(manifests.MANIFESTS)
                .where(manifests.MANIFESTS.c.key == target)
                .values(complete=False, update_time=now - pending_for)
            )

    try:
        await database.run(plant, write=True)
    finally:
        await database.close()


def manifest_keys(data_dir: Path, database_url: str = "") -> list[str]:
    """Every manifest's key, complete or pending (SQLite)."""
    with closing(sqlite3.connect(_database(data_dir, database_url))) as connection:
        return sorted(key for (key,) in connection.execute("SELECT key FROM manifests"))


def plant_orphan_chunk(data_dir: Path) -> Path:
    """A chunk file no row claims (a freed generation whose deletion a crash
    cut off): the first sweep of orphans deletes it."""
    chunk, generation = os.urandom(32).hex(), os.urandom(8).hex()
    path = chunks_root(data_dir) / chunk[:2] / f"{chunk}.{generation}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(4096))
    return path


def plant_stale_temp_chunk(data_dir: Path, age: timedelta = timedelta(hours=2)) -> Path:
    """A temporary file of a put a crash cut off, `age` old (a sweep of
    orphans deletes those older than an hour)."""
    path = chunks_root(data_dir) / "00" / f".tmp-{uuid.uuid4().hex}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(4096))
    then = datetime.now(UTC).timestamp() - age.total_seconds()
    os.utime(path, (then, then))
    return path


async def lose_manifest(data_dir: Path, image: str, database_url: str = "") -> None:
    """Drops the image's manifest (and its references: the chunks are left
    to the collector): the store no longer knows the image's bytes."""
    database = Database(url_of(data_dir, database_url))
    try:
        released = await database.run(lambda c: manifests.release(c, _image_id(image)), write=True)
    finally:
        await database.close()
    assert released, f"{image} has no manifest"
