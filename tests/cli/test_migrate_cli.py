"""`bms-image migrate --schema`: a provisioner with a database of its own
gets only the fleet's tables, an image service only its own, and the
embedded default both."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bms_image.cli import app

IMAGE_TABLES = {"images", "image_tags", "image_flavors", "image_members", "flavors"}


def _tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as connection:
        rows = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        return {name for (name,) in rows}


@pytest.mark.parametrize(
    ("schema", "present", "absent"),
    [
        ("fleet", {"servers", "fleet_alembic_version"}, IMAGE_TABLES | {"alembic_version"}),
        ("images", IMAGE_TABLES | {"alembic_version"}, {"servers", "fleet_alembic_version"}),
        ("all", IMAGE_TABLES | {"servers", "alembic_version", "fleet_alembic_version"}, set()),
    ],
)
def test_migrate_creates_only_the_chosen_schema(
    tmp_path: Path, schema: str, present: set[str], absent: set[str]
) -> None:
    database = tmp_path / "db.sqlite"
    result = CliRunner().invoke(
        app,
        ["migrate", "--schema", schema, "--data-dir", str(tmp_path / "data"),
         "--database-url", f"sqlite+aiosqlite:///{database}"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    tables = _tables(database)
    assert present <= tables
    assert not (absent & tables)


def test_an_unknown_schema_is_refused_with_the_choices(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["migrate", "--schema", "servers", "--data-dir", str(tmp_path / "data")]
    )
    assert result.exit_code == 2
    assert "--schema must be images, fleet or all, not 'servers'" in result.output
