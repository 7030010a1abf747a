"""SQL implementations of the domain's image and flavor repositories. The
rows <-> Image mapping is in rows.py, the ListImages filter compiler in
filters.py, the memory behind get_recent in cache.py, the operators'
inventory in inventory.py; the member repository is members.py."""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Table,
    Update,
    bindparam,
    delete,
    func,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert

from bms_image.common.model import Caller, Flavor, Image, ImageStatus, RequestMethod, Visibility
from bms_image.images.adapters.cache import ImageCache, RecentImages
from bms_image.images.adapters.filters import listing
from bms_image.images.adapters.inventory import inventory_of
from bms_image.images.adapters.rows import (
    COUNTED_STATUSES,
    IMAGES,
    PROJECTS,
    TAGS,
    image_from,
    image_or_none,
    images_selected,
    insert_image,
    insert_tags,
)
from bms_image.images.adapters.tables import FlavorRow
from bms_image.images.domain.query import ImageQuery, ListedImage
from bms_image.images.domain.rules import image_quota_exceeded
from bms_image.store.db import Database, Work

FLAVOR_ROWS: Table = FlavorRow.__table__  # type: ignore[assignment]

_IMAGE_BY_ID = select(IMAGES).where(IMAGES.c.id == bindparam("id"))
_IMAGES_BY_ID = select(IMAGES).where(IMAGES.c.id.in_(bindparam("ids", expanding=True)))
#: The image a project's call of one RPC created with a request id
#: (uq_images_request: at most one).
_IMAGE_BY_REQUEST = select(IMAGES).where(
    IMAGES.c.creator_project == bindparam("project"),
    IMAGES.c.request_method == bindparam("method"),
    IMAGES.c.request_id == bindparam("request_id"),
)
#: Only private images have an owner: no visibility term, which would steer
#: SQLite (without statistics) to scan every private image instead of using
#: ix_images_owner_status.
_QUOTA_USED = (
    select(func.count())
    .select_from(IMAGES)
    .where(IMAGES.c.owner_project == bindparam("project"), IMAGES.c.status.in_(COUNTED_STATUSES))
)
_LOCK_PROJECT = select(PROJECTS.c.id).where(PROJECTS.c.id == bindparam("id")).with_for_update()
_ADD_PROJECT = pg_insert(PROJECTS).on_conflict_do_nothing()
#: Built once and bound at execution: building a statement costs more than
#: running it on SQLite.
_DELETE_TAGS = delete(TAGS).where(TAGS.c.image_id == bindparam("image_id"))


def _by_request_id(
    connection: Connection, project: str, method: RequestMethod, request_id: str
) -> Image | None:
    parameters = {"project": project, "method": method.value, "request_id": request_id}
    row = connection.execute(_IMAGE_BY_REQUEST, parameters).mappings().first()
    return image_or_none(connection, row)


def _earlier(connection: Connection, image: Image) -> Image | None:
    """The image an earlier call of the same request (project, RPC and
    request id) created, if the new image has a request id."""
    if not image.request_id:
        return None
    return _by_request_id(connection, image.creator_project, image.request_method, image.request_id)


def _lock_project(connection: Connection, project: str) -> None:
    """Creates the project row if needed and locks it until commit, so that
    a project's creates check its quota one at a time. Nothing to do on
    SQLite: the BEGIN IMMEDIATE of every write already serialises them."""
    if connection.dialect.name == "sqlite":
        return
    connection.execute(_ADD_PROJECT, {"id": project, "create_time": datetime.now(UTC)})
    connection.execute(_LOCK_PROJECT, {"id": project})


def _quota_used(connection: Connection, project: str) -> int:
    return int(connection.execute(_QUOTA_USED, {"project": project}).scalar_one())


#: What a conditional update requires of the row, besides its id.
_UPDATE_CONDITIONS: dict[str, ColumnElement[bool]] = {
    "revision": IMAGES.c.revision == bindparam("expected_revision"),
    "statuses": IMAGES.c.status.in_(bindparam("from_statuses", expanding=True)),
}


@functools.lru_cache(maxsize=256)
def _update_statement(condition: str, columns: tuple[str, ...]) -> Update:
    """UPDATE ... RETURNING of these columns under a condition, built once
    (the callers change a handful of column sets): the values are bound at
    execution as new_<column>."""
    return (
        update(IMAGES)
        .where(IMAGES.c.id == bindparam("image_id"), _UPDATE_CONDITIONS[condition])
        .values(
            revision=IMAGES.c.revision + 1,
            **{c: bindparam(f"new_{c}", type_=IMAGES.c[c].type) for c in columns},
        )
        .returning(*IMAGES.c)
    )


class SqlImageRepository:
    """Images on SQLAlchemy Core: each method is one unit of work that the
    database runs whole (on SQLite in one hand-over to its thread)."""

    def __init__(
        self,
        database: Database,
        recent_seconds: float = 0.0,
        recent_limit: int = 10_000,
        cache: ImageCache | None = None,
    ) -> None:
        self._db = database
        #: What get_recent answers from; told of every write of this process.
        self._cache = cache if cache is not None else RecentImages(recent_seconds, recent_limit)

    async def get(self, image_id: str) -> Image | None:
        def work(connection: Connection) -> Image | None:
            row = connection.execute(_IMAGE_BY_ID, {"id": image_id}).mappings().first()
            return image_or_none(connection, row)

        return await self._db.run(work)

    async def get_recent(self, image_id: str) -> Image | None:
        """Like get, but may answer from memory: at most recent_seconds old
        when another process changed the image, current for this process's
        own changes. The result is shared: never modify it."""
        remembered = self._cache.fresh(image_id)
        if remembered is not None:
            return remembered
        since = self._cache.reading()
        image = await self.get(image_id)
        if image is not None:
            self._cache.read(image, since)
        return image

    async def list_visible(
        self,
        caller: Caller,
        query: ImageQuery,
        after_seq: int,
        limit: int,
        known: Callable[[ListedImage], bool] | None = None,
    ) -> tuple[list[ListedImage], list[Image]]:
        statement, values = listing(caller, query, after_seq, limit)

        def work(connection: Connection) -> tuple[list[ListedImage], list[Image]]:
            listed = [
                ListedImage(image_id, revision, seq, Visibility(visibility), owner)
                for image_id, revision, seq, visibility, owner in connection.execute(
                    statement, values
                )
            ]
            wanted = [entry.id for entry in listed if known is None or not known(entry)]
            if not wanted:
                return listed, []
            return listed, images_selected(connection, _IMAGES_BY_ID, {"ids": wanted})

        return await self._db.run(work)

    async def find_by_request_id(
        self, project: str, method: RequestMethod, request_id: str
    ) -> Image | None:
        return await self._db.run(lambda c: _by_request_id(c, project, method, request_id))

    async def count_quota_used(self, project: str) -> int:
        return await self._db.run(lambda connection: _quota_used(connection, project))

    async def inventory(self) -> tuple[dict[tuple[str, str], int], dict[str, int]]:
        """Images by (status, visibility), and quota usage by project: what
        operators watch (for the metrics endpoint)."""
        return await self._db.run(inventory_of)

    async def create_private(self, image: Image, quota_limit: int) -> Image:
        assert image.owner_project is not None
        project = image.owner_project

        def work(connection: Connection) -> Image:
            _lock_project(connection, project)
            earlier = _earlier(connection, image)
            if earlier is not None:
                return earlier
            used = _quota_used(connection, project)
            if used >= quota_limit:
                raise image_quota_exceeded(project, used, quota_limit)
            return insert_image(connection, image)

        return await self._create(image.id, work)

    async def create_public(self, image: Image) -> Image:
        def work(connection: Connection) -> Image:
            _lock_project(connection, image.creator_project)
            earlier = _earlier(connection, image)
            if earlier is not None:
                return earlier
            return insert_image(connection, image)

        return await self._create(image.id, work)

    async def _create(self, image_id: str, work: Work[Image]) -> Image:
        created: Image | None = None
        try:
            created = await self._db.run(work, write=True)
            return created
        finally:
            # An earlier call's image (same request_id) was not written now.
            self._cache.wrote(image_id, created if created and created.id == image_id else None)

    async def update(
        self, image_id: str, expected_revision: int, changes: Mapping[str, Any]
    ) -> Image | None:
        return await self._conditional_update(
            image_id, "revision", {"expected_revision": expected_revision}, changes
        )

    async def transition(
        self, image_id: str, from_statuses: Collection[ImageStatus], changes: Mapping[str, Any]
    ) -> Image | None:
        return await self._conditional_update(
            image_id, "statuses", {"from_statuses": [s.value for s in from_statuses]}, changes
        )

    async def in_statuses(self, statuses: Collection[ImageStatus]) -> list[Image]:
        statement = (
            select(IMAGES)
            .where(IMAGES.c.status.in_([s.value for s in statuses]))
            .order_by(IMAGES.c.seq)
        )
        return await self._db.run(lambda connection: images_selected(connection, statement))

    async def _conditional_update(
        self,
        image_id: str,
        condition: str,
        condition_values: Mapping[str, Any],
        changes: Mapping[str, Any],
    ) -> Image | None:
        """One UPDATE ... RETURNING, conditional: None when the condition no
        longer holds (or there is no such image)."""
        values = {
            f"new_{k}": (v.value if isinstance(v, enum.Enum) else v)
            for k, v in changes.items()
            if k != "tags"
        }
        tags: Sequence[str] | None = changes.get("tags")
        columns = tuple(sorted(k for k in changes if k != "tags"))
        statement = _update_statement(condition, columns)
        parameters = {"image_id": image_id, **condition_values, **values}

        # The image as this process last knew it: if the update finds it at
        # that revision, its flavors (never changed) and tags (changed only
        # with a new revision) are known without reading them again.
        known = self._cache.last_known(image_id)

        def work(connection: Connection) -> Image | None:
            row = connection.execute(statement, parameters).mappings().first()
            if row is None:
                return None
            if tags is not None:
                connection.execute(_DELETE_TAGS, {"image_id": image_id})
                insert_tags(connection, image_id, tags)
            if known is not None and known.revision == row["revision"] - 1:
                return image_from(
                    row, tags if tags is not None else known.tags, known.supported_flavors
                )
            return image_or_none(connection, row)

        updated: Image | None = None
        try:
            updated = await self._db.run(work, write=True)
            return updated
        finally:
            self._cache.wrote(image_id, updated)


class SqlFlavorRepository:
    """The image service's flavors (the rows image_flavors refers to), as
    seeded from the catalog file. Which public images each offers is the
    fleet's question, asked over ListImages (fleet/adapters/public_images.py)."""

    def __init__(self, database: Database) -> None:
        self._db = database

    async def list_flavors(self) -> list[Flavor]:
        def work(connection: Connection) -> list[Flavor]:
            flavors = connection.execute(select(FLAVOR_ROWS).order_by(FLAVOR_ROWS.c.name))
            return [
                Flavor(
                    name=row.name,
                    hardware_model=row.hardware_model,
                    cpu_cores=row.cpu_cores,
                    cpu_model=row.cpu_model,
                    memory_gib=row.memory_gib,
                    local_disks=row.local_disks,
                    local_disk_gb=row.local_disk_gb,
                    evs_boot=row.evs_boot,
                    description=row.description,
                )
                for row in flavors
            ]

        return await self._db.run(work)
