"""The chunk store's records, as units of work on a Core connection: which
chunks exist (and how many manifest entries reference each), and each key's
manifest.

The protocol that keeps every referenced chunk's bytes (README "Chunk
store", "Garbage collection"):

- A writer references chunks *before* it stores their bytes: `reference`
  adds its entries' counts to `refs` in one transaction, and returns the
  generation to store each chunk's bytes under. A chunk being freed
  (`deleting`) is taken over with a new generation, so the collector's
  deletion of the old generation's object cannot touch the new bytes.
- The collector frees a chunk only through `mark_freeable`, which sets
  `deleting` on rows it finds at refs = 0 under their row lock, so a
  concurrent `reference` either comes first (refs > 0: not freed) or after
  (a new generation). It then deletes the object and `forget`s the row of
  that generation. A crash in between leaves `deleting` rows, which the next
  sweep finishes; an object without a live row of its generation is an
  orphan, which any sweep may delete.
- Chunk rows are locked in id order everywhere (the upserts are sorted, the
  releases lock first), so two writers on PostgreSQL never deadlock.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Connection,
    Table,
    and_,
    bindparam,
    case,
    delete,
    false,
    func,
    insert,
    select,
    true,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from bms_image.images.adapters.tables import ChunkRow, ManifestChunkRow, ManifestRow

CHUNKS: Table = ChunkRow.__table__  # type: ignore[assignment]
MANIFESTS: Table = ManifestRow.__table__  # type: ignore[assignment]
ENTRIES: Table = ManifestChunkRow.__table__  # type: ignore[assignment]

LIVE = "live"
DELETING = "deleting"
#: The key of a put in progress (a manifest not yet under its key).
PENDING_PREFIX = "pending-"
#: The key of an upload's staged bytes (README "Chunk store", "Uploads"): a
#: manifest left incomplete for as long as the upload may be resumed, which
#: the collector never takes for abandoned.
UPLOAD_PREFIX = "upload-"


class ManifestGone(Exception):
    """The manifest a writer appends to, or finishes, is no longer there
    (its image was deleted meanwhile)."""


@dataclass(frozen=True)
class Entry:
    """A manifest entry as a reader needs it."""

    position: int
    chunk_id: str | None  # None: a chunk of zeros
    length: int
    generation: str | None  # the chunk's generation (None if the row is gone)
    live: bool
    stored: bool = False  # whether that generation's bytes are known durable

    @property
    def durable(self) -> bool:
        """Whether the entry's bytes are there: zeros, or a live chunk whose
        bytes were stored."""
        return self.chunk_id is None or (self.generation is not None and self.live and self.stored)


@dataclass(frozen=True)
class Manifest:
    size: int
    chunk_bytes: int


def new_generation() -> str:
    return uuid.uuid4().hex[:16]


def pending_key() -> str:
    return f"{PENDING_PREFIX}{uuid.uuid4().hex}"


def upload_key(image_key: str) -> str:
    return f"{UPLOAD_PREFIX}{image_key}"


def _upsert(connection: Connection) -> Any:
    """INSERT ... ON CONFLICT of the connection's dialect."""
    dialect = sqlite if connection.dialect.name == "sqlite" else postgresql
    statement = dialect.insert(CHUNKS)
    live = CHUNKS.c.state == LIVE
    return statement.on_conflict_do_update(
        index_elements=[CHUNKS.c.id],
        set_={
            # Every SET reads the row as it was: a live chunk gains the
            # references; one being freed starts over under a new generation.
            "refs": case(
                (live, CHUNKS.c.refs + statement.excluded.refs), else_=statement.excluded.refs
            ),
            "generation": case((live, CHUNKS.c.generation), else_=statement.excluded.generation),
            "stored": case((live, CHUNKS.c.stored), else_=false()),
            "state": LIVE,
            "update_time": statement.excluded.update_time,
        },
    ).returning(CHUNKS.c.id, CHUNKS.c.generation, CHUNKS.c.stored)


def reference(
    connection: Connection, counts: Mapping[str, tuple[int, int]], now: datetime
) -> dict[str, tuple[str, bool]]:
    """Adds `count` references to each chunk (id -> (count, size)), creating
    the rows of new ones; returns id -> (generation to store its bytes
    under, whether that generation's bytes are known durable)."""
    statement = _upsert(connection)
    found: dict[str, tuple[str, bool]] = {}
    for chunk in sorted(counts):
        count, size = counts[chunk]
        row = connection.execute(
            statement,
            {
                "id": chunk,
                "generation": new_generation(),
                "size": size,
                "refs": count,
                "state": LIVE,
                "stored": False,
                "update_time": now,
            },
        ).one()
        found[row.id] = (row.generation, bool(row.stored))
    return found


_MARK_STORED = (
    update(CHUNKS)
    .where(CHUNKS.c.id == bindparam("chunk"), CHUNKS.c.generation == bindparam("gen"))
    .values(stored=true())
)


def mark_stored(connection: Connection, generations: Mapping[str, str]) -> None:
    """Records that these chunks' bytes (id -> generation) are durable."""
    if generations:
        connection.execute(
            _MARK_STORED, [{"chunk": c, "gen": g} for c, g in sorted(generations.items())]
        )


def create(connection: Connection, key: str, chunk_bytes: int, now: datetime) -> None:
    connection.execute(
        insert(MANIFESTS),
        {"key": key, "size": 0, "chunk_bytes": chunk_bytes, "complete": False, "update_time": now},
    )


def ensure(connection: Connection, key: str, chunk_bytes: int, now: datetime) -> int:
    """Creates the incomplete manifest `key` unless it exists; returns its
    chunk size (an upload resumed keeps the size it was staged with)."""
    found = chunk_size(connection, key)
    if found is not None:
        return found
    create(connection, key, chunk_bytes, now)
    return chunk_bytes


def keys_with_prefix(connection: Connection, prefix: str) -> list[str]:
    return list(
        connection.execute(
            select(MANIFESTS.c.key).where(MANIFESTS.c.key.startswith(prefix, autoescape=True))
        ).scalars()
    )


def append(
    connection: Connection,
    key: str,
    entries: Sequence[tuple[int, str | None, int]],
    now: datetime,
) -> None:
    """Adds entries (position, chunk id or None, length) to a manifest and
    touches it (a put in progress is alive); ManifestGone if it is not there
    (then nothing is added: the caller's transaction rolls back)."""
    touched = connection.execute(
        update(MANIFESTS).where(MANIFESTS.c.key == key).values(update_time=now)
    ).rowcount
    if not touched:
        raise ManifestGone(key)
    if entries:
        connection.execute(
            insert(ENTRIES),
            [{"key": key, "position": p, "chunk_id": c, "length": n} for p, c, n in entries],
        )


def _lock_chunks_of(connection: Connection, key: str, first: int = 0) -> None:
    if connection.dialect.name != "sqlite":  # SQLite's BEGIN IMMEDIATE already serialises
        connection.execute(
            select(CHUNKS.c.id)
            .where(CHUNKS.c.id.in_(_chunks_of(key, first)))
            .order_by(CHUNKS.c.id)
            .with_for_update()
        ).all()


def _of(key: str, first: int) -> Any:
    """The key's entries from position `first` on."""
    return and_(ENTRIES.c.key == key, ENTRIES.c.position >= first)


def _chunks_of(key: str, first: int = 0) -> Any:
    return select(ENTRIES.c.chunk_id).where(_of(key, first), ENTRIES.c.chunk_id.is_not(None))


def _adjust_refs(connection: Connection, key: str, sign: int, first: int = 0) -> None:
    """refs +/-= the number of the key's entries (from `first` on) naming
    each chunk."""
    count = (
        select(func.count())
        .where(_of(key, first), ENTRIES.c.chunk_id == CHUNKS.c.id)
        .scalar_subquery()
    )
    connection.execute(
        update(CHUNKS)
        .where(CHUNKS.c.id.in_(_chunks_of(key, first)))
        .values(refs=CHUNKS.c.refs + sign * count)
    )


def truncate(connection: Connection, key: str, first: int) -> None:
    """Drops the key's entries from position `first` on, and their
    references (a resume that continues before them)."""
    _lock_chunks_of(connection, key, first)
    _adjust_refs(connection, key, -1, first)
    connection.execute(delete(ENTRIES).where(_of(key, first)))


def release(connection: Connection, key: str) -> bool:
    """Drops the key's manifest and its references; False if it had none."""
    truncate(connection, key, 0)
    return connection.execute(delete(MANIFESTS).where(MANIFESTS.c.key == key)).rowcount > 0


def finish(connection: Connection, pending: str, key: str, size: int, now: datetime) -> None:
    """The pending manifest becomes the key's (whose old one is released);
    ManifestGone if the pending one is not there (then nothing changes: the
    caller's transaction rolls back)."""
    release(connection, key)
    renamed = connection.execute(
        update(MANIFESTS)
        .where(MANIFESTS.c.key == pending)
        .values(key=key, size=size, complete=True, update_time=now)
    ).rowcount
    if not renamed:
        raise ManifestGone(pending)
    connection.execute(update(ENTRIES).where(ENTRIES.c.key == pending).values(key=key))


def copy(connection: Connection, source: str, target: str, now: datetime) -> bool:
    """The target gets a manifest naming the source's chunks (no bytes move);
    False if the source has no complete manifest."""
    found = manifest(connection, source)
    if found is None:
        return False
    release(connection, target)
    connection.execute(
        insert(MANIFESTS),
        {
            "key": target,
            "size": found.size,
            "chunk_bytes": found.chunk_bytes,
            "complete": True,
            "update_time": now,
        },
    )
    connection.execute(
        insert(ENTRIES).from_select(
            ["key", "position", "chunk_id", "length"],
            select(
                bindparam("target", target),
                ENTRIES.c.position,
                ENTRIES.c.chunk_id,
                ENTRIES.c.length,
            ).where(ENTRIES.c.key == source),
        )
    )
    _lock_chunks_of(connection, target)
    _adjust_refs(connection, target, +1)
    return True


def manifest(connection: Connection, key: str) -> Manifest | None:
    row = connection.execute(
        select(MANIFESTS.c.size, MANIFESTS.c.chunk_bytes).where(
            MANIFESTS.c.key == key, MANIFESTS.c.complete == true()
        )
    ).first()
    return Manifest(row.size, row.chunk_bytes) if row is not None else None


def chunk_size(connection: Connection, key: str) -> int | None:
    """The chunk size of the key's manifest, complete or not; None if none."""
    found = connection.execute(
        select(MANIFESTS.c.chunk_bytes).where(MANIFESTS.c.key == key)
    ).scalar_one_or_none()
    return None if found is None else int(found)


def entries(connection: Connection, key: str, first: int, limit: int) -> list[Entry]:
    """Entries from position `first` on, at most `limit`, with their chunks'
    generations."""
    rows = connection.execute(
        select(
            ENTRIES.c.position,
            ENTRIES.c.chunk_id,
            ENTRIES.c.length,
            CHUNKS.c.generation,
            CHUNKS.c.state,
            CHUNKS.c.stored,
        )
        .select_from(ENTRIES.outerjoin(CHUNKS, CHUNKS.c.id == ENTRIES.c.chunk_id))
        .where(_of(key, first))
        .order_by(ENTRIES.c.position)
        .limit(limit)
    )
    return [
        Entry(r.position, r.chunk_id, r.length, r.generation, r.state == LIVE, bool(r.stored))
        for r in rows
    ]


def complete_keys(connection: Connection) -> list[str]:
    return list(
        connection.execute(select(MANIFESTS.c.key).where(MANIFESTS.c.complete == true())).scalars()
    )


def abandoned(connection: Connection, before: datetime) -> list[str]:
    """Pending manifests untouched since `before`: their puts died. (An
    upload's staged manifest is not a put's: it waits for its resume, and
    goes with its image.)"""
    return list(
        connection.execute(
            select(MANIFESTS.c.key).where(
                MANIFESTS.c.complete == false(),
                MANIFESTS.c.update_time < before,
                MANIFESTS.c.key.startswith(PENDING_PREFIX),
            )
        ).scalars()
    )


def mark_freeable(connection: Connection, limit: int) -> list[tuple[str, str]]:
    """(id, generation) of chunks to free: those left `deleting` by a sweep
    that died, and unreferenced live ones, now marked `deleting`."""
    left = connection.execute(
        select(CHUNKS.c.id, CHUNKS.c.generation).where(CHUNKS.c.state == DELETING).limit(limit)
    ).all()
    candidates = sorted(
        connection.execute(
            select(CHUNKS.c.id).where(CHUNKS.c.refs <= 0, CHUNKS.c.state == LIVE).limit(limit)
        ).scalars()
    )
    marked: Sequence[Any] = []
    if candidates and connection.dialect.name != "sqlite":
        # Lock in id order first, as every writer does: no deadlock.
        connection.execute(
            select(CHUNKS.c.id)
            .where(CHUNKS.c.id.in_(candidates))
            .order_by(CHUNKS.c.id)
            .with_for_update()
        ).all()
    if candidates:
        # The conditions again, under the rows' locks: a writer that
        # referenced a chunk since keeps it.
        marked = connection.execute(
            update(CHUNKS)
            .where(CHUNKS.c.id.in_(candidates), CHUNKS.c.refs <= 0, CHUNKS.c.state == LIVE)
            .values(state=DELETING)
            .returning(CHUNKS.c.id, CHUNKS.c.generation)
        ).all()
    return [(r.id, r.generation) for r in (*left, *marked)]


def forget(connection: Connection, freed: Sequence[tuple[str, str]]) -> int:
    """Deletes the rows of freed chunks, each only in the generation freed."""
    removed = 0
    for chunk, generation in sorted(freed):
        removed += connection.execute(
            delete(CHUNKS).where(
                and_(CHUNKS.c.id == chunk, CHUNKS.c.generation == generation),
                CHUNKS.c.state == DELETING,
            )
        ).rowcount
    return removed


def live_generations(connection: Connection, chunks: Sequence[str]) -> set[tuple[str, str]]:
    """(id, generation) of those chunks that have a row (live or deleting)."""
    if not chunks:
        return set()
    rows = connection.execute(
        select(CHUNKS.c.id, CHUNKS.c.generation).where(CHUNKS.c.id.in_(list(chunks)))
    )
    return {(r.id, r.generation) for r in rows}


@dataclass(frozen=True)
class StoreStats:
    """What operators watch: logical bytes (the images' sizes) against the
    bytes stored (chunks, plus an estimate of the records that index them)."""

    chunks: int
    chunk_bytes: int
    manifests: int
    entries: int
    logical_bytes: int
    unreferenced: int

    #: Bytes a manifest entry and a chunk row take in the database, about.
    ENTRY_BYTES = 100
    CHUNK_ROW_BYTES = 120

    @property
    def stored_bytes(self) -> int:
        return (
            self.chunk_bytes + self.entries * self.ENTRY_BYTES + self.chunks * self.CHUNK_ROW_BYTES
        )

    @property
    def dedup_ratio(self) -> float:
        return self.logical_bytes / self.stored_bytes if self.stored_bytes else 1.0


def stats(connection: Connection) -> StoreStats:
    chunk_count, chunk_bytes = connection.execute(
        select(func.count(), func.coalesce(func.sum(CHUNKS.c.size), 0)).select_from(CHUNKS)
    ).one()
    unreferenced = connection.execute(
        select(func.count()).select_from(CHUNKS).where(CHUNKS.c.refs <= 0)
    ).scalar_one()
    manifests, logical = connection.execute(
        select(func.count(), func.coalesce(func.sum(MANIFESTS.c.size), 0))
        .select_from(MANIFESTS)
        .where(MANIFESTS.c.complete == true())
    ).one()
    entry_count = connection.execute(select(func.count()).select_from(ENTRIES)).scalar_one()
    return StoreStats(
        int(chunk_count),
        int(chunk_bytes),
        int(manifests),
        int(entry_count),
        int(logical),
        int(unreferenced),
    )
