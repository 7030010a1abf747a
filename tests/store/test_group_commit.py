"""GroupCommitWriter: the writes waiting together share one transaction, yet
each is atomic on its own, and its caller hears of it only once committed."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Integer,
    MetaData,
    Table,
    create_engine,
    event,
    select,
)
from sqlalchemy import insert as sql_insert

from bms_image.store.group_commit import GroupCommitWriter

METADATA = MetaData()
ITEMS = Table("items", METADATA, Column("id", Integer, primary_key=True))


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = create_engine(f"sqlite:///{tmp_path / 'items.db'}")
    METADATA.create_all(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def commits(engine: Engine) -> list[int]:
    """One entry per COMMIT the engine issues."""
    seen: list[int] = []
    event.listen(engine, "commit", lambda _connection: seen.append(1))
    return seen


def stored(engine: Engine) -> list[int]:
    with engine.connect() as connection:
        return list(connection.scalars(select(ITEMS.c.id).order_by(ITEMS.c.id)))


def add(item: int) -> object:
    def work(connection: Connection) -> int:
        connection.execute(sql_insert(ITEMS), {"id": item})
        return item

    return work


def blocked_writer(engine: Engine) -> tuple[GroupCommitWriter, threading.Event]:
    """A writer busy with a first unit of work until the event is set, so that
    whatever is submitted meanwhile waits and forms the next batch."""
    writer = GroupCommitWriter(engine)
    release, started = threading.Event(), threading.Event()

    def first(connection: Connection) -> None:
        started.set()
        release.wait(10)

    writer.submit(first)
    assert started.wait(10)
    return writer, release


def test_writes_that_wait_together_share_one_commit(engine: Engine, commits: list[int]) -> None:
    statements: list[str] = []
    event.listen(
        engine, "before_cursor_execute", lambda *args: statements.append(args[2].split()[0])
    )
    writer, release = blocked_writer(engine)
    futures = [writer.submit(add(n)) for n in range(1, 11)]
    assert not any(f.done() for f in futures), "nobody hears of a write before its commit"
    release.set()
    assert [f.result(10) for f in futures] == list(range(1, 11))
    writer.close()
    assert len(commits) == 2, "the first unit's commit, then one for the ten that waited"
    assert "SAVEPOINT" not in statements, "units that all succeed need no savepoints"
    assert stored(engine) == list(range(1, 11))


def test_a_failing_unit_is_rolled_back_alone(engine: Engine) -> None:
    writer, release = blocked_writer(engine)

    def half_then_fail(connection: Connection) -> None:
        connection.execute(sql_insert(ITEMS), {"id": 100})
        raise ValueError("quota exceeded")

    before = writer.submit(add(1))
    failing = writer.submit(half_then_fail)
    after = writer.submit(add(2))
    duplicate = writer.submit(add(1))  # a constraint violation inside the batch
    release.set()
    assert before.result(10) == 1 and after.result(10) == 2
    with pytest.raises(ValueError, match="quota exceeded"):
        failing.result(10)
    with pytest.raises(Exception, match="UNIQUE"):
        duplicate.result(10)
    writer.close()
    assert stored(engine) == [1, 2], "the failed units left nothing, the others all they wrote"


def test_a_cancelled_write_is_not_run(engine: Engine) -> None:
    writer, release = blocked_writer(engine)
    cancelled, kept = writer.submit(add(1)), writer.submit(add(2))
    assert cancelled.cancel(), "a write still waiting can be cancelled"
    release.set()
    assert kept.result(10) == 2
    writer.close()
    assert stored(engine) == [2]


def test_a_failed_commit_fails_its_whole_batch_and_the_writer_goes_on(engine: Engine) -> None:
    fail_next_commit = [True]

    def commit(_connection: Connection) -> None:
        if fail_next_commit[0]:
            fail_next_commit[0] = False
            raise OSError("disk I/O error")

    writer = GroupCommitWriter(engine)
    event.listen(engine, "commit", commit)
    with pytest.raises(OSError, match="disk I/O error"):
        writer.submit(add(1)).result(10)
    assert writer.submit(add(2)).result(10) == 2, "the writer is still there"
    writer.close()
    assert stored(engine) == [2]


def test_close_runs_what_was_submitted_before(engine: Engine) -> None:
    writer, release = blocked_writer(engine)
    futures = [writer.submit(add(n)) for n in (1, 2, 3)]
    release.set()
    writer.close()
    assert all(f.done() and f.exception() is None for f in futures)
    assert stored(engine) == [1, 2, 3]


def test_a_write_after_close_is_refused_not_left_waiting(engine: Engine) -> None:
    writer = GroupCommitWriter(engine)
    writer.close()
    with pytest.raises(RuntimeError, match="closed"):
        writer.submit(add(1))
    writer.close()  # closing twice is harmless
