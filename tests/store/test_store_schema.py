"""The store on its own, on SQLite and PostgreSQL: migrations, the schema they
build against tables.py, seeding, keyset pagination and the repository's
atomic operations under concurrency."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from schema_support import schema_diff, tables_dropped_for_empty_metadata
from sqlalchemy import MetaData, func, insert, inspect, select, text, update
from sqlalchemy.engine import Connection

from bms_image.common.errors import QuotaExceeded
from bms_image.common.model import (
    Architecture,
    Caller,
    Image,
    ImageStatus,
    OsType,
    RequestMethod,
    Visibility,
)
from bms_image.common.staging import Staging
from bms_image.fleet.adapters.tables import Base as FleetBase
from bms_image.images.adapters.blobs.local import LocalBlobStore
from bms_image.images.adapters.catalog import load_catalog, seed
from bms_image.images.adapters.repository import SqlImageRepository
from bms_image.images.adapters.tables import (
    Base,
    FlavorRow,
    ImageMemberRow,
    ImageRow,
    ImageTagRow,
    ProjectRow,
)
from bms_image.images.domain.query import ImageQuery, parse_filter
from bms_image.store.db import Database, alembic_config


def _head() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def _current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def _tables(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names())


async def _count(db: Database, model: type[Any]) -> int:
    statement = select(func.count()).select_from(model)
    return int(await db.run(lambda connection: connection.execute(statement).scalar_one()))


async def _seed(db: Database, root: Path) -> int:
    """seed() with small catalog disks, its blobs and staging under root."""
    return await seed(db, LocalBlobStore(root / "blobs"), Staging(root / "staging"), bulk_bytes=0)


def _private(project: str, name: str, **fields: Any) -> Image:
    now = datetime.now(UTC)
    values: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "display_name": name,
        "visibility": Visibility.PRIVATE,
        "owner_project": project,
        "creator_project": project,
        "os_type": OsType.LINUX,
        "os_distro": "centos",
        "os_version": "7.6",
        "architecture": Architecture.X86_64,
        "hardware_model": "s4-2288h-v5",
        "status": ImageStatus.QUEUED,
        "create_time": now,
        "update_time": now,
    }
    values.update(fields)
    return Image(**values)


# --- migrations --------------------------------------------------------------


async def test_migrate_twice_is_idempotent(database_url: str) -> None:
    db = Database(database_url)
    try:
        await db.migrate()
        first_tables = await db.run(_tables)
        assert await db.run(_current_revision) == _head()
        project = {"id": "alpha", "create_time": datetime.now(UTC)}
        await db.run(lambda c: c.execute(insert(ProjectRow), project), write=True)

        await db.migrate()
        assert await db.run(_tables) == first_tables
        assert await db.run(_current_revision) == _head()
        versions = await db.run(lambda c: c.execute(text("SELECT * FROM alembic_version")).all())
        assert len(versions) == 1
        assert await _count(db, ProjectRow) == 1  # data survives a second migrate
        assert {"images", "image_tags", "image_flavors", "flavors", "projects"} <= first_tables
    finally:
        await db.close()


async def test_replicas_migrating_together_both_succeed(database_url: str) -> None:
    """Replicas that start at once: one migrates, the others find it done."""
    replicas = [Database(database_url) for _ in range(3)]
    try:
        await asyncio.gather(*(db.migrate() for db in replicas))
        assert await replicas[0].run(_current_revision) == _head()
        assert await replicas[0].run(schema_diff) == []
    finally:
        for db in replicas:
            await db.close()


async def test_schema_after_migrations_matches_the_tables(database: Database) -> None:
    """Alembic autogenerate finds nothing to do: the migrations build exactly
    the schema tables.py declares (columns, types, nullability, indexes,
    unique constraints and foreign keys)."""
    diff = await database.run(schema_diff)
    # The comparison does see this database: against no tables at all it
    # would drop every table the migrations made.
    removed = await database.run(tables_dropped_for_empty_metadata)
    assert diff == []
    assert removed == set(Base.metadata.tables) | set(FleetBase.metadata.tables)


async def test_migration_0007_scopes_existing_request_ids_by_the_rpc_that_made_them(
    database_url: str,
) -> None:
    """Rows written before request_method existed: replicas (marked by their
    status reason while copied or after a failed copy, or ACTIVE at
    revision 2, which no upload reaches) become "replicate", every other
    row "create"; afterwards one request id serves both RPCs once each."""
    db = Database(database_url)
    now = datetime.now(UTC)

    def old_row(name: str, **fields: Any) -> dict[str, Any]:
        values = {
            "id": str(uuid.uuid4()), "display_name": name, "description": "",
            "visibility": "private", "owner_project": "beta", "creator_project": "beta",
            "os_type": "linux", "os_distro": "centos", "os_version": "7.6",
            "architecture": "x86_64", "disk_format": "raw", "size_bytes": 0,
            "min_disk_gb": 40, "sha256": "", "uploaded_bytes": 0, "status": "queued",
            "status_reason": "", "hardware_model": "s4-2288h-v5", "plugins": [],
            "partitions": [], "source_server": "", "protected": False, "deprecated": False,
            "request_id": str(uuid.uuid4()), "revision": 1, "create_time": now, "update_time": now,
        }  # fmt: skip
        values.update(fields)
        return values

    rows = {
        "created": old_row("created"),
        "uploaded": old_row("uploaded", status="active", revision=3),
        "updated-queued": old_row("updated-queued", revision=2),
        "captured": old_row("captured", status="active", revision=2, source_server="servers/x"),
        "killed-upload": old_row("killed-upload", status="killed", status_reason="bad bytes"),
        "copying": old_row("copying", status="saving", status_reason="replicating images/abc"),
        "copied": old_row("copied", status="active", revision=2),
        "copy-failed": old_row("copy-failed", status="killed", status_reason="copy failed: x"),
    }

    def before(connection: Connection) -> None:
        command.upgrade(alembic_config(connection), "0005")
        images = MetaData()
        images.reflect(connection, only=["images"])
        connection.execute(insert(images.tables["images"]), list(rows.values()))

    def methods(connection: Connection) -> dict[str, str]:
        statement = select(ImageRow.display_name, ImageRow.request_method)
        return {name: method for name, method in connection.execute(statement)}

    try:
        await db.run(before, write=True)
        await db.migrate()
        assert await db.run(methods) == {
            "created": "create",
            "uploaded": "create",
            "updated-queued": "create",
            "captured": "create",
            "killed-upload": "create",
            "copying": "replicate",
            "copied": "replicate",
            "copy-failed": "replicate",
        }
        repository = SqlImageRepository(db)
        copied = rows["copied"]["request_id"]
        found = await repository.find_by_request_id("beta", RequestMethod.REPLICATE, copied)
        assert found is not None and found.display_name == "copied"
        assert await repository.find_by_request_id("beta", RequestMethod.CREATE, copied) is None
        own = await repository.create_private(_private("beta", "own", request_id=copied), 50)
        assert own.display_name == "own" and own.request_method is RequestMethod.CREATE
    finally:
        await db.close()


# --- seeding -----------------------------------------------------------------


async def test_seed_twice_adds_rows_once(database: Database, tmp_path: Path) -> None:
    catalog = load_catalog()
    expected = len(catalog.flavors) + len(catalog.images)

    assert await _seed(database, tmp_path) == expected
    counts = (await _count(database, FlavorRow), await _count(database, ImageRow))
    assert counts == (len(catalog.flavors), len(catalog.images))
    tags = await _count(database, ImageTagRow)

    assert await _seed(database, tmp_path) == 0
    assert (await _count(database, FlavorRow), await _count(database, ImageRow)) == counts
    assert await _count(database, ImageTagRow) == tags


async def test_seed_keeps_what_operators_changed(database: Database, tmp_path: Path) -> None:
    await _seed(database, tmp_path)
    image_id = load_catalog().images[0].id
    change = (
        update(ImageRow).where(ImageRow.id == image_id).values(description="changed by an operator")
    )
    await database.run(lambda connection: connection.execute(change).rowcount, write=True)
    assert await _seed(database, tmp_path) == 0
    description = select(ImageRow.description).where(ImageRow.id == image_id)
    stored = await database.run(lambda connection: connection.execute(description).scalar_one())
    assert stored == "changed by an operator"


async def test_replicas_seeding_together_add_rows_once(
    database_url: str, database: Database, tmp_path: Path
) -> None:
    """Two replicas starting at once on a fresh database both seed: neither
    may fail, and every catalog row exists once."""
    catalog = load_catalog()
    replicas = [Database(database_url) for _ in range(2)]
    try:
        results = await asyncio.gather(
            *(_seed(db, tmp_path / f"replica-{i}") for i, db in enumerate(replicas)),
            return_exceptions=True,
        )
    finally:
        for db in replicas:
            await db.close()
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == [], f"a replica failed to seed: {errors[0]!r}" if errors else ""
    assert (await _count(database, FlavorRow), await _count(database, ImageRow)) == (
        len(catalog.flavors),
        len(catalog.images),
    )


# --- keyset pagination ---------------------------------------------------------


async def _share(db: Database, image: Image, project: str, status: str) -> None:
    now = datetime.now(UTC)
    member = {
        "image_id": image.id,
        "image_seq": image.seq,
        "project": project,
        "status": status,
        "create_time": now,
        "update_time": now,
    }
    await db.run(lambda connection: connection.execute(insert(ImageMemberRow), member), write=True)


async def _all_pages(
    repository: SqlImageRepository, caller: Caller, query: ImageQuery, limit: int
) -> list[Image]:
    found: list[Image] = []
    after = 0
    while True:
        page, _ = await repository.list_visible(caller, query, after, limit)
        assert len(page) <= limit
        found.extend(page)
        if len(page) < limit:
            return found
        after = page[-1].seq


async def test_keyset_pagination_returns_every_visible_image_once(
    database: Database, tmp_path: Path
) -> None:
    await _seed(database, tmp_path)
    repository = SqlImageRepository(database)
    alpha = Caller("alpha")
    public = {image.id for image in load_catalog().images}

    own: set[str] = set()
    shared: set[str] = set()
    for index in range(23):
        created = await repository.create_private(_private("alpha", f"a{index}"), 100)
        own.add(created.id)
        # Interleave invisible rows: another project's (some shared with alpha
        # but not accepted), deleted and deprecated ones; and visible ones that
        # beta shared with alpha and alpha accepted.
        other = await repository.create_private(_private("beta", f"b{index}"), 100)
        answer = ("accepted", "pending", "rejected", None)[index % 4]
        if answer is not None:
            await _share(database, other, "alpha", answer)
            if answer == "accepted":
                shared.add(other.id)
        if index % 5 == 0:
            gone = await repository.create_private(_private("alpha", f"gone{index}"), 100)
            changed = await repository.update(gone.id, gone.revision, {"status": "deleted"})
            assert changed is not None
        if index % 7 == 0:
            old = await repository.create_private(_private("alpha", f"old{index}"), 100)
            assert await repository.update(old.id, old.revision, {"deprecated": True})

    everything = ImageQuery(parse_filter(""))
    expected = public | own | shared
    assert shared
    for limit in (1, 2, 3, 7, 50):
        listed = await _all_pages(repository, alpha, everything, limit)
        ids = [image.id for image in listed]
        assert len(ids) == len(set(ids)), f"limit {limit}: an image came twice"
        assert set(ids) == expected, f"limit {limit}"
        seqs = [image.seq for image in listed]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)

    private_only = ImageQuery(parse_filter("type = private"))
    for limit in (1, 4):
        listed = await _all_pages(repository, alpha, private_only, limit)
        assert [i.id for i in listed] == [i.id for i in sorted(listed, key=lambda i: i.seq)]
        assert len(listed) == len(own)
        assert {i.id for i in listed} == own


async def test_keyset_pagination_is_stable_across_inserts_and_deletes(
    database: Database,
) -> None:
    """Rows added while a client pages appear on a later page (their seq is
    higher); rows deleted meanwhile simply drop out; nothing repeats."""
    repository = SqlImageRepository(database)
    alpha = Caller("alpha")
    query = ImageQuery(parse_filter("type = private"))
    first = [(await repository.create_private(_private("alpha", f"i{n}"), 100)) for n in range(6)]

    page, _ = await repository.list_visible(alpha, query, 0, 3)
    assert [i.id for i in page] == [i.id for i in first[:3]]
    added = await repository.create_private(_private("alpha", "late"), 100)
    assert await repository.update(first[4].id, first[4].revision, {"status": "deleted"})

    rest: list[Image] = []
    after = page[-1].seq
    while True:
        more, _ = await repository.list_visible(alpha, query, after, 2)
        rest.extend(more)
        if len(more) < 2:
            break
        after = more[-1].seq
    assert [i.id for i in rest] == [first[3].id, first[5].id, added.id]


# --- atomic repository operations ------------------------------------------------


async def test_concurrent_create_private_on_a_new_project_respects_the_quota(
    database: Database,
) -> None:
    """On PostgreSQL the first creates of a project race to create the
    project row they lock, too; on SQLite every write holds the database's
    write lock from its BEGIN, and no such row is needed."""
    repository = SqlImageRepository(database)
    outcomes = await asyncio.gather(
        *(repository.create_private(_private("fresh", f"r{n}"), 5) for n in range(12)),
        return_exceptions=True,
    )
    created = [o for o in outcomes if isinstance(o, Image)]
    refused = [o for o in outcomes if isinstance(o, QuotaExceeded)]
    assert (len(created), len(refused)) == (5, 7), outcomes
    assert await repository.count_quota_used("fresh") == 5
    assert await _count(database, ProjectRow) == (0 if database.is_sqlite else 1)


async def test_concurrent_create_private_with_one_request_id(database: Database) -> None:
    repository = SqlImageRepository(database)
    request_id = str(uuid.uuid4())
    outcomes = await asyncio.gather(
        *(
            repository.create_private(_private("fresh", f"r{n}", request_id=request_id), 50)
            for n in range(8)
        ),
        return_exceptions=True,
    )
    assert all(isinstance(o, Image) for o in outcomes), outcomes
    assert len({o.id for o in outcomes if isinstance(o, Image)}) == 1
    assert await repository.count_quota_used("fresh") == 1


async def test_concurrent_creates_and_replicas_with_one_request_id(database: Database) -> None:
    """One request id, raced by both RPCs: one image of each, every call of
    an RPC answered with its own."""
    repository = SqlImageRepository(database)
    request_id = str(uuid.uuid4())
    methods = [RequestMethod.CREATE, RequestMethod.REPLICATE] * 6
    outcomes = await asyncio.gather(
        *(
            repository.create_private(
                _private("fresh", f"{m}{n}", request_id=request_id, request_method=m), 50
            )
            for n, m in enumerate(methods)
        ),
        return_exceptions=True,
    )
    assert all(isinstance(o, Image) for o in outcomes), outcomes
    by_method: dict[RequestMethod, set[str]] = {}
    for method, created in zip(methods, outcomes, strict=True):
        assert isinstance(created, Image) and created.request_method is method
        by_method.setdefault(method, set()).add(created.id)
    assert [len(ids) for ids in by_method.values()] == [1, 1]
    assert by_method[RequestMethod.CREATE] != by_method[RequestMethod.REPLICATE]
    assert await repository.count_quota_used("fresh") == 2


async def test_concurrent_conditional_updates_of_one_revision(database: Database) -> None:
    repository = SqlImageRepository(database)
    image = await repository.create_private(_private("alpha", "x", tags=["a", "b"]), 50)
    outcomes = await asyncio.gather(
        *(repository.update(image.id, image.revision, {"tags": ["b", f"t{n}"]}) for n in range(8))
    )
    winners = [o for o in outcomes if o is not None]
    assert len(winners) == 1
    stored = await repository.get(image.id)
    assert stored is not None
    assert stored.revision == image.revision + 1
    assert stored.tags == winners[0].tags
    assert await _count(database, ImageTagRow) == 2


async def test_seed_repairing_a_lost_image_gives_it_a_new_revision(
    database: Database, tmp_path: Path
) -> None:
    """Rebuilt bytes get a new size and digest: a new revision, so that no
    process answers from what it rendered of the old ones."""
    await _seed(database, tmp_path)
    image_id = load_catalog().images[0].id
    revision = select(ImageRow.revision).where(ImageRow.id == image_id)
    before = await database.run(lambda connection: connection.execute(revision).scalar_one())
    await LocalBlobStore(tmp_path / "blobs").delete(image_id)
    await _seed(database, tmp_path)
    after = await database.run(lambda connection: connection.execute(revision).scalar_one())
    assert after == before + 1
