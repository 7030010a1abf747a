"""Helpers of the schema tests: what Alembic's autogenerate finds between a
migrated database and the models of both schemas (images and fleet). Plain
functions: import them as `from schema_support import ...`."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import MetaData
from sqlalchemy.engine import Connection

from bms_image.fleet.adapters.tables import Base as FleetBase
from bms_image.images.adapters.tables import Base as ImageBase
from bms_image.store.db import FLEET


def not_a_version_table(name: str | None, type_: str, _parents: object) -> bool:
    """Alembic leaves out the version table it is configured with, not the
    other chain's."""
    return not (type_ == "table" and name == FLEET.version_table)


def schema_diff(connection: Connection) -> list[Any]:
    """What the database has that the models of both schemas do not (or the
    other way round); [] once the migrations match the models."""
    context = MigrationContext.configure(
        connection,
        opts={
            "compare_type": True,
            "compare_server_default": False,
            "include_name": not_a_version_table,
        },
    )
    return list(compare_metadata(context, [ImageBase.metadata, FleetBase.metadata]))  # type: ignore[arg-type]


def tables_dropped_for_empty_metadata(connection: Connection) -> set[str]:
    """The tables autogenerate would drop to reach no models at all."""
    context = MigrationContext.configure(connection, opts={"include_name": not_a_version_table})
    diff = compare_metadata(context, MetaData())
    return {change[1].name for change in diff if change[0] == "remove_table"}
