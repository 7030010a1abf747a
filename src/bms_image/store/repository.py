"""SQL implementations of the domain's repositories."""

from __future__ import annotations

import enum
import time
from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    and_,
    delete,
    exists,
    false,
    func,
    not_,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from ..domain.errors import NotFound, QuotaExceeded, QuotaViolation
from ..domain.model import (
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
    Visibility,
)
from ..domain.query import Condition, ImageQuery
from ..domain.rules import QUOTA_COUNTED_STATUSES
from .db import Database
from .tables import (
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


def to_domain(row: ImageRow) -> Image:
    return Image(
        id=row.id,
        seq=row.seq,
        display_name=row.display_name,
        description=row.description,
        visibility=Visibility(row.visibility),
        owner_project=row.owner_project,
        os_type=OsType(row.os_type),
        os_distro=row.os_distro,
        os_version=row.os_version,
        architecture=Architecture(row.architecture),
        disk_format=DiskFormat(row.disk_format),
        size_bytes=row.size_bytes,
        min_disk_gb=row.min_disk_gb,
        sha256=row.sha256,
        uploaded_bytes=row.uploaded_bytes,
        creator_project=row.creator_project,
        status=ImageStatus(row.status),
        status_reason=row.status_reason,
        hardware_model=row.hardware_model,
        supported_flavors=[f.flavor for f in row.flavors],
        plugins=[Plugin(PluginKind(p["kind"]), p["version"]) for p in row.plugins],
        partitions=[Partition(p["name"], p["mount"], p["size_bytes"]) for p in row.partitions],
        source_server=row.source_server,
        tags=[t.tag for t in row.tags],
        protected=row.protected,
        deprecated=row.deprecated,
        request_id=row.request_id,
        revision=row.revision,
        create_time=utc(row.create_time),
        update_time=utc(row.update_time),
    )


def to_row(image: Image) -> ImageRow:
    assert image.create_time is not None and image.update_time is not None
    return ImageRow(
        id=image.id,
        display_name=image.display_name,
        description=image.description,
        visibility=image.visibility.value,
        owner_project=image.owner_project,
        os_type=image.os_type.value,
        os_distro=image.os_distro,
        os_version=image.os_version,
        architecture=image.architecture.value,
        disk_format=image.disk_format.value,
        size_bytes=image.size_bytes,
        min_disk_gb=image.min_disk_gb,
        sha256=image.sha256,
        uploaded_bytes=image.uploaded_bytes,
        creator_project=image.creator_project,
        status=image.status.value,
        status_reason=image.status_reason,
        hardware_model=image.hardware_model,
        plugins=[{"kind": p.kind.value, "version": p.version} for p in image.plugins],
        partitions=[vars(p) for p in image.partitions],
        source_server=image.source_server,
        protected=image.protected,
        deprecated=image.deprecated,
        request_id=image.request_id,
        revision=image.revision,
        create_time=image.create_time,
        update_time=image.update_time,
        tags=[ImageTagRow(tag=tag, position=i) for i, tag in enumerate(image.tags)],
        flavors=[ImageFlavorRow(flavor=name) for name in image.supported_flavors],
    )


def _condition_clause(
    caller: Caller, condition: Condition, query: ImageQuery
) -> ColumnElement[bool]:
    name, value = condition.field, condition.value
    clause: ColumnElement[bool]
    if name == "type":
        clause = {
            "public": ImageRow.visibility == Visibility.PUBLIC.value,
            "private": and_(
                ImageRow.visibility == Visibility.PRIVATE.value,
                ImageRow.owner_project == caller.project,
            ),
            "shared": and_(
                ImageRow.visibility == Visibility.PRIVATE.value,
                ImageRow.owner_project != caller.project,
            ),
        }[value]
    elif name == "member_status":  # applied by the visibility clause
        return true()
    elif name in ("os_type", "os_distro", "os_version", "architecture", "status", "owner_project"):
        clause = getattr(ImageRow, name) == value
    elif name == "name":
        if value.endswith("*"):  # case-sensitive on both databases, unlike SQLite's LIKE
            prefix = value[:-1]
            clause = func.substr(ImageRow.display_name, 1, len(prefix)) == prefix
        else:
            clause = ImageRow.display_name == value
    elif name == "tag":
        clause = exists().where(ImageTagRow.image_id == ImageRow.id, ImageTagRow.tag == value)
    elif name in ("protected", "deprecated"):
        clause = getattr(ImageRow, name) == (value == "true")
    elif name == "flavor":
        assert query.flavor is not None
        flavor_name, hardware_model = query.flavor
        # `visibility || ''` keeps the OR from being run as a multi-index OR
        # plus a sort of every match (SQLite's choice without statistics):
        # walking seq in order finds a page of a dense listing at once.
        visibility = ImageRow.visibility.concat("")
        clause = or_(
            and_(
                visibility == Visibility.PUBLIC.value,
                exists().where(
                    ImageFlavorRow.image_id == ImageRow.id, ImageFlavorRow.flavor == flavor_name
                ),
            ),
            and_(visibility == Visibility.PRIVATE.value, ImageRow.hardware_model == hardware_model),
        )
    else:  # parse_filter admits only the fields above
        raise AssertionError(f"unhandled filter field {name}")
    return not_(clause) if condition.negate else clause


class SqlImageRepository:
    def __init__(
        self, database: Database, recent_seconds: float = 0.0, recent_limit: int = 10_000
    ) -> None:
        self._db = database
        #: Images read lately, for get_recent: (image, monotonic expiry). This
        #: process's own writes drop an entry at once; another process's are
        #: seen once it expires.
        self._recent: OrderedDict[str, tuple[Image, float]] = OrderedDict()
        self._recent_seconds = recent_seconds
        self._recent_limit = recent_limit
        #: Writes of this process so far: a read that saw a write happen while
        #: it ran does not remember its (maybe older) result.
        self._writes = 0

    async def get(self, image_id: str) -> Image | None:
        async with self._db.read() as session:
            row = await session.scalar(select(ImageRow).where(ImageRow.id == image_id))
            return to_domain(row) if row else None

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
            self._recent[image_id] = (image, time.monotonic() + self._recent_seconds)
            self._recent.move_to_end(image_id)
            if len(self._recent) > self._recent_limit:
                self._recent.popitem(last=False)
        return image

    def _wrote(self, image_id: str) -> None:
        self._writes += 1
        self._recent.pop(image_id, None)

    async def list_visible(
        self, caller: Caller, query: ImageQuery, after_seq: int, limit: int
    ) -> list[Image]:
        member_statuses = query.member_statuses()
        shared_with_caller = exists().where(
            ImageMemberRow.image_id == ImageRow.id,
            ImageMemberRow.project == caller.project,
            ImageMemberRow.status.in_(
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
                ImageRow.visibility == Visibility.PUBLIC.value,
                ImageRow.owner_project == caller.project,
                shared_with_caller,
            )
        )
        clauses: list[ColumnElement[bool]] = [
            ImageRow.seq > after_seq,
            ImageRow.status != ImageStatus.DELETED.value,
            visible,
        ]
        if not query.asks_deprecated:
            clauses.append(ImageRow.deprecated == false())
        clauses += [_condition_clause(caller, c, query) for c in query.conditions]
        statement = select(ImageRow).where(*clauses).order_by(ImageRow.seq).limit(limit)
        async with self._db.read() as session:
            rows = (await session.scalars(statement)).all()
            return [to_domain(row) for row in rows]

    async def find_by_request_id(self, project: str, request_id: str) -> Image | None:
        async with self._db.read() as session:
            return await self._by_request_id(session, project, request_id)

    async def _by_request_id(
        self, session: AsyncSession, project: str, request_id: str
    ) -> Image | None:
        row = await session.scalar(
            select(ImageRow).where(
                ImageRow.creator_project == project, ImageRow.request_id == request_id
            )
        )
        return to_domain(row) if row else None

    async def _lock_project(self, session: AsyncSession, project: str) -> None:
        """Creates the project row if needed and locks it until commit; on
        SQLite the BEGIN IMMEDIATE of the write unit already serialises."""
        insert = pg_insert if not self._db.is_sqlite else sqlite_insert
        await session.execute(
            insert(ProjectRow)
            .values(id=project, create_time=datetime.now(UTC))
            .on_conflict_do_nothing(index_elements=["id"])
        )
        await session.execute(
            select(ProjectRow.id).where(ProjectRow.id == project).with_for_update()
        )

    async def _count_quota_used(self, session: AsyncSession, project: str) -> int:
        count = await session.scalar(
            select(func.count())
            .select_from(ImageRow)
            .where(
                # Only private images have an owner: no visibility term, which
                # would steer SQLite (without statistics) to scan every private
                # image instead of using ix_images_owner_status.
                ImageRow.owner_project == project,
                ImageRow.status.in_(_COUNTED),
            )
        )
        return int(count or 0)

    async def count_quota_used(self, project: str) -> int:
        async with self._db.read() as session:
            return await self._count_quota_used(session, project)

    async def inventory(self) -> tuple[dict[tuple[str, str], int], dict[str, int]]:
        """Images by (status, visibility), and quota usage by project: what
        operators watch (two GROUP BY queries, for the metrics endpoint)."""
        async with self._db.read() as session:
            by_status = await session.execute(
                select(ImageRow.status, ImageRow.visibility, func.count()).group_by(
                    ImageRow.status, ImageRow.visibility
                )
            )
            by_project = await session.execute(
                select(ImageRow.owner_project, func.count())
                .where(
                    ImageRow.visibility == Visibility.PRIVATE.value,
                    ImageRow.status.in_(_COUNTED),
                )
                .group_by(ImageRow.owner_project)
            )
            return (
                {(status, visibility): int(n) for status, visibility, n in by_status},
                {str(project): int(n) for project, n in by_project if project},
            )

    async def create_private(self, image: Image, quota_limit: int) -> Image:
        assert image.owner_project is not None
        project = image.owner_project
        async with self._db.write() as session:
            await self._lock_project(session, project)
            if image.request_id:
                earlier = await self._by_request_id(
                    session, image.creator_project, image.request_id
                )
                if earlier is not None:
                    return earlier
            used = await self._count_quota_used(session, project)
            if used >= quota_limit:
                raise QuotaExceeded(
                    "IMAGE_QUOTA_EXCEEDED",
                    f"project {project} already has {used} of its {quota_limit} private images; "
                    "delete one to make room",
                    [QuotaViolation(f"projects/{project}", f"private images: limit {quota_limit}")],
                    {"limit": str(quota_limit), "used": str(used)},
                )
            row = to_row(image)
            session.add(row)
            await session.flush()
            return to_domain(row)

    async def create_public(self, image: Image) -> Image:
        async with self._db.write() as session:
            await self._lock_project(session, image.creator_project)
            if image.request_id:
                earlier = await self._by_request_id(
                    session, image.creator_project, image.request_id
                )
                if earlier is not None:
                    return earlier
            row = to_row(image)
            session.add(row)
            await session.flush()
            return to_domain(row)

    async def update(
        self, image_id: str, expected_revision: int, changes: Mapping[str, Any]
    ) -> Image | None:
        return await self._conditional_update(
            image_id, ImageRow.revision == expected_revision, changes
        )

    async def transition(
        self, image_id: str, from_statuses: Collection[ImageStatus], changes: Mapping[str, Any]
    ) -> Image | None:
        return await self._conditional_update(
            image_id, ImageRow.status.in_([s.value for s in from_statuses]), changes
        )

    async def in_statuses(self, statuses: Collection[ImageStatus]) -> list[Image]:
        async with self._db.read() as session:
            rows = await session.scalars(
                select(ImageRow)
                .where(ImageRow.status.in_([s.value for s in statuses]))
                .order_by(ImageRow.seq)
            )
            return [to_domain(row) for row in rows]

    async def _conditional_update(
        self, image_id: str, condition: ColumnElement[bool], changes: Mapping[str, Any]
    ) -> Image | None:
        values = {k: v for k, v in changes.items() if k != "tags"}
        values = {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in values.items()}
        try:
            return await self._update_row(image_id, condition, values, changes)
        finally:
            self._wrote(image_id)

    async def _update_row(
        self,
        image_id: str,
        condition: ColumnElement[bool],
        values: Mapping[str, Any],
        changes: Mapping[str, Any],
    ) -> Image | None:
        async with self._db.write() as session:
            result = await session.execute(
                update(ImageRow)
                .where(ImageRow.id == image_id, condition)
                .values(revision=ImageRow.revision + 1, **values)
                .execution_options(synchronize_session=False)
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                return None
            row = await session.scalar(
                select(ImageRow)
                .where(ImageRow.id == image_id)
                .execution_options(populate_existing=True)
            )
            assert row is not None
            if "tags" in changes:
                tags: Sequence[str] = changes["tags"]
                row.tags = [ImageTagRow(tag=tag, position=i) for i, tag in enumerate(tags)]
                await session.flush()
            return to_domain(row)


class SqlFlavorRepository:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def list_flavors(self) -> list[Flavor]:
        async with self._db.read() as session:
            flavors = (await session.scalars(select(FlavorRow).order_by(FlavorRow.name))).all()
            links = (
                await session.execute(
                    select(ImageFlavorRow.flavor, ImageFlavorRow.image_id)
                    .join(ImageRow, ImageRow.id == ImageFlavorRow.image_id)
                    .where(ImageRow.status != ImageStatus.DELETED.value)
                    .order_by(ImageRow.seq)
                )
            ).all()
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


def _member(row: ImageMemberRow) -> Member:
    return Member(
        image_id=row.image_id,
        project=row.project,
        status=MemberStatus(row.status),
        create_time=utc(row.create_time),
        update_time=utc(row.update_time),
    )


class SqlMemberRepository:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def get(self, image_id: str, project: str) -> Member | None:
        async with self._db.read() as session:
            row = await session.get(ImageMemberRow, (image_id, project))
            return _member(row) if row else None

    async def list(
        self, image_id: str, after_project: str, limit: int, only_project: str | None = None
    ) -> list[Member]:
        statement = (
            select(ImageMemberRow)
            .where(ImageMemberRow.image_id == image_id, ImageMemberRow.project > after_project)
            .order_by(ImageMemberRow.project)
            .limit(limit)
        )
        if only_project is not None:
            statement = statement.where(ImageMemberRow.project == only_project)
        async with self._db.read() as session:
            return [_member(row) for row in await session.scalars(statement)]

    async def add(self, image_id: str, project: str, limit: int) -> Member:
        async with self._db.write() as session:
            # Lock the image row: concurrent shares of one image queue here, so
            # the member count and the duplicate check cannot race.
            locked = await session.scalar(
                select(ImageRow.id).where(ImageRow.id == image_id).with_for_update()
            )
            if locked is None:
                raise NotFound("IMAGE_NOT_FOUND", f"image images/{image_id} not found")
            existing = await session.get(ImageMemberRow, (image_id, project))
            if existing is not None:
                return _member(existing)
            count = await session.scalar(
                select(func.count())
                .select_from(ImageMemberRow)
                .where(ImageMemberRow.image_id == image_id)
            )
            if (count or 0) >= limit:
                raise QuotaExceeded(
                    "IMAGE_MEMBER_QUOTA_EXCEEDED",
                    f"images/{image_id} is already shared with {count} projects, the limit; "
                    "stop sharing with one first",
                    [QuotaViolation(f"images/{image_id}", f"members per image: limit {limit}")],
                    {"limit": str(limit)},
                )
            now = datetime.now(UTC)
            row = ImageMemberRow(
                image_id=image_id,
                project=project,
                status=MemberStatus.PENDING.value,
                create_time=now,
                update_time=now,
            )
            session.add(row)
            await session.flush()
            return _member(row)

    async def set_status(self, image_id: str, project: str, status: MemberStatus) -> Member | None:
        async with self._db.write() as session:
            # One UPDATE, not read-modify-write: a member removed concurrently
            # is simply not found, never a stale-row error.
            result = await session.execute(
                update(ImageMemberRow)
                .where(ImageMemberRow.image_id == image_id, ImageMemberRow.project == project)
                .values(status=status.value, update_time=datetime.now(UTC))
                .execution_options(synchronize_session=False)
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                return None
            row = await session.scalar(
                select(ImageMemberRow)
                .where(ImageMemberRow.image_id == image_id, ImageMemberRow.project == project)
                .execution_options(populate_existing=True)
            )
            return _member(row) if row else None

    async def remove(self, image_id: str, project: str) -> bool:
        async with self._db.write() as session:
            result = await session.execute(
                delete(ImageMemberRow).where(
                    ImageMemberRow.image_id == image_id, ImageMemberRow.project == project
                )
            )
            return bool(result.rowcount)  # type: ignore[attr-defined]
