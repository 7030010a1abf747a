"""The servers' network: faults an admin injects, and what bms-network-config
does about them (judged on the disk's content, never on flags)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from bms_image.common.errors import (
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    PreconditionViolation,
)
from bms_image.common.model import Caller, PluginKind
from bms_image.fleet.domain.captures import ServerReader
from bms_image.fleet.domain.ports import PluginStates, ServerDisks, ServerRepository, UnreadableDisk
from bms_image.fleet.domain.servers import NetworkState, Server, ServerState

#: How long bms-network-config takes to notice and repair a broken network.
NETWORK_RESTORE_SECONDS = 2.0


class Network:
    def __init__(
        self,
        servers: ServerRepository,
        disks: ServerDisks,
        fleet: ServerReader,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
    ) -> None:
        self._servers = servers
        self._disks = disks
        self._fleet = fleet
        self._spawn = spawn

    async def inject_fault(self, caller: Caller, server_id: str) -> Server:
        """Breaks an active server's network (admins only); bms-network-config
        repairs it if it is intact on the disk."""
        if not caller.is_admin:
            await self._fleet.get(caller, server_id)  # strangers learn nothing
            raise PermissionDenied("ADMIN_REQUIRED", "only a platform admin may inject faults")
        server = await self._servers.get(server_id)
        if server is None or server.state is ServerState.DELETED:
            raise NotFound("SERVER_NOT_FOUND", f"server servers/{server_id} not found")
        if server.state is not ServerState.ACTIVE:
            raise FailedPrecondition(
                "SERVER_NOT_ACTIVE",
                f"servers/{server_id} is {server.state.value}; only a running server has a network",
                [PreconditionViolation("STATE", f"servers/{server_id}", server.state.value)],
            )
        down = await self._servers.transition(
            server_id,
            {ServerState.ACTIVE},
            {"network_state": NetworkState.DOWN, "state_reason": "network interrupted (fault)"},
        )
        if down is None:
            return await self.inject_fault(caller, server_id)
        self._spawn(self.watchdog(server_id))
        return down

    async def watchdog(self, server_id: str) -> None:
        """What bms-network-config does on the server: notices the network is
        down and brings it back — if it is there and intact on the disk."""
        await asyncio.sleep(NETWORK_RESTORE_SECONDS)
        states: PluginStates
        try:
            disk = await self._fleet.system_disk(server_id)
            states = await self._disks.plugin_states(server_id, disk)
        except (FailedPrecondition, UnreadableDisk, OSError):
            states = {PluginKind.BMS_NETWORK_CONFIG: ("unreadable", "")}
        if states[PluginKind.BMS_NETWORK_CONFIG][0] != "intact":
            await self._servers.transition(
                server_id,
                {ServerState.ACTIVE},
                {
                    "state_reason": "network down: bms-network-config is "
                    f"{states[PluginKind.BMS_NETWORK_CONFIG][0]}, nothing restores it"
                },
            )
            return
        await self._servers.transition(
            server_id,
            {ServerState.ACTIVE},
            {
                "network_state": NetworkState.UP,
                "state_reason": "network restored by bms-network-config",
            },
        )
