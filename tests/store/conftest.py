"""Fixtures of the persistence tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from bms_image.store.db import Database


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[Database]:
    """A migrated, empty database (SQLite, then PostgreSQL)."""
    db = Database(database_url)
    await db.migrate()
    yield db
    await db.close()
