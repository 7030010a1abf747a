"""SQL repository of the simulated fleet's servers."""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select, true, update

from ..domain.model import Plugin, PluginKind
from ..domain.servers import BootSource, NetworkState, Server, ServerState
from .db import Database
from .repository import utc
from .tables import ServerRow


def _server(row: ServerRow) -> Server:
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


class SqlServerRepository:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def add_all(self, servers: list[Server]) -> list[Server]:
        async with self._db.write() as session:
            rows = [
                ServerRow(
                    id=s.id,
                    project=s.project,
                    host_name=s.host_name,
                    flavor=s.flavor,
                    hardware_model=s.hardware_model,
                    image_id=s.image_id,
                    state=s.state.value,
                    state_reason=s.state_reason,
                    network_state=s.network_state.value,
                    boot_source=s.boot_source.value,
                    system_disk_bytes=s.system_disk_bytes,
                    ssh_key_fingerprint=s.ssh_key_fingerprint,
                    plugins=_plugins(s.plugins),
                    data_disks_gb=list(s.data_disks_gb),
                    task=s.task,
                    last_operation=s.last_operation,
                    revision=1,
                    create_time=s.create_time,
                    update_time=s.update_time,
                )
                for s in servers
            ]
            session.add_all(rows)
            await session.flush()
            return [_server(row) for row in rows]

    async def get(self, server_id: str) -> Server | None:
        async with self._db.read() as session:
            row = await session.scalar(select(ServerRow).where(ServerRow.id == server_id))
            return _server(row) if row else None

    async def list_for_project(self, project: str, after_seq: int, limit: int) -> list[Server]:
        async with self._db.read() as session:
            rows = await session.scalars(
                select(ServerRow)
                .where(
                    ServerRow.project == project,
                    ServerRow.seq > after_seq,
                    ServerRow.state != ServerState.DELETED.value,
                )
                .order_by(ServerRow.seq)
                .limit(limit)
            )
            return [_server(row) for row in rows]

    async def in_states(self, states: Collection[ServerState]) -> list[Server]:
        async with self._db.read() as session:
            rows = await session.scalars(
                select(ServerRow).where(ServerRow.state.in_([s.value for s in states]))
            )
            return [_server(row) for row in rows]

    async def count_tasks(self, project: str, task: str) -> int:
        async with self._db.read() as session:
            count = await session.scalar(
                select(func.count())
                .select_from(ServerRow)
                .where(ServerRow.project == project, ServerRow.task == task)
            )
            return int(count or 0)

    async def transition(
        self,
        server_id: str,
        from_states: Collection[ServerState],
        changes: Mapping[str, Any],
        task: str | None = None,
    ) -> Server | None:
        """Applies changes if the server is in one of from_states (and, when
        given, has exactly that task); None if not."""
        values = {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in changes.items()}
        if "plugins" in values:
            values["plugins"] = _plugins(values["plugins"])
        values["update_time"] = datetime.now(UTC)
        async with self._db.write() as session:
            result = await session.execute(
                update(ServerRow)
                .where(
                    ServerRow.id == server_id,
                    ServerRow.state.in_([s.value for s in from_states]),
                    true() if task is None else ServerRow.task == task,
                )
                .values(revision=ServerRow.revision + 1, **values)
                .execution_options(synchronize_session=False)
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                return None
            row = await session.scalar(
                select(ServerRow)
                .where(ServerRow.id == server_id)
                .execution_options(populate_existing=True)
            )
            return _server(row) if row else None
