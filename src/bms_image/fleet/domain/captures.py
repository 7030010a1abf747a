"""Capture holds: how the fleet lends a stopped server's disk to a capture.

A capture holds its server in two steps, each a conditional write of
servers.task: prepare_capture claims an idle STOPPED server as CAPTURE_HOLD
(counted against the project's limit in the same statement), start_capture
turns the hold into CAPTURE_RUNNING once, for the image created as this
server's capture, and the capture's end lets it go. Release takes back a
hold only, never a running capture. While a server is held, power changes
and deletion are refused (servers.require_server_transition)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Protocol

from bms_image.common.errors import (
    FailedPrecondition,
    PreconditionViolation,
    QuotaExceeded,
    QuotaViolation,
)
from bms_image.common.model import Caller, CaptureSource, ImageStatus
from bms_image.fleet.domain.ports import (
    NO_SPANS,
    ImageSource,
    ServerDisks,
    ServerRepository,
    Spans,
    UnreadableDisk,
)
from bms_image.fleet.domain.servers import (
    Server,
    ServerState,
    intact_plugins,
    require_server_transition,
)
from bms_image.fleet.domain.system_disks import SystemDisk

log = logging.getLogger(__name__)

MAX_CAPTURES_PER_PROJECT = 40
#: servers.task of a server held for a capture that has not started, and of
#: one whose capture runs (the public name of the task, see Server.task).
CAPTURE_HOLD = "capture-hold"
CAPTURE_RUNNING = "capture"
CAPTURE_TASKS = (CAPTURE_HOLD, CAPTURE_RUNNING)
#: How long a server held for a capture waits for the capture to start.
CAPTURE_START_SECONDS = 60.0


def _status_name(status: ImageStatus) -> str:
    """The status as ImageService names it (IMAGE_STATUS_QUEUED, ...)."""
    return f"IMAGE_STATUS_{status.name}"


class ServerReader(Protocol):
    """What captures read through the fleet."""

    async def get(self, caller: Caller, server_id: str) -> Server: ...

    async def system_disk(self, server_id: str, verify_base: bool = False) -> SystemDisk: ...


class Captures:
    def __init__(
        self,
        servers: ServerRepository,
        images: ImageSource,
        disks: ServerDisks,
        fleet: ServerReader,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        spans: Spans = NO_SPANS,
    ) -> None:
        self._servers = servers
        self._images = images
        self._disks = disks
        self._fleet = fleet
        self._spawn = spawn
        self._spans = spans
        #: Servers held by prepare_capture whose capture has not started yet.
        self._holds: dict[str, str] = {}

    async def prepare_capture(self, caller: Caller, token: str, server_id: str) -> CaptureSource:
        """Checks the server can be captured and holds it for the capture."""
        server = await self._fleet.get(caller, server_id)
        if server.task:
            require_server_transition(server, server.state)  # raises SERVER_BUSY
        if server.state is not ServerState.STOPPED:
            raise FailedPrecondition(
                "SERVER_NOT_STOPPED",
                f"servers/{server.id} is {server.state.value}; stop it before capturing it",
                [PreconditionViolation("STATE", f"servers/{server.id}", server.state.value)],
            )
        disk = await self._fleet.system_disk(server.id, verify_base=True)
        try:
            states = await self._disks.plugin_states(server.id, disk)
        except UnreadableDisk:
            raise FailedPrecondition(
                "SERVER_DISK_UNREADABLE",
                f"servers/{server.id} has no readable system disk (its partition table is "
                "damaged); reinstall it before capturing it",
            ) from None
        damaged = [
            (plugin.kind, states[plugin.kind][0])
            for plugin in server.plugins
            if states[plugin.kind][0] != "intact"
        ]
        if damaged:
            names = ", ".join(f"{kind.value} is {state}" for kind, state in damaged)
            raise FailedPrecondition(
                "PLUGINS_DAMAGED",
                f"servers/{server.id} cannot be captured: {names} (plug-ins must be present "
                "and unmodified)",
                [PreconditionViolation("PLUGIN", kind.value, state) for kind, state in damaged],
            )
        release = await self._disks.os_release(server.id, disk)
        layout = await self._disks.partition_layout(server.id, disk)
        claimed, running = await self._servers.claim_task_within_limit(
            server.id,
            ServerState.STOPPED,
            CAPTURE_HOLD,
            counted=CAPTURE_TASKS,
            limit=MAX_CAPTURES_PER_PROJECT,
        )
        if claimed is None and running >= MAX_CAPTURES_PER_PROJECT:
            raise QuotaExceeded(
                "CAPTURE_LIMIT",
                f"project {caller.project} already runs {running} captures; wait for one to end",
                [
                    QuotaViolation(
                        f"projects/{caller.project}",
                        f"captures at once: limit {MAX_CAPTURES_PER_PROJECT}",
                    )
                ],
            )
        if claimed is None:
            raise FailedPrecondition(
                "SERVER_BUSY", f"servers/{server.id} changed meanwhile; read it again"
            )
        hold = self._holds[server.id] = uuid.uuid4().hex
        self._spawn(self._release_if_never_started(server.id, hold))
        return CaptureSource(
            server_id=server.id,
            hardware_model=server.hardware_model,
            os_type=release.get("BMS_OS_TYPE", "linux"),
            os_distro=release.get("ID", ""),
            os_version=release.get("VERSION_ID", ""),
            architecture=release.get("BMS_ARCHITECTURE", "x86_64"),
            plugins=intact_plugins(states),
            partitions=layout,
        )

    async def start_capture(self, token: str, server_id: str, image_id: str) -> None:
        """Starts the capture of a held server into the image created as its
        capture (asked of the image service with the caller's token), once:
        the hold turns into a running capture in one conditional write."""
        subject = f"servers/{server_id}"
        await self._require_not_started(server_id)
        image = await self._images.describe(image_id, token)
        if (
            image.source_server != subject
            or image.status is not ImageStatus.QUEUED
            or image.uploaded_bytes
        ):
            raise FailedPrecondition(
                "CAPTURE_IMAGE_MISMATCH",
                f"images/{image_id} is not a queued, empty capture of {subject} (it is "
                f"{_status_name(image.status)}, captured from "
                f"{image.source_server or 'no server'}); a capture starts once, into the image "
                "CreateImage made for it",
                [PreconditionViolation("CAPTURE", f"images/{image_id}", "not this capture")],
            )
        started = await self._servers.transition(
            server_id, {ServerState.STOPPED}, {"task": CAPTURE_RUNNING}, task=CAPTURE_HOLD
        )
        if started is None:
            await self._require_not_started(server_id)
            raise FailedPrecondition(
                "SERVER_NOT_HELD",
                f"{subject} is not held for a capture; PrepareServerCapture holds it first",
            )
        self._holds.pop(server_id, None)
        log.info("capturing %s into images/%s", subject, image_id)
        self._spawn(self._capture(token, server_id, image_id))

    async def _require_not_started(self, server_id: str) -> None:
        server = await self._servers.get(server_id)
        if server is not None and server.task == CAPTURE_RUNNING:
            raise FailedPrecondition(
                "CAPTURE_ALREADY_STARTED",
                f"the capture of servers/{server_id} has started already; it starts once",
                [PreconditionViolation("TASK", f"servers/{server_id}", CAPTURE_RUNNING)],
            )

    async def release_capture(self, token: str, server_id: str) -> None:
        """Lets go of a hold whose capture will not start; a running capture
        is never released (it lets go when it ends)."""
        released = await self._servers.transition(
            server_id, {ServerState.STOPPED}, {"task": ""}, task=CAPTURE_HOLD
        )
        if released is not None:
            self._holds.pop(server_id, None)
            return
        server = await self._servers.get(server_id)
        if server is not None and server.task == CAPTURE_RUNNING:
            raise FailedPrecondition(
                "CAPTURE_RUNNING",
                f"servers/{server_id} is being captured; it is let go when the capture ends",
                [PreconditionViolation("TASK", f"servers/{server_id}", CAPTURE_RUNNING)],
            )

    async def _release_if_never_started(self, server_id: str, hold: str) -> None:
        """An image service in another process may die between holding a
        server and starting its capture: the hold then lapses, or the server
        would stay busy until this process restarts."""
        await asyncio.sleep(CAPTURE_START_SECONDS)
        if self._holds.get(server_id) == hold:
            del self._holds[server_id]
            log.warning("servers/%s was held for a capture that never started", server_id)
            await self.let_go(server_id, CAPTURE_HOLD)

    async def require_held(self, caller: Caller, server_id: str) -> None:
        """For captures asked for over the network: the server must be the
        caller's and held (or captured) by this capture service."""
        server = await self._fleet.get(caller, server_id)
        if server.task not in CAPTURE_TASKS:
            raise FailedPrecondition(
                "SERVER_NOT_HELD",
                f"servers/{server.id} is not being captured; PrepareServerCapture holds it first",
            )

    async def let_go(self, server_id: str, task: str) -> None:
        """Ends the server's task `task` (a hold or a running capture)."""
        await self._servers.transition(server_id, {ServerState.STOPPED}, {"task": ""}, task=task)

    async def _capture(self, token: str, server_id: str, image_id: str) -> None:
        """Uploads the server's disk into the image through ImageService.
        Whatever fails, the image does not stay QUEUED: the stream is open
        before the disk is flattened (see ImageSource.upload), and a stream
        that ends or breaks early kills a capture image."""
        released = False

        async def release() -> None:
            nonlocal released
            if not released:
                released = True
                await self.let_go(server_id, CAPTURE_RUNNING)

        async def flatten() -> Path:
            disk = await self._fleet.system_disk(server_id, verify_base=True)
            return await self._disks.flatten(server_id, disk, image_id)

        attributes = {"bms.server": f"servers/{server_id}", "bms.image": f"images/{image_id}"}
        try:
            # The server is let go once every byte is sent, before the image
            # service can turn the image ACTIVE.
            with self._spans.span("fleet.capture", attributes):
                await self._images.upload(image_id, flatten, token, before_end=release)
        except Exception:
            log.exception("capture of servers/%s into images/%s failed", server_id, image_id)
        finally:
            await self._disks.discard_flat(image_id)
            await release()
