"""Image members on SQLAlchemy Core: the projects an image is shared with,
and their answers."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Row, bindparam, delete, func, insert, select, update

from bms_image.common.errors import NotFound
from bms_image.common.model import Member, MemberStatus
from bms_image.images.adapters.rows import IMAGES, MEMBERS
from bms_image.images.domain.rules import member_quota_exceeded
from bms_image.store.columns import utc
from bms_image.store.db import Database


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
                select(IMAGES.c.id, IMAGES.c.seq).where(IMAGES.c.id == image_id).with_for_update()
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
                raise member_quota_exceeded(image_id, count, limit)
            now = datetime.now(UTC)
            member = Member(image_id, project, MemberStatus.PENDING, now, now)
            connection.execute(
                insert(MEMBERS),
                {
                    "image_id": image_id,
                    "project": project,
                    "image_seq": locked.seq,
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
