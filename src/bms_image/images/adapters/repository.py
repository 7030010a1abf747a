"""SQL implementations of the domain's repositories."""

from __future__ import annotations

import enum
import functools
import time
from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Row,
    RowMapping,
    Select,
    Table,
    Update,
    and_,
    bindparam,
    delete,
    exists,
    false,
    func,
    insert,
    literal,
    not_,
    or_,
    select,
    true,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert

from bms_image.common.errors import NotFound, QuotaExceeded, QuotaViolation
from bms_image.common.model import (
    Architecture,
    Caller,
    DiskFormat,
    Flavor,
    Image,
    ImageStatus,
    Member,
    MemberStatus,
    OsType,
    Partition,
    Plugin,
    PluginKind,
    RequestMethod,
    Visibility,
)
from bms_image.images.domain.query import Condition, ImageQuery
from bms_image.images.domain.rules import QUOTA_COUNTED_STATUSES
from bms_image.store.db import Database, Work
from bms_image.store.tables import (
    FlavorRow,
    ImageFlavorRow,
    ImageMemberRow,
    ImageRow,
    ImageTagRow,
    ProjectRow,
)

_COUNTED = [status.value for status in QUOTA_COUNTED_STATUSES]


def utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; they were stored as UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


IMAGES: Table = ImageRow.__table__  # type: ignore[assignment]
TAGS: Table = ImageTagRow.__table__  # type: ignore[assignment]
FLAVORS: Table = ImageFlavorRow.__table__  # type: ignore[assignment]
MEMBERS: Table = ImageMemberRow.__table__  # type: ignore[assignment]
FLAVOR_ROWS: Table = FlavorRow.__table__  # type: ignore[assignment]
PROJECTS: Table = ProjectRow.__table__  # type: ignore[assignment]

#: The tags and supported flavors of a set of images, in one statement.
_LISTS_OF = union_all(
    select(
        TAGS.c.image_id,
        literal(0).label("kind"),
        TAGS.c.tag.label("value"),
        TAGS.c.position.label("position"),
    ).where(TAGS.c.image_id.in_(bindparam("ids", expanding=True))),
    select(FLAVORS.c.image_id, literal(1), FLAVORS.c.flavor, literal(0)).where(
        FLAVORS.c.image_id.in_(bindparam("ids", expanding=True))
    ),
)
_IMAGE_BY_ID = select(IMAGES).where(IMAGES.c.id == bindparam("id"))
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
    .where(IMAGES.c.owner_project == bindparam("project"), IMAGES.c.status.in_(_COUNTED))
)
_LOCK_PROJECT = select(PROJECTS.c.id).where(PROJECTS.c.id == bindparam("id")).with_for_update()
_ADD_PROJECT = pg_insert(PROJECTS).on_conflict_do_nothing()
#: Statements built once and bound at execution: building one costs more than
#: running it on SQLite.
_INSERT_IMAGE = insert(IMAGES).returning(IMAGES.c.seq)
_INSERT_TAG = insert(TAGS)
_INSERT_FLAVOR = insert(FLAVORS)
_DELETE_TAGS = delete(TAGS).where(TAGS.c.image_id == bindparam("image_id"))


def _image_from(row: RowMapping, tags: Sequence[str], flavors: Sequence[str]) -> Image:
    return Image(
        id=row["id"],
        seq=row["seq"],
        display_name=row["display_name"],
        description=row["description"],
        visibility=Visibility(row["visibility"]),
        owner_project=row["owner_project"],
        os_type=OsType(row["os_type"]),
        os_distro=row["os_distro"],
        os_version=row["os_version"],
        architecture=Architecture(row["architecture"]),
        disk_format=DiskFormat(row["disk_format"]),
        size_bytes=row["size_bytes"],
        min_disk_gb=row["min_disk_gb"],
        sha256=row["sha256"],
        uploaded_bytes=row["uploaded_bytes"],
        creator_project=row["creator_project"],
        status=ImageStatus(row["status"]),
        status_reason=row["status_reason"],
        hardware_model=row["hardware_model"],
        supported_flavors=list(flavors),
        plugins=[Plugin(PluginKind(p["kind"]), p["version"]) for p in row["plugins"]],
        partitions=[Partition(p["name"], p["mount"], p["size_bytes"]) for p in row["partitions"]],
        source_server=row["source_server"],
        tags=list(tags),
        protected=row["protected"],
        deprecated=row["deprecated"],
        request_id=row["request_id"],
        request_method=RequestMethod(row["request_method"]),
        revision=row["revision"],
        create_time=utc(row["create_time"]),
        update_time=utc(row["update_time"]),
    )


def _images_from(connection: Connection, rows: Sequence[RowMapping]) -> list[Image]:
    """Images of rows of the images table, with their tags and flavors."""
    if not rows:
        return []
    tags: dict[str, list[tuple[int, str]]] = {}
    flavors: dict[str, list[str]] = {}
    for image_id, kind, value, position in connection.execute(
        _LISTS_OF, {"ids": [row["id"] for row in rows]}
    ):
        if kind == 0:
            tags.setdefault(image_id, []).append((position, value))
        else:
            flavors.setdefault(image_id, []).append(value)
    return [
        _image_from(
            row,
            [tag for _, tag in sorted(tags.get(row["id"], ()))],
            sorted(flavors.get(row["id"], ())),
        )
        for row in rows
    ]


def _image_or_none(connection: Connection, row: RowMapping | None) -> Image | None:
    return _images_from(connection, [row])[0] if row is not None else None


def _image_values(image: Image) -> dict[str, Any]:
    """The images-table columns of a new image (seq comes from the database)."""
    assert image.create_time is not None and image.update_time is not None
    return {
        "id": image.id,
        "display_name": image.display_name,
        "description": image.description,
        "visibility": image.visibility.value,
        "owner_project": image.owner_project,
        "os_type": image.os_type.value,
        "os_distro": image.os_distro,
        "os_version": image.os_version,
        "architecture": image.architecture.value,
        "disk_format": image.disk_format.value,
        "size_bytes": image.size_bytes,
        "min_disk_gb": image.min_disk_gb,
        "sha256": image.sha256,
        "uploaded_bytes": image.uploaded_bytes,
        "creator_project": image.creator_project,
        "status": image.status.value,
        "status_reason": image.status_reason,
        "hardware_model": image.hardware_model,
        "plugins": [{"kind": p.kind.value, "version": p.version} for p in image.plugins],
        "partitions": [vars(p) for p in image.partitions],
        "source_server": image.source_server,
        "protected": image.protected,
        "deprecated": image.deprecated,
        "request_id": image.request_id,
        "request_method": image.request_method.value,
        "revision": image.revision,
        "create_time": image.create_time,
        "update_time": image.update_time,
    }


def _by_request_id(
    connection: Connection, project: str, method: RequestMethod, request_id: str
) -> Image | None:
    parameters = {"project": project, "method": method.value, "request_id": request_id}
    row = connection.execute(_IMAGE_BY_REQUEST, parameters).mappings().first()
    return _image_or_none(connection, row)


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


def _insert_tags(connection: Connection, image_id: str, tags: Sequence[str]) -> None:
    if tags:
        connection.execute(
            _INSERT_TAG,
            [{"image_id": image_id, "tag": tag, "position": i} for i, tag in enumerate(tags)],
        )


def _images_selected(connection: Connection, statement: Select[Any]) -> list[Image]:
    return _images_from(connection, connection.execute(statement).mappings().all())


def insert_image(connection: Connection, image: Image) -> Image:
    seq = connection.execute(_INSERT_IMAGE, _image_values(image)).scalar_one()
    _insert_tags(connection, image.id, image.tags)
    if image.supported_flavors:
        connection.execute(
            _INSERT_FLAVOR,
            [{"image_id": image.id, "flavor": name} for name in image.supported_flavors],
        )
    return replace(
        image, seq=seq, tags=list(image.tags), supported_flavors=list(image.supported_flavors)
    )


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


def _condition_clause(
    caller: Caller, condition: Condition, query: ImageQuery
) -> ColumnElement[bool]:
    name, value = condition.field, condition.value
    image = IMAGES.c
    clause: ColumnElement[bool]
    if name == "type":
        clause = {
            "public": image.visibility == Visibility.PUBLIC.value,
            "private": and_(
                image.visibility == Visibility.PRIVATE.value,
                image.owner_project == caller.project,
            ),
            "shared": and_(
                image.visibility == Visibility.PRIVATE.value,
                image.owner_project != caller.project,
            ),
        }[value]
    elif name == "member_status":  # applied by the visibility clause
        return true()
    elif name in ("os_type", "os_distro", "os_version", "architecture", "status", "owner_project"):
        clause = image[name] == value
    elif name == "name":
        if value.endswith("*"):  # case-sensitive on both databases, unlike SQLite's LIKE
            prefix = value[:-1]
            clause = func.substr(image.display_name, 1, len(prefix)) == prefix
        else:
            clause = image.display_name == value
    elif name == "tag":
        clause = exists().where(TAGS.c.image_id == image.id, TAGS.c.tag == value)
    elif name in ("protected", "deprecated"):
        clause = image[name] == (value == "true")
    elif name == "flavor":
        assert query.flavor is not None
        flavor_name, hardware_model = query.flavor
        # `visibility || ''` keeps the OR from being run as a multi-index OR
        # plus a sort of every match (SQLite's choice without statistics):
        # walking seq in order finds a page of a dense listing at once.
        visibility = image.visibility.concat("")
        clause = or_(
            and_(
                visibility == Visibility.PUBLIC.value,
                exists().where(FLAVORS.c.image_id == image.id, FLAVORS.c.flavor == flavor_name),
            ),
            and_(visibility == Visibility.PRIVATE.value, image.hardware_model == hardware_model),
        )
    else:  # parse_filter admits only the fields above
        raise AssertionError(f"unhandled filter field {name}")
    return not_(clause) if condition.negate else clause


class SqlImageRepository:
    """Images on SQLAlchemy Core: each method is one unit of work that the
    database runs whole (on SQLite in one hand-over to its thread)."""

    def __init__(
        self, database: Database, recent_seconds: float = 0.0, recent_limit: int = 10_000
    ) -> None:
        self._db = database
        #: Images read or written lately, for get_recent: (image, monotonic
        #: expiry). This process's own writes replace an entry at once;
        #: another process's are seen once it expires.
        self._recent: OrderedDict[str, tuple[Image, float]] = OrderedDict()
        self._recent_seconds = recent_seconds
        self._recent_limit = recent_limit
        #: Writes of this process so far: a read that saw a write happen while
        #: it ran does not remember its (maybe older) result.
        self._writes = 0

    async def get(self, image_id: str) -> Image | None:
        def work(connection: Connection) -> Image | None:
            row = connection.execute(_IMAGE_BY_ID, {"id": image_id}).mappings().first()
            return _image_or_none(connection, row)

        return await self._db.run(work)

    async def get_recent(self, image_id: str) -> Image | None:
        """Like get, but may answer from memory: at most recent_seconds old
        when another process changed the image, current for this process's
        own changes. The result is shared: never modify it."""
        if self._recent_seconds <= 0:
            return await self.get(image_id)
        remembered = self._recent.get(image_id)
        if remembered is not None and remembered[1] > time.monotonic():
            self._recent.move_to_end(image_id)
            return remembered[0]
        writes = self._writes
        image = await self.get(image_id)
        if image is not None and writes == self._writes:
            self._remember(image)
        return image

    def _remember(self, image: Image) -> None:
        self._recent[image.id] = (image, time.monotonic() + self._recent_seconds)
        self._recent.move_to_end(image.id)
        if len(self._recent) > self._recent_limit:
            self._recent.popitem(last=False)

    def _wrote(self, image_id: str, result: Image | None) -> None:
        """After a write of this process: reads that overlapped it forget what
        they read, and the image as written (when known) is remembered."""
        self._writes += 1
        self._recent.pop(image_id, None)
        if result is not None and self._recent_seconds > 0:
            self._remember(result)

    async def list_visible(
        self, caller: Caller, query: ImageQuery, after_seq: int, limit: int
    ) -> list[Image]:
        image = IMAGES.c
        member_statuses = query.member_statuses()
        shared_with_caller = exists().where(
            MEMBERS.c.image_id == image.id,
            MEMBERS.c.project == caller.project,
            MEMBERS.c.status.in_(
                [
                    s.value
                    for s in (
                        {MemberStatus.ACCEPTED} if member_statuses is None else member_statuses
                    )
                ]
            ),
        )
        visible: ColumnElement[bool] = (
            shared_with_caller
            if member_statuses is not None
            else or_(
                image.visibility == Visibility.PUBLIC.value,
                image.owner_project == caller.project,
                shared_with_caller,
            )
        )
        clauses: list[ColumnElement[bool]] = [
            image.seq > after_seq,
            image.status != ImageStatus.DELETED.value,
            visible,
        ]
        if not query.asks_deprecated:
            clauses.append(image.deprecated == false())
        clauses += [_condition_clause(caller, c, query) for c in query.conditions]
        statement = select(IMAGES).where(*clauses).order_by(image.seq).limit(limit)

        return await self._db.run(lambda connection: _images_selected(connection, statement))

    async def find_by_request_id(
        self, project: str, method: RequestMethod, request_id: str
    ) -> Image | None:
        return await self._db.run(lambda c: _by_request_id(c, project, method, request_id))

    async def count_quota_used(self, project: str) -> int:
        return await self._db.run(lambda connection: _quota_used(connection, project))

    async def inventory(self) -> tuple[dict[tuple[str, str], int], dict[str, int]]:
        """Images by (status, visibility), and quota usage by project: what
        operators watch (two GROUP BY queries, for the metrics endpoint)."""
        image = IMAGES.c

        def work(
            connection: Connection,
        ) -> tuple[dict[tuple[str, str], int], dict[str, int]]:
            by_status = connection.execute(
                select(image.status, image.visibility, func.count()).group_by(
                    image.status, image.visibility
                )
            )
            by_project = connection.execute(
                select(image.owner_project, func.count())
                .where(
                    image.visibility == Visibility.PRIVATE.value,
                    image.status.in_(_COUNTED),
                )
                .group_by(image.owner_project)
            )
            return (
                {(status, visibility): int(n) for status, visibility, n in by_status},
                {str(project): int(n) for project, n in by_project if project},
            )

        return await self._db.run(work)

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
                raise QuotaExceeded(
                    "IMAGE_QUOTA_EXCEEDED",
                    f"project {project} already has {used} of its {quota_limit} private images; "
                    "delete one to make room",
                    [QuotaViolation(f"projects/{project}", f"private images: limit {quota_limit}")],
                    {"limit": str(quota_limit), "used": str(used)},
                )
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
            self._wrote(image_id, created if created and created.id == image_id else None)

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
        return await self._db.run(lambda connection: _images_selected(connection, statement))

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
        remembered = self._recent.get(image_id)
        known = remembered[0] if remembered is not None else None

        def work(connection: Connection) -> Image | None:
            row = connection.execute(statement, parameters).mappings().first()
            if row is None:
                return None
            if tags is not None:
                connection.execute(_DELETE_TAGS, {"image_id": image_id})
                _insert_tags(connection, image_id, tags)
            if known is not None and known.revision == row["revision"] - 1:
                return _image_from(
                    row, tags if tags is not None else known.tags, known.supported_flavors
                )
            return _image_or_none(connection, row)

        updated: Image | None = None
        try:
            updated = await self._db.run(work, write=True)
            return updated
        finally:
            self._wrote(image_id, updated)


class SqlFlavorRepository:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def list_flavors(self) -> list[Flavor]:
        def work(connection: Connection) -> list[Flavor]:
            flavors = connection.execute(select(FLAVOR_ROWS).order_by(FLAVOR_ROWS.c.name))
            links = connection.execute(
                select(FLAVORS.c.flavor, FLAVORS.c.image_id)
                .join(IMAGES, IMAGES.c.id == FLAVORS.c.image_id)
                .where(IMAGES.c.status != ImageStatus.DELETED.value)
                .order_by(IMAGES.c.seq)
            )
            by_flavor: dict[str, list[str]] = {}
            for flavor_name, image_id in links:
                by_flavor.setdefault(flavor_name, []).append(image_id)
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
                    public_image_ids=tuple(by_flavor.get(row.name, [])),
                )
                for row in flavors
            ]

        return await self._db.run(work)


def _member(row: Row[Any]) -> Member:
    return Member(
        image_id=row.image_id,
        project=row.project,
        status=MemberStatus(row.status),
        create_time=utc(row.create_time),
        update_time=utc(row.update_time),
    )


_MEMBER = select(MEMBERS).where(
    MEMBERS.c.image_id == bindparam("image_id"), MEMBERS.c.project == bindparam("project")
)


def _member_of(connection: Connection, image_id: str, project: str) -> Member | None:
    row = connection.execute(_MEMBER, {"image_id": image_id, "project": project}).first()
    return _member(row) if row else None


class SqlMemberRepository:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def get(self, image_id: str, project: str) -> Member | None:
        return await self._db.run(lambda connection: _member_of(connection, image_id, project))

    async def list(
        self, image_id: str, after_project: str, limit: int, only_project: str | None = None
    ) -> list[Member]:
        statement = (
            select(MEMBERS)
            .where(MEMBERS.c.image_id == image_id, MEMBERS.c.project > after_project)
            .order_by(MEMBERS.c.project)
            .limit(limit)
        )
        if only_project is not None:
            statement = statement.where(MEMBERS.c.project == only_project)
        return await self._db.run(
            lambda connection: [_member(row) for row in connection.execute(statement)]
        )

    async def add(self, image_id: str, project: str, limit: int) -> Member:
        def work(connection: Connection) -> Member:
            # Lock the image row: concurrent shares of one image queue here, so
            # the member count and the duplicate check cannot race.
            locked = connection.execute(
                select(IMAGES.c.id).where(IMAGES.c.id == image_id).with_for_update()
            ).first()
            if locked is None:
                raise NotFound("IMAGE_NOT_FOUND", f"image images/{image_id} not found")
            existing = _member_of(connection, image_id, project)
            if existing is not None:
                return existing
            count = connection.execute(
                select(func.count()).select_from(MEMBERS).where(MEMBERS.c.image_id == image_id)
            ).scalar_one()
            if count >= limit:
                raise QuotaExceeded(
                    "IMAGE_MEMBER_QUOTA_EXCEEDED",
                    f"images/{image_id} is already shared with {count} projects, the limit; "
                    "stop sharing with one first",
                    [QuotaViolation(f"images/{image_id}", f"members per image: limit {limit}")],
                    {"limit": str(limit)},
                )
            now = datetime.now(UTC)
            member = Member(image_id, project, MemberStatus.PENDING, now, now)
            connection.execute(
                insert(MEMBERS),
                {
                    "image_id": image_id,
                    "project": project,
                    "status": member.status.value,
                    "create_time": now,
                    "update_time": now,
                },
            )
            return member

        return await self._db.run(work, write=True)

    async def set_status(self, image_id: str, project: str, status: MemberStatus) -> Member | None:
        # One UPDATE, not read-modify-write: a member removed concurrently is
        # simply not found, never a stale-row error.
        statement = (
            update(MEMBERS)
            .where(MEMBERS.c.image_id == image_id, MEMBERS.c.project == project)
            .values(status=status.value, update_time=datetime.now(UTC))
            .returning(*MEMBERS.c)
        )

        def work(connection: Connection) -> Member | None:
            row = connection.execute(statement).first()
            return _member(row) if row else None

        return await self._db.run(work, write=True)

    async def remove(self, image_id: str, project: str) -> bool:
        statement = delete(MEMBERS).where(
            MEMBERS.c.image_id == image_id, MEMBERS.c.project == project
        )
        return await self._db.run(
            lambda connection: connection.execute(statement).rowcount == 1, write=True
        )
