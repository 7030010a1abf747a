"""The flavors have one source, the shared catalog file: the fleet reads it
directly, and the image service's `flavors` table is brought back to it on
every start, so both processes agree on a flavor's hardware model."""

from __future__ import annotations

from sqlalchemy import update

from bms_image.common.flavors import load_flavors
from bms_image.images.adapters.catalog import seed_flavors
from bms_image.images.adapters.repository import FLAVOR_ROWS, SqlFlavorRepository
from bms_image.store.db import Database


def _specs(flavors: list) -> list[tuple[str, str, int]]:  # type: ignore[type-arg]
    return [(f.name, f.hardware_model, f.memory_gib) for f in flavors]


async def test_the_table_says_what_the_file_says(database: Database) -> None:
    await seed_flavors(database)
    stored = await SqlFlavorRepository(database).list_flavors()
    assert _specs(stored) == _specs(load_flavors())


async def test_a_changed_row_is_brought_back_to_the_file(database: Database) -> None:
    await seed_flavors(database)
    name = load_flavors()[0].name

    def tamper(connection) -> None:  # type: ignore[no-untyped-def]
        connection.execute(
            update(FLAVOR_ROWS)
            .where(FLAVOR_ROWS.c.name == name)
            .values(hardware_model="another-model", memory_gib=1)
        )

    await database.run(tamper, write=True)
    assert await seed_flavors(database) == 1
    stored = await SqlFlavorRepository(database).list_flavors()
    assert _specs(stored) == _specs(load_flavors())
    assert await seed_flavors(database) == 0
