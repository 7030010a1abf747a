"""SQL repository of the simulated fleet's servers."""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Collection, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Connection,
    Row,
    Select,
    Table,
    bindparam,
    func,
    insert,
    select,
    true,
    update,
)

from bms_image.common.errors import QuotaExceeded, QuotaViolation
from bms_image.common.model import Plugin, PluginKind
from bms_image.fleet.domain.servers import BootSource, NetworkState, Server, ServerState
from bms_image.fleet.domain.system_disks import DiskKind, SystemDisk
from bms_image.images.adapters.repository import utc
from bms_image.store.db import Database, serialize
from bms_image.store.tables import ServerRow

SERVERS: Table = ServerRow.__table__  # type: ignore[assignment]
_SERVER_BY_ID = select(SERVERS).where(SERVERS.c.id == bindparam("id"))
_INSERT_SERVER = insert(SERVERS).returning(SERVERS.c.seq, sort_by_parameter_order=True)
_DISK_BY_ID = select(
    SERVERS.c.disk_kind, SERVERS.c.disk_top, SERVERS.c.disk_base_image, SERVERS.c.disk_base_sha256
).where(SERVERS.c.id == bindparam("id"))
_SERVERS_OF_PROJECT = (
    select(func.count())
    .select_from(SERVERS)
    .where(
        SERVERS.c.project == bindparam("project"),
        SERVERS.c.state != ServerState.DELETED.value,
    )
)


def _server(row: Row[Any]) -> Server:
    return Server(
        id=row.id,
        seq=row.seq,
        project=row.project,
        host_name=row.host_name,
        flavor=row.flavor,
        hardware_model=row.hardware_model,
        image_id=row.image_id,
        state=ServerState(row.state),
        state_reason=row.state_reason,
        network_state=NetworkState(row.network_state),
        boot_source=BootSource(row.boot_source),
        system_disk_bytes=row.system_disk_bytes,
        ssh_key_fingerprint=row.ssh_key_fingerprint,
        plugins=[Plugin(PluginKind(p["kind"]), p["version"]) for p in row.plugins],
        data_disks_gb=list(row.data_disks_gb),
        task=row.task,
        last_operation=row.last_operation,
        revision=row.revision,
        create_time=utc(row.create_time),
        update_time=utc(row.update_time),
    )


def _plugins(plugins: list[Plugin]) -> list[dict[str, str]]:
    return [{"kind": p.kind.value, "version": p.version} for p in plugins]


def _values(server: Server) -> dict[str, Any]:
    return {
        "id": server.id,
        "project": server.project,
        "host_name": server.host_name,
        "flavor": server.flavor,
        "hardware_model": server.hardware_model,
        "image_id": server.image_id,
        "state": server.state.value,
        "state_reason": server.state_reason,
        "network_state": server.network_state.value,
        "boot_source": server.boot_source.value,
        "system_disk_bytes": server.system_disk_bytes,
        "ssh_key_fingerprint": server.ssh_key_fingerprint,
        "plugins": _plugins(server.plugins),
        "data_disks_gb": list(server.data_disks_gb),
        "task": server.task,
        "last_operation": server.last_operation,
        "revision": 1,
        "create_time": server.create_time,
        "update_time": server.update_time,
        **_disk_values(None),
    }


def _disk_values(disk: SystemDisk | None) -> dict[str, str]:
    """The disk_* columns of a record (all empty for none)."""
    if disk is None:
        return {"disk_kind": "", "disk_top": "", "disk_base_image": "", "disk_base_sha256": ""}
    return {
        "disk_kind": disk.kind.value,
        "disk_top": disk.top,
        "disk_base_image": disk.base_image_id,
        "disk_base_sha256": disk.base_sha256,
    }


def _project_key(project: str) -> int:
    """The advisory lock that queues a project's server creations."""
    digest = hashlib.sha256(b"servers\n" + project.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _servers(connection: Connection, statement: Select[Any]) -> list[Server]:
    return [_server(row) for row in connection.execute(statement)]


class SqlServerRepository:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def add_all(self, servers: list[Server], limit: int) -> list[Server]:
        """Adds servers of one project, if the project then has at most
        `limit` servers (not deleted); else QuotaExceeded. Atomic: the count
        and the insert are one transaction, queued per project."""
        if not servers:
            return []
        project = servers[0].project
        assert all(s.project == project for s in servers)

        def work(connection: Connection) -> list[Server]:
            serialize(connection, _project_key(project))
            used = int(connection.execute(_SERVERS_OF_PROJECT, {"project": project}).scalar_one())
            if used + len(servers) > limit:
                raise QuotaExceeded(
                    "SERVER_QUOTA_EXCEEDED",
                    f"project {project} has {used} servers; {len(servers)} more would pass its "
                    f"limit of {limit}; delete some, or ask for fewer",
                    [QuotaViolation(f"projects/{project}", f"servers: limit {limit}")],
                    {"limit": str(limit), "used": str(used)},
                )
            seqs = connection.execute(_INSERT_SERVER, [_values(s) for s in servers]).scalars()
            return [replace(s, seq=seq, revision=1) for s, seq in zip(servers, seqs, strict=True)]

        return await self._db.run(work, write=True)

    async def get(self, server_id: str) -> Server | None:
        def work(connection: Connection) -> Server | None:
            row = connection.execute(_SERVER_BY_ID, {"id": server_id}).first()
            return _server(row) if row else None

        return await self._db.run(work)

    async def list_for_project(self, project: str, after_seq: int, limit: int) -> list[Server]:
        statement = (
            select(SERVERS)
            .where(
                SERVERS.c.project == project,
                SERVERS.c.seq > after_seq,
                SERVERS.c.state != ServerState.DELETED.value,
            )
            .order_by(SERVERS.c.seq)
            .limit(limit)
        )
        return await self._db.run(lambda connection: _servers(connection, statement))

    async def disk(self, server_id: str) -> SystemDisk | None:
        """The record of the server's system disk; None before it has one."""

        def work(connection: Connection) -> SystemDisk | None:
            row = connection.execute(_DISK_BY_ID, {"id": server_id}).first()
            if row is None or not row.disk_kind:
                return None
            return SystemDisk(
                DiskKind(row.disk_kind), row.disk_top, row.disk_base_image, row.disk_base_sha256
            )

        return await self._db.run(work)

    async def in_states(self, states: Collection[ServerState]) -> list[Server]:
        statement = select(SERVERS).where(SERVERS.c.state.in_([s.value for s in states]))
        return await self._db.run(lambda connection: _servers(connection, statement))

    async def transition(
        self,
        server_id: str,
        from_states: Collection[ServerState],
        changes: Mapping[str, Any],
        task: str | None = None,
        disk: SystemDisk | None = None,
    ) -> Server | None:
        """Applies changes if the server is in one of from_states (and, when
        given, has exactly that task); None if not. `disk`, when given,
        becomes the record of its system disk in the same change."""
        values = {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in changes.items()}
        if "plugins" in values:
            values["plugins"] = _plugins(values["plugins"])
        if disk is not None:
            values.update(_disk_values(disk))
        values["update_time"] = datetime.now(UTC)
        statement = (
            update(SERVERS)
            .where(
                SERVERS.c.id == server_id,
                SERVERS.c.state.in_([s.value for s in from_states]),
                true() if task is None else SERVERS.c.task == task,
            )
            .values(revision=SERVERS.c.revision + 1, **values)
            .returning(*SERVERS.c)
        )

        def work(connection: Connection) -> Server | None:
            row = connection.execute(statement).first()
            return _server(row) if row else None

        return await self._db.run(work, write=True)

    async def claim_task_within_limit(
        self,
        server_id: str,
        state: ServerState,
        task: str,
        *,
        counted: Collection[str],
        limit: int,
    ) -> tuple[Server | None, int]:
        """Gives an idle server in `state` the task unless its project's
        servers already hold `limit` tasks among `counted`: the count is the
        WHERE of the one UPDATE that claims. SQLite runs writes one at a
        time; on PostgreSQL a transaction-scoped advisory lock per project
        queues the claims first (under READ COMMITTED two claims could
        otherwise count the same rows). Returns the claimed server and 0, or
        None and the project's count of `counted` tasks (below `limit` when
        the server itself was not idle)."""
        owner = select(SERVERS.c.project).where(SERVERS.c.id == server_id)
        holding = (
            select(func.count())
            .select_from(SERVERS)
            .where(SERVERS.c.project == bindparam("task_owner"), SERVERS.c.task.in_(list(counted)))
        )
        claim = (
            update(SERVERS)
            .where(
                SERVERS.c.id == server_id,
                SERVERS.c.state == state.value,
                SERVERS.c.task == "",
                holding.scalar_subquery() < limit,
            )
            .values(task=task, revision=SERVERS.c.revision + 1, update_time=datetime.now(UTC))
            .returning(*SERVERS.c)
        )

        def work(connection: Connection) -> tuple[Server | None, int]:
            project = connection.execute(owner).scalar()
            if project is None:
                return None, 0
            serialize(connection, _project_lock(project))
            row = connection.execute(claim, {"task_owner": project}).first()
            if row is not None:
                return _server(row), 0
            return None, int(connection.execute(holding, {"task_owner": project}).scalar_one())

        return await self._db.run(work, write=True)


def _project_lock(project: str) -> int:
    """The advisory-lock key of a project's server tasks (a signed 64-bit
    number, as pg_advisory_xact_lock takes; other locks use small ones)."""
    digest = hashlib.sha256(b"bms-image server tasks\0" + project.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)
