"""Engine creation, transactions and migrations for SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

MIGRATIONS = Path(__file__).parent / "migrations"
_WRITE = "bms_write"
MIGRATION_LOCK = 7405011
SEED_LOCK = 7405012


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


def _configure_sqlite(engine: AsyncEngine, synchronous: str) -> None:
    """WAL for concurrent readers; every write transaction starts with BEGIN
    IMMEDIATE, so a read-check-write (the quota check) holds the write lock
    from its first statement and concurrent writers queue instead of racing.
    `synchronous`: NORMAL (commits survive any crash of the process, the last
    ones may be lost, never corrupted, on a power loss) or FULL (an fsync per
    commit: they survive a power loss too, at ~10 ms a commit on this VM)."""

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout=30000")
        _enable_wal(cursor)
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Connection) -> None:
        write = connection.get_execution_options().get(_WRITE, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


class Database:
    """The engine plus read and write units of work."""

    def __init__(self, url: str, echo: bool = False, sqlite_synchronous: str = "FULL") -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        options: dict[str, Any] = {"echo": echo}
        if self.is_sqlite:
            options["connect_args"] = {"timeout": 30}
        else:
            options.update(pool_size=10, max_overflow=10, pool_pre_ping=True)
        self.engine = create_async_engine(url, **options)
        if self.is_sqlite:
            if sqlite_synchronous.upper() not in ("NORMAL", "FULL"):
                raise RuntimeError(
                    f"sqlite_synchronous must be NORMAL or FULL, not {sqlite_synchronous!r}"
                )
            _configure_sqlite(self.engine, sqlite_synchronous.upper())
        self._reader = async_sessionmaker(self.engine, expire_on_commit=False)
        self._writer = async_sessionmaker(
            self.engine.execution_options(**{_WRITE: True}), expire_on_commit=False
        )
        #: SQLite admits one writer: this process's writers queue here, in
        #: order, instead of sleep-polling in SQLite's busy handler.
        self._write_turn = asyncio.Lock() if self.is_sqlite else None

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        async with self._reader() as session, session.begin():
            yield session

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncSession]:
        if self._write_turn is None:
            async with self._writer() as session, session.begin():
                yield session
            return
        async with self._write_turn, self._writer() as session, session.begin():
            yield session

    async def serialize(self, session: AsyncSession, key: int) -> None:
        """Queues write transactions of several processes (replicas) that use
        the same key until commit. SQLite's BEGIN IMMEDIATE already does."""
        if not self.is_sqlite:
            await session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})

    async def migrate(self) -> None:
        """Brings the schema to the newest migration. On PostgreSQL an advisory
        lock keeps replicas that start together from migrating twice."""
        async with self.engine.execution_options(**{_WRITE: True}).begin() as connection:
            if not self.is_sqlite:
                await connection.execute(text(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"))
            await connection.run_sync(_upgrade)

    async def ping(self) -> None:
        async with self.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))

    async def close(self) -> None:
        await self.engine.dispose()


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def _upgrade(connection: Connection) -> None:
    command.upgrade(alembic_config(connection), "head")
