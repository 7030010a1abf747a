"""The SQLite URLs the README documents: sqlite:///path and
sqlite+aiosqlite:///path name the same file; an in-memory database, which
every connection would see afresh, is refused with a message."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from bms_image.store.db import Database


async def test_an_aiosqlite_url_names_the_same_file(tmp_path: Path) -> None:
    path = tmp_path / "bms-image.db"
    plain = Database(f"sqlite:///{path}")
    await plain.migrate()
    await plain.run(
        lambda c: c.execute(text("CREATE TABLE marker (note TEXT)")).rowcount, write=True
    )
    await plain.close()
    legacy = Database(f"sqlite+aiosqlite:///{path}")
    try:
        tables = await legacy.run(
            lambda c: set(c.execute(text("SELECT name FROM sqlite_master")).scalars())
        )
    finally:
        await legacy.close()
    assert {"marker", "images"} <= tables


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:", "sqlite+aiosqlite://"])
def test_an_in_memory_database_is_refused(url: str) -> None:
    with pytest.raises(RuntimeError, match="must be a file"):
        Database(url)
