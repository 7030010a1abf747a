"""Engine creation, transactions and migrations for SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, make_url, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bms_image.store.group_commit import GroupCommitWriter


@dataclass(frozen=True)
class Schema:
    """The tables one process owns and migrates: an Alembic chain of its own,
    recorded in a version table of its own, so each process upgrades only
    what it owns and both can share one database (the embedded default)."""

    name: str
    migrations: Path
    version_table: str


#: The image service's: images, tags, flavors, members, projects, the
#: deployment marker (images/adapters/tables.py). Its history since 0001 is
#: kept in `alembic_version`, so databases made before the split upgrade.
IMAGES = Schema("images", Path(__file__).parent / "migrations", "alembic_version")
#: The fleet's: servers (fleet/adapters/tables.py).
FLEET = Schema("fleet", Path(__file__).parent / "fleet_migrations", "fleet_alembic_version")
#: Kept for callers that name the image service's migrations directory.
MIGRATIONS = IMAGES.migrations
_WRITE = "bms_write"
MIGRATION_LOCK = 7405011
SEED_LOCK = 7405012
#: Threads that run read units of work on SQLite (writes have one of their own).
SQLITE_READ_THREADS = 4

T = TypeVar("T")
#: A unit of work: plain SQLAlchemy Core statements on one connection, in one
#: transaction that commits when it returns and rolls back when it raises. It
#: may be run again after a rollback (group_commit), so it touches nothing but
#: the connection.
Work = Callable[[Connection], T]


def _enable_wal(cursor: Any) -> None:
    """Switching a database to WAL needs an exclusive lock and SQLite answers
    "database is locked" at once, without waiting, while another connection
    (a replica starting at the same moment) holds one: so retry for a while."""
    cursor.execute("PRAGMA journal_mode")
    if str(cursor.fetchone()[0]).lower() == "wal":
        return
    deadline = time.monotonic() + 30
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except Exception as error:  # the driver's OperationalError, whichever adapter
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _configure_sqlite(engine: Engine, synchronous: str) -> None:
    """WAL for concurrent readers; every write transaction starts with BEGIN
    IMMEDIATE, so a read-check-write (the quota check) holds the write lock
    from its first statement and concurrent writers queue instead of racing.
    `synchronous`: NORMAL (commits survive any crash of the process, the last
    ones may be lost, never corrupted, on a power loss) or FULL (an fsync per
    commit: they survive a power loss too, at ~10 ms a commit on this VM)."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout=30000")
        _enable_wal(cursor)
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        write = connection.get_execution_options().get(_WRITE, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


class _SqliteThreads:
    """SQLite units of work run whole in a thread, on the standard sqlite3
    driver: one hand-over from the event loop per transaction instead of one
    per statement, fetch and cursor close (what an asyncio bridge such as
    aiosqlite costs). Writes have a single thread of their own that commits
    those waiting together (group_commit), so this process's writers queue in
    order instead of sleep-polling in SQLite's busy handler, and share a
    commit's fsync."""

    def __init__(self, url: str, echo: bool, synchronous: str) -> None:
        sync_url = make_url(url).set(drivername="sqlite")
        if sync_url.database in (None, "", ":memory:"):
            raise RuntimeError(
                f"the SQLite database must be a file (every connection of an in-memory "
                f"database sees a different one): {url!r}"
            )
        self.engine = create_engine(
            sync_url,
            echo=echo,
            connect_args={"timeout": 30, "check_same_thread": False},
            pool_size=SQLITE_READ_THREADS + 1,
            max_overflow=0,
        )
        _configure_sqlite(self.engine, synchronous)
        self._reads = ThreadPoolExecutor(SQLITE_READ_THREADS, thread_name_prefix="sqlite-read")
        self._writes = GroupCommitWriter(self.engine.execution_options(**{_WRITE: True}))

    def _read(self, work: Work[T]) -> T:
        with self.engine.begin() as connection:
            return work(connection)

    async def run(self, work: Work[T], write: bool) -> T:
        if write:
            done = asyncio.wrap_future(self._writes.submit(work))
        else:
            done = asyncio.get_running_loop().run_in_executor(self._reads, self._read, work)
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            # The thread cannot be stopped mid-transaction: the caller learns
            # it was cancelled only once the outcome is settled, so nothing it
            # does next (a cache, a retry) races the commit.
            await asyncio.wait([done])
            raise

    def migrate(self, work: Work[None]) -> None:
        """Runs migrations (`work`) in one write transaction with foreign keys
        off, as SQLite asks for schema changes: Alembic's batch mode rebuilds
        a table (copy, DROP, rename), and with them on, the DROP's implicit
        DELETE would cascade to the rows that refer to it (an upgrade past
        0007 lost every tag, flavor link and member). Checked before commit.
        The pragma only takes effect outside a transaction, so it is set on
        the driver's connection around the one SQLAlchemy begins."""
        with self.engine.connect() as connection:
            driver = connection.connection.dbapi_connection
            assert driver is not None
            driver.execute("PRAGMA foreign_keys=OFF")
            try:
                with connection.execution_options(**{_WRITE: True}).begin():
                    work(connection)
                    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
                    if broken:
                        raise RuntimeError(f"migrations left broken foreign keys: {broken[:5]}")
            finally:
                driver.execute("PRAGMA foreign_keys=ON")

    def close(self) -> None:
        self._reads.shutdown(wait=True)
        self._writes.close()
        self.engine.dispose()


class Database:
    """Where the service keeps its records: every access is a unit of work
    (see Work) that `run` executes as one transaction; on SQLite in threads
    on the standard sqlite3 driver (writes grouped, see _SqliteThreads), on
    PostgreSQL through asyncpg."""

    def __init__(self, url: str, echo: bool = False, sqlite_synchronous: str = "FULL") -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self._sqlite: _SqliteThreads | None = None
        self._engine: AsyncEngine | None = None
        if self.is_sqlite:
            synchronous = sqlite_synchronous.upper()
            if synchronous not in ("NORMAL", "FULL"):
                raise RuntimeError(
                    f"sqlite_synchronous must be NORMAL or FULL, not {sqlite_synchronous!r}"
                )
            self._sqlite = _SqliteThreads(url, echo, synchronous)
        else:
            self._engine = create_async_engine(
                url, echo=echo, pool_size=10, max_overflow=10, pool_pre_ping=True
            )

    @property
    def description(self) -> str:
        """The URL, without its password (for logs and messages)."""
        return make_url(self.url).render_as_string(hide_password=True)

    async def run(self, work: Work[T], write: bool = False) -> T:
        """Runs a unit of work as one transaction: BEGIN IMMEDIATE on SQLite
        when `write` (every write of the process goes through one thread and
        may share its commit with others waiting), a plain transaction on
        PostgreSQL (where writes lock rows or use serialize)."""
        if self._sqlite is not None:
            return await self._sqlite.run(work, write)
        assert self._engine is not None
        async with self._engine.begin() as connection:
            return await connection.run_sync(work)

    async def migrate(self, *schemas: Schema) -> None:
        """Brings each schema (by default the image service's, then the
        fleet's: what `bms-image migrate` and the embedded mode need) to its
        newest migration. On PostgreSQL an advisory lock keeps replicas that
        start together from migrating twice; on SQLite the write lock does
        (BEGIN IMMEDIATE), with foreign keys off (see _SqliteThreads.migrate)."""
        chosen = schemas or (IMAGES, FLEET)

        def upgrade(connection: Connection) -> None:
            serialize(connection, MIGRATION_LOCK)
            for schema in chosen:
                command.upgrade(alembic_config(connection, schema), "head")

        if self._sqlite is not None:
            await asyncio.to_thread(self._sqlite.migrate, upgrade)
        else:
            await self.run(upgrade, write=True)

    async def ping(self) -> None:
        await self.run(lambda connection: connection.execute(text("SELECT 1")).scalar_one())

    async def close(self) -> None:
        if self._sqlite is not None:
            await asyncio.to_thread(self._sqlite.close)
        if self._engine is not None:
            await self._engine.dispose()


def serialize(connection: Connection, key: int) -> None:
    """Within a unit of work: queues the transactions of every process
    (replica) that use the same key, until commit. On SQLite a write's BEGIN
    IMMEDIATE already does."""
    if connection.dialect.name != "sqlite":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})


def alembic_config(connection: Connection | None = None, schema: Schema = IMAGES) -> Config:
    """The Alembic configuration of one schema's chain (env.py reads the
    connection and the version table from its attributes)."""
    config = Config()
    config.set_main_option("script_location", str(schema.migrations))
    config.attributes["connection"] = connection
    config.attributes["version_table"] = schema.version_table
    return config
