"""get_recent, the memory behind GetImage: this process's own changes show
at once; another process's (a direct write here) once the entry expires; a
read that overlaps a write does not remember what it read. Both databases."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from sqlalchemy import update

from bms_image.common.model import Architecture, DiskFormat, Image, ImageStatus, OsType, Visibility
from bms_image.images.adapters.repository import SqlImageRepository
from bms_image.store.db import Database
from bms_image.store.tables import ImageRow


def new_image(name: str) -> Image:
    now = datetime.now(UTC)
    return Image(
        id=f"00000000-0000-4000-8000-{abs(hash(name)) % 10**12:012d}",
        display_name=name,
        visibility=Visibility.PRIVATE,
        owner_project="alpha",
        creator_project="alpha",
        os_type=OsType.LINUX,
        os_distro="centos",
        os_version="7.6",
        architecture=Architecture.X86_64,
        disk_format=DiskFormat.RAW,
        min_disk_gb=40,
        status=ImageStatus.QUEUED,
        hardware_model="s4-2288h-v5",
        create_time=now,
        update_time=now,
    )


async def write_elsewhere(database: Database, image_id: str, name: str) -> None:
    """A change made by another process: straight to the table."""
    change = update(ImageRow).where(ImageRow.id == image_id).values(display_name=name)
    await database.run(lambda connection: connection.execute(change).rowcount, write=True)


async def test_own_changes_show_at_once_others_after_expiry(database: Database) -> None:
    repository = SqlImageRepository(database, recent_seconds=0.3)
    image = await repository.create_private(new_image("first"), 50)
    assert (await repository.get_recent(image.id)).display_name == "first"  # type: ignore[union-attr]

    await write_elsewhere(database, image.id, "elsewhere")
    remembered = await repository.get_recent(image.id)
    assert remembered is not None and remembered.display_name == "first", "from memory"
    assert (await repository.get(image.id)).display_name == "elsewhere"  # type: ignore[union-attr]

    await asyncio.sleep(0.35)  # the entry expires (a bound, not a timing assertion)
    assert (await repository.get_recent(image.id)).display_name == "elsewhere"  # type: ignore[union-attr]

    current = await repository.get_recent(image.id)
    assert current is not None
    await repository.update(image.id, current.revision, {"display_name": "own"})
    assert (await repository.get_recent(image.id)).display_name == "own"  # type: ignore[union-attr]
    await repository.transition(image.id, {ImageStatus.QUEUED}, {"status": ImageStatus.DELETED})
    gone = await repository.get_recent(image.id)
    assert gone is not None and gone.status is ImageStatus.DELETED


async def test_a_read_overlapping_a_write_is_not_remembered(database: Database) -> None:
    repository = SqlImageRepository(database, recent_seconds=60)
    # Created by another process: this one has it from no write of its own.
    image = await SqlImageRepository(database).create_private(new_image("racy"), 50)
    read = repository.get

    async def read_then_let_a_write_happen(image_id: str) -> Image | None:
        found = await read(image_id)
        await repository.update(image.id, image.revision, {"display_name": "newer"})
        return found

    repository.get = read_then_let_a_write_happen  # type: ignore[method-assign]
    overlapped = await repository.get_recent(image.id)
    assert overlapped is not None and overlapped.display_name == "racy"
    repository.get = read  # type: ignore[method-assign]
    assert (await repository.get_recent(image.id)).display_name == "newer"  # type: ignore[union-attr]


async def test_what_this_process_writes_is_remembered_as_written(database: Database) -> None:
    repository = SqlImageRepository(database, recent_seconds=60)
    created = await repository.create_private(new_image("written"), 50)
    reads = 0
    read = repository.get

    async def counted(image_id: str) -> Image | None:
        nonlocal reads
        reads += 1
        return await read(image_id)

    repository.get = counted  # type: ignore[method-assign]
    assert await repository.get_recent(created.id) == created
    updated = await repository.update(created.id, created.revision, {"tags": ["b", "a"]})
    assert updated is not None and updated.tags == ["b", "a"] and updated.revision == 2
    assert await repository.get_recent(created.id) == updated
    assert reads == 0, "both answers came from what the writes returned"
    assert await read(created.id) == updated, "and they are what the database holds"


async def test_an_update_after_another_process_changed_the_tags_returns_theirs(
    database: Database,
) -> None:
    """What an update returns reuses remembered tags only when it found the
    image at the remembered revision."""
    repository = SqlImageRepository(database, recent_seconds=60)
    elsewhere = SqlImageRepository(database)
    created = await repository.create_private(new_image("tagged"), 50)
    assert await elsewhere.update(created.id, created.revision, {"tags": ["theirs"]})
    moved = await repository.transition(
        created.id, {ImageStatus.QUEUED}, {"status": ImageStatus.DELETED}
    )
    assert moved is not None and moved.tags == ["theirs"] and moved.revision == 3
    assert moved == await repository.get(created.id)


async def test_without_a_window_every_read_goes_to_the_database(database: Database) -> None:
    repository = SqlImageRepository(database)
    image = await repository.create_private(new_image("plain"), 50)
    await repository.get_recent(image.id)
    await write_elsewhere(database, image.id, "changed")
    assert (await repository.get_recent(image.id)).display_name == "changed"  # type: ignore[union-attr]
