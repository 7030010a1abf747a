"""What the fleet streams, as tests read it: boot sources, provisioning
stages, server and network states by short names, and the events of a
CreateServers, ReinstallServer or WatchServer stream grouped by server.
The provisioning tests and the fleet scenarios both import it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from bms.image.v1 import provisioning_pb2

pb = provisioning_pb2

LOCAL = pb.BOOT_SOURCE_LOCAL_DISK
EVS = pb.BOOT_SOURCE_EVS

VALIDATING = pb.PROVISIONING_STAGE_VALIDATING
STREAMING = pb.PROVISIONING_STAGE_IMAGE_STREAMING
VERIFYING = pb.PROVISIONING_STAGE_VERIFYING_CHECKSUM
CLONING = pb.PROVISIONING_STAGE_EVS_CLONING
FIRST_BOOT = pb.PROVISIONING_STAGE_FIRST_BOOT
NETWORK = pb.PROVISIONING_STAGE_NETWORK_CONFIGURED
STAGE_ACTIVE = pb.PROVISIONING_STAGE_ACTIVE
FAILED = pb.PROVISIONING_STAGE_FAILED

BUILDING = pb.SERVER_STATE_BUILDING
ACTIVE = pb.SERVER_STATE_ACTIVE
STOPPED = pb.SERVER_STATE_STOPPED
ERROR = pb.SERVER_STATE_ERROR
REBUILDING = pb.SERVER_STATE_REBUILDING

NET_UP = pb.NETWORK_STATE_UP
NET_DOWN = pb.NETWORK_STATE_DOWN


def stage_name(stage: int) -> str:
    return str(pb.ProvisioningStage.Name(stage))  # type: ignore[arg-type]


def state_name(state: int) -> str:
    return str(pb.ServerState.Name(state))  # type: ignore[arg-type]


@dataclass
class Events:
    """The events of a stream, by server in the order the servers first
    appeared."""

    events: list[provisioning_pb2.ServerEvent]
    by_server: dict[str, list[provisioning_pb2.ServerEvent]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for event in self.events:
            self.by_server.setdefault(event.server, []).append(event)

    @property
    def servers(self) -> list[str]:
        return list(self.by_server)

    def stages(self, server: str) -> list[int]:
        return [e.stage for e in self.by_server[server]]

    def final(self, server: str) -> provisioning_pb2.ServerEvent:
        return self.by_server[server][-1]

    def describe(self, server: str) -> list[str]:
        return [f"{stage_name(e.stage)}: {e.message}" for e in self.by_server[server]]


async def collect_events(stream: Any, within: float) -> list[provisioning_pb2.ServerEvent]:
    """Every event of `stream`, to its end (at most `within` seconds)."""

    async def run() -> list[provisioning_pb2.ServerEvent]:
        return [event async for event in stream]

    return await asyncio.wait_for(run(), within)
