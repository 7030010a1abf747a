"""The deployment id: created once per database, shared by its replicas."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from sqlalchemy import Table, insert, select
from sqlalchemy.engine import Connection

from bms_image.store.db import Database, serialize
from bms_image.store.tables import DeploymentRow

DEPLOYMENT: Table = DeploymentRow.__table__  # type: ignore[assignment]
#: Serialises the first start of replicas on one (PostgreSQL) database.
DEPLOYMENT_LOCK = 7405013


async def deployment_id(database: Database) -> str:
    """This database's deployment id; the first call on a database creates
    it (replicas starting together agree on one)."""

    def work(connection: Connection) -> str:
        serialize(connection, DEPLOYMENT_LOCK)
        found = connection.execute(select(DEPLOYMENT.c.id)).scalars().first()
        if found is not None:
            return str(found)
        created = str(uuid.uuid4())
        connection.execute(insert(DEPLOYMENT).values(id=created, create_time=datetime.now(UTC)))
        return created

    return await database.run(work, write=True)
