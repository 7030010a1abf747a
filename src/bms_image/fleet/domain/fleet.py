"""The fleet: deploys servers from images, powers them on and off, deletes
them, holds them for captures and recovers from a restart. Long work runs in
tasks of its own, so it goes on when the caller's stream drops, and reports
progress through the event bus. It drives ports (fleet.domain.ports): the
server repository, the image source, Cloud-Init and the servers' disks, and
marks each step of a deployment with a span (the Spans port: a no-op while
tracing is off). Tasks copy the context they are started in, so a
deployment's spans, and the image fetch's calls to ImageService, belong to
the trace of the call that asked for it, after that call has answered."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bms_image.common.errors import (
    DomainError,
    FailedPrecondition,
    NotFound,
    QuotaExceeded,
    QuotaViolation,
    code_name_of,
    raise_if_invalid,
)
from bms_image.common.model import Caller, CaptureSource, Flavor, Image, PluginKind
from bms_image.common.paging import PageTokens, page_size_or_default
from bms_image.fleet.domain.captures import CAPTURE_TASKS, Captures
from bms_image.fleet.domain.events import EventBus, FinishedHook
from bms_image.fleet.domain.network import Network
from bms_image.fleet.domain.ports import (
    NO_SPANS,
    CloudInit,
    FlavorSource,
    ImageSource,
    PluginStates,
    ServerDisks,
    ServerRepository,
    Spans,
    UnreadableDisk,
)
from bms_image.fleet.domain.servers import (
    BootSource,
    DeployRequest,
    NetworkState,
    ProvisioningStage,
    Server,
    ServerEvent,
    ServerState,
    choose_boot_source,
    first_boot_violations,
    has_cloud_init,
    intact_plugins,
    require_cloud_init_for_key,
    require_deployable,
    require_server_transition,
    ssh_key_fingerprint,
    validate_deploy_request,
)
from bms_image.fleet.domain.system_disks import DiskKind, SystemDisk, new_overlay_file

log = logging.getLogger(__name__)

#: Servers of one batch deployed at the same time (disk copies are I/O bound).
PARALLEL_DEPLOYS = 8
#: Defaults of BMS_IMAGE_MAX_SERVERS_PER_PROJECT (servers not deleted) and
#: BMS_IMAGE_MAX_DEPLOYMENTS_PER_PROJECT (servers one provisioner process
#: builds or reinstalls at once for a project).
MAX_SERVERS_PER_PROJECT = 2000
MAX_DEPLOYMENTS_PER_PROJECT = 1000


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class _Plan:
    """A validated deployment: everything decided before any byte moves."""

    image: Image
    sha256: str
    boot_source: BootSource
    ssh_public_key: str
    user_data: str
    token: str
    #: The user data's write_files, parsed (off the loop, bounded) once.
    user_files: dict[str, bytes]


#: What WatchServer says of a server with no work going on.
_STAGE_OF_STATE = {
    ServerState.BUILDING: ProvisioningStage.VALIDATING,
    ServerState.ACTIVE: ProvisioningStage.ACTIVE,
    ServerState.STOPPED: ProvisioningStage.ACTIVE,
    ServerState.ERROR: ProvisioningStage.FAILED,
    ServerState.REBUILDING: ProvisioningStage.VALIDATING,
}


class Fleet:
    def __init__(
        self,
        servers: ServerRepository,
        flavors: FlavorSource,
        images: ImageSource,
        page_tokens: PageTokens,
        disks: ServerDisks,
        cloud_init: CloudInit,
        on_finished: FinishedHook | None = None,
        max_servers_per_project: int = MAX_SERVERS_PER_PROJECT,
        max_deployments_per_project: int = MAX_DEPLOYMENTS_PER_PROJECT,
        spans: Spans = NO_SPANS,
    ) -> None:
        self._servers = servers
        self._flavors = flavors
        self._images = images
        self._tokens = page_tokens
        self._disks = disks
        self._cloud_init = cloud_init
        self._max_servers = max_servers_per_project
        self._max_deployments = max_deployments_per_project
        self._spans = spans
        #: Servers this process builds or reinstalls now, by project.
        self._deploying: dict[str, int] = {}
        self.events = EventBus(on_finished)
        self._tasks: set[asyncio.Task[None]] = set()
        self.captures = Captures(servers, images, disks, self, self._spawn, spans)
        self.network = Network(servers, disks, self, self._spawn)

    # -- reading ------------------------------------------------------------

    async def get(self, caller: Caller, server_id: str) -> Server:
        server = await self._servers.get(server_id)
        if (
            server is None
            or server.project != caller.project
            or server.state is ServerState.DELETED
        ):
            raise NotFound("SERVER_NOT_FOUND", f"server servers/{server_id} not found")
        return server

    async def list_servers(
        self, caller: Caller, page_size: int, page_token: str
    ) -> tuple[list[Server], str]:
        limit = page_size_or_default(page_size)
        scope = f"servers\n{caller.project}"
        after = self._tokens.decode(page_token, scope)
        rows = await self._servers.list_for_project(caller.project, after, limit + 1)
        page = rows[:limit]
        return page, self._tokens.encode(page[-1].seq, scope) if len(rows) > limit else ""

    async def watch(self, caller: Caller, server_id: str) -> AsyncIterator[ServerEvent]:
        """The server's work, from its first event to ACTIVE or FAILED, when
        some is going on or has just ended; otherwise one event of its state.
        Events are read after the server, so work that ends between the two
        reads is still told in full, never as a stale snapshot."""
        server = await self.get(caller, server_id)
        working = server.state in (ServerState.BUILDING, ServerState.REBUILDING)
        if self.events.in_progress(server.id) or (working and self.events.knows(server.id)):
            async for event in self.events.follow([server.id]):
                yield event
            return
        if working:  # no events at all: read again rather than guess
            server = await self.get(caller, server_id)
        yield ServerEvent(
            server_id=server.id,
            stage=_STAGE_OF_STATE.get(server.state, ProvisioningStage.FAILED),
            state=server.state,
            message=server.state_reason or f"server is {server.state.value}",
            time=server.update_time or server.create_time or _now(),
            percent=100.0,
            boot_source=server.boot_source,
        )

    async def system_disk(self, server_id: str, verify_base: bool = False) -> SystemDisk:
        """The record of the server's system disk; with verify_base, an EVS
        clone's base is checked to be its image's bytes still (DataLoss if
        not). FailedPrecondition SERVER_DISK_UNREADABLE if there is none."""
        record = await self._servers.disk(server_id)
        if record is None:
            raise FailedPrecondition(
                "SERVER_DISK_UNREADABLE",
                f"servers/{server_id} has no recorded system disk; reinstall it",
            )
        if verify_base and record.kind is DiskKind.EVS:
            await self._images.verified(record.base_image_id, record.base_sha256)
        return record

    # -- deployment and reinstallation ---------------------------------------

    async def _plan(
        self,
        image_id: str,
        flavor: Flavor,
        token: str,
        ssh_public_key: str,
        user_data: str,
        boot_source: BootSource,
    ) -> _Plan:
        """Everything checked before any byte moves."""
        user_files = await self._cloud_init.parse_user_data(user_data)  # bad YAML fails now
        image = await self._images.describe(image_id, token)
        require_deployable(image, flavor, self._flavors.names_for_model(image.hardware_model))
        require_cloud_init_for_key(image, ssh_public_key)
        chosen = choose_boot_source(image, flavor, boot_source)
        sha256 = await self._images.authorize(image, token)
        return _Plan(image, sha256, chosen, ssh_public_key, user_data, token, user_files)

    async def create_servers(
        self, caller: Caller, token: str, request: DeployRequest
    ) -> list[Server]:
        validate_deploy_request(request)
        flavor = self._flavors.get(request.flavor)
        self._reserve(caller.project, request.count)
        try:
            servers, plan = await self._add_servers(caller, token, request, flavor)
        except BaseException:
            self._finished(caller.project, request.count)
            raise
        self._spawn(self._deploy_batch(servers, plan, ServerState.BUILDING))
        return servers

    def _reserve(self, project: str, count: int) -> None:
        """Counts servers in deployment for a project, within its limit."""
        running = self._deploying.get(project, 0)
        if running + count > self._max_deployments:
            raise QuotaExceeded(
                "DEPLOYMENT_LIMIT",
                f"project {project} has {running} servers being built or reinstalled here; "
                f"{count} more would pass its limit of {self._max_deployments}; wait for some "
                "to finish",
                [
                    QuotaViolation(
                        f"projects/{project}",
                        f"deployments at once: limit {self._max_deployments}",
                    )
                ],
                {"limit": str(self._max_deployments), "used": str(running)},
            )
        self._deploying[project] = running + count

    def _finished(self, project: str, count: int = 1) -> None:
        left = self._deploying.get(project, 0) - count
        if left > 0:
            self._deploying[project] = left
        else:
            self._deploying.pop(project, None)

    async def _add_servers(
        self, caller: Caller, token: str, request: DeployRequest, flavor: Flavor
    ) -> tuple[list[Server], _Plan]:
        plan = await self._plan(
            request.image_id,
            flavor,
            token,
            request.ssh_public_key,
            request.user_data,
            request.boot_source,
        )
        now = _now()
        fingerprint = ssh_key_fingerprint(request.ssh_public_key.strip())
        drafts = [
            Server(
                id=str(uuid.uuid4()),
                project=caller.project,
                host_name=f"{request.name_prefix}-{n}",
                flavor=flavor.name,
                hardware_model=flavor.hardware_model,
                image_id=plan.image.id,
                boot_source=plan.boot_source,
                ssh_key_fingerprint=fingerprint,
                data_disks_gb=list(request.data_disks_gb),
                create_time=now,
                update_time=now,
            )
            for n in range(1, request.count + 1)
        ]
        servers = await self._servers.add_all(drafts, self._max_servers)
        for server in servers:
            await self._event(
                server, ProvisioningStage.VALIDATING, 2.0, "request and image checked"
            )
        return servers, plan

    async def reinstall(
        self,
        caller: Caller,
        token: str,
        server_id: str,
        image_id: str,
        ssh_public_key: str,
        user_data: str,
    ) -> Server:
        """Rewrites the system disk of a stopped server (or one whose last
        reinstall failed) from its image or another compatible one; data disks
        keep their content and Cloud-Init runs again."""
        raise_if_invalid(first_boot_violations(ssh_public_key, user_data), "INVALID_REINSTALL")
        self._reserve(caller.project, 1)
        try:
            claimed, plan = await self._claim_reinstall(
                caller, token, server_id, image_id, ssh_public_key, user_data
            )
        except BaseException:
            self._finished(caller.project)
            raise
        self._spawn(self._deploy_batch([claimed], plan, ServerState.REBUILDING))
        return claimed

    async def _claim_reinstall(
        self,
        caller: Caller,
        token: str,
        server_id: str,
        image_id: str,
        ssh_public_key: str,
        user_data: str,
    ) -> tuple[Server, _Plan]:
        server = await self.get(caller, server_id)
        require_server_transition(server, ServerState.REBUILDING)
        flavor = self._flavors.get(server.flavor)
        wanted = (
            server.boot_source if server.boot_source is BootSource.EVS else BootSource.LOCAL_DISK
        )
        try:
            plan = await self._plan(
                image_id or server.image_id, flavor, token, ssh_public_key, user_data, wanted
            )
        except FailedPrecondition as error:
            if error.reason != "EVS_BOOT_UNAVAILABLE":
                raise
            plan = await self._plan(
                image_id or server.image_id,
                flavor,
                token,
                ssh_public_key,
                user_data,
                BootSource.LOCAL_DISK,
            )
        claimed = await self._servers.transition(
            server.id,
            {server.state},
            {
                "state": ServerState.REBUILDING,
                "state_reason": "",
                "task": "reinstall",
                "last_operation": "reinstall",
                "image_id": plan.image.id,
                "boot_source": plan.boot_source,
                "ssh_key_fingerprint": ssh_key_fingerprint(ssh_public_key.strip()),
            },
            task="",
        )
        if claimed is None:
            raise FailedPrecondition(
                "SERVER_STATE_CONFLICT", f"servers/{server.id} changed meanwhile; read it again"
            )
        await self._event(
            claimed, ProvisioningStage.VALIDATING, 2.0, "reinstall checked",
            state=ServerState.REBUILDING,
        )  # fmt: skip
        return claimed, plan

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _event(
        self,
        server: Server,
        stage: ProvisioningStage,
        percent: float,
        message: str,
        *,
        state: ServerState | None = None,
        bytes_done: int = 0,
        bytes_total: int = 0,
        error: DomainError | None = None,
    ) -> None:
        await self.events.publish(
            ServerEvent(
                server_id=server.id,
                stage=stage,
                state=state or server.state,
                message=message,
                time=_now(),
                bytes_done=bytes_done,
                bytes_total=bytes_total,
                percent=percent,
                boot_source=server.boot_source,
                error_code=(code_name_of(error) or "") if error else "",
                error_reason=error.reason if error else "",
            )
        )

    async def _deploy_batch(self, servers: list[Server], plan: _Plan, working: ServerState) -> None:
        """Deploys a batch; each server leaves the project's count of
        deployments when its own work ends."""
        pending = {server.id for server in servers}

        def finished(server: Server) -> None:
            if server.id in pending:
                pending.discard(server.id)
                self._finished(server.project)

        attributes = {
            "bms.operation": "reinstall" if working is ServerState.REBUILDING else "create",
            "bms.image": f"images/{plan.image.id}",
            "bms.boot_source": plan.boot_source.name.lower(),
            "bms.server_count": len(servers),
        }
        try:
            with self._spans.span("fleet.deploy", attributes):
                await self._deploy_servers(servers, plan, working, finished)
        finally:
            for server in servers:
                finished(server)

    async def _deploy_servers(
        self,
        servers: list[Server],
        plan: _Plan,
        working: ServerState,
        finished: Callable[[Server], None],
    ) -> None:
        streaming = plan.boot_source is BootSource.LOCAL_DISK
        stage = ProvisioningStage.IMAGE_STREAMING if streaming else ProvisioningStage.EVS_CLONING
        reported = -1

        async def progress(done: int, total: int) -> None:
            nonlocal reported
            step = total // 20 or 1  # about every 5 %
            if done == reported or (done - reported < step and done != total):
                return
            reported = done
            share = 60.0 * done / total if total else 60.0
            for server in servers:
                await self._event(
                    server, stage, 5.0 + share, "fetching the image",
                    bytes_done=done, bytes_total=total,
                )  # fmt: skip

        try:
            with self._spans.span("fleet.fetch_image", {"bms.image": f"images/{plan.image.id}"}):
                cached = await self._images.fetch(plan.image.id, plan.sha256, plan.token, progress)
        except Exception as error:  # never leave servers BUILDING or REBUILDING
            failure = _as_domain_error(error, f"fetching images/{plan.image.id}")
            for server in servers:
                await self._fail(server, failure, working)
                finished(server)
            return
        limit = asyncio.Semaphore(PARALLEL_DEPLOYS)

        async def one(server: Server) -> None:
            async with limit:
                try:
                    with self._spans.span(
                        "fleet.deploy_server", {"bms.server": f"servers/{server.id}"}
                    ):
                        await self._deploy_one(server, plan, cached, working)
                except Exception as error:
                    failure = _as_domain_error(error, f"deploying servers/{server.id}")
                    await self._fail(server, failure, working)
                finally:
                    finished(server)

        await asyncio.gather(*(one(server) for server in servers))

    async def _write_system_disk(self, server: Server, plan: _Plan, cached: Path) -> SystemDisk:
        """A new system disk next to the one in use (if any), and its record:
        a local disk is a copy of the cache entry, swapped in by rename once
        first boot is done; an EVS clone is a new overlay of its own over the
        entry, swapped in when its record is. The entry itself is never
        written."""
        size = plan.image.size_bytes
        if plan.boot_source is BootSource.EVS:
            record = SystemDisk.evs(plan.image.id, plan.sha256, new_overlay_file())
            await self._disks.write(server.id, record, cached)
            await self._event(
                server, ProvisioningStage.EVS_CLONING, 80.0, "EVS volume cloned (copy-on-write)",
                bytes_done=size, bytes_total=size,
            )  # fmt: skip
            return record
        record = SystemDisk.local()
        await self._disks.write(server.id, record, cached)
        await self._event(
            server, ProvisioningStage.IMAGE_STREAMING, 75.0, "image written to the local disk",
            bytes_done=size, bytes_total=size,
        )  # fmt: skip
        await self._event(
            server, ProvisioningStage.VERIFYING_CHECKSUM, 80.0,
            f"image bytes match sha256 {plan.sha256[:12]}... (verified as they arrived "
            "into the image cache the disk was copied from)",
            bytes_done=size, bytes_total=size,
        )  # fmt: skip
        return record

    async def _deploy_one(
        self, server: Server, plan: _Plan, cached: Path, working: ServerState
    ) -> None:
        stage = (
            ProvisioningStage.EVS_CLONING
            if plan.boot_source is BootSource.EVS
            else ProvisioningStage.IMAGE_STREAMING
        )
        with self._spans.span("fleet.write_system_disk", {"bms.stage": stage.name}):
            record = await self._write_system_disk(server, plan, cached)
        try:
            with self._spans.span("fleet.first_boot", {"bms.stage": "FIRST_BOOT"}):
                states = await self._disks.plugin_states(server.id, record, staged=True)
                has_init = has_cloud_init(states)
                if has_init:
                    files = self._cloud_init.first_boot_files(
                        server.host_name, plan.ssh_public_key, plan.user_data, plan.user_files
                    )
                    await self._disks.append_first_boot(server.id, record, files)
        except UnreadableDisk:
            raise FailedPrecondition(
                "IMAGE_NOT_BOOTABLE",
                f"images/{plan.image.id} holds no system disk a server can boot (no readable "
                "BMSDISK1 partition table and tar partitions); deploy an image made for BMS",
            ) from None
        if has_init:
            message = (
                f"Cloud-Init set host name {server.host_name}"
                + (", SSH key" if plan.ssh_public_key else "")
                + (" and user data" if plan.user_data else "")
            )
        else:
            message = "first boot without Cloud-Init: host name, key and user data not applied"
        await self._event(server, ProvisioningStage.FIRST_BOOT, 90.0, message)
        with self._spans.span("fleet.install", {"bms.stage": "NETWORK_CONFIGURED"}):
            await self._install(server, record, states, working)

    async def _install(
        self, server: Server, record: SystemDisk, states: PluginStates, working: ServerState
    ) -> None:
        """Swaps the new system disk in and makes the server ACTIVE, its
        network up if bms-network-config is intact."""
        await self._disks.install(server, record)
        if states[PluginKind.BMS_NETWORK_CONFIG][0] == "intact":
            network, reason = NetworkState.UP, ""
            await self._event(
                server, ProvisioningStage.NETWORK_CONFIGURED, 95.0,
                "bms-network-config configured the network",
            )  # fmt: skip
        else:
            network = NetworkState.DOWN
            reason = f"bms-network-config is {states[PluginKind.BMS_NETWORK_CONFIG][0]}: no network"
        active = await self._servers.transition(
            server.id,
            {working},
            {
                "state": ServerState.ACTIVE,
                "state_reason": reason,
                "network_state": network,
                "system_disk_bytes": await self._disks.size(server.id, record),
                "plugins": intact_plugins(states),
                "task": "",
            },
            disk=record,
        )
        if active is None:
            raise NotFound("SERVER_NOT_FOUND", f"servers/{server.id} disappeared while built")
        # The record names the new disk now: what it replaced goes (a file
        # left over is harmless, and gone at the next reinstall).
        try:
            await self._disks.keep_only(server.id, record)
        except OSError:
            log.warning("servers/%s: the replaced system disk was not removed", server.id)
        await self._event(active, ProvisioningStage.ACTIVE, 100.0, "server is active")

    async def _fail(self, server: Server, error: DomainError, working: ServerState) -> None:
        if working is ServerState.BUILDING:
            await self._disks.remove(server.id)
        else:  # a failed reinstall keeps the data disks and the disk in use
            record = await self._servers.disk(server.id)
            await self._disks.keep_only(server.id, record)
        failed = await self._servers.transition(
            server.id,
            {working},
            {"state": ServerState.ERROR, "state_reason": error.message, "task": ""},
        )
        await self._event(
            failed or server, ProvisioningStage.FAILED, 100.0, error.message,
            state=ServerState.ERROR, error=error,
        )  # fmt: skip

    # -- capture (fleet.domain.captures) ------------------------------------

    async def prepare_capture(self, caller: Caller, token: str, server_id: str) -> CaptureSource:
        """Checks the server can be captured and holds it for the capture."""
        return await self.captures.prepare_capture(caller, token, server_id)

    async def start_capture(self, token: str, server_id: str, image_id: str) -> None:
        """Starts the capture of a held server into the image made for it, once."""
        await self.captures.start_capture(token, server_id, image_id)

    async def release_capture(self, token: str, server_id: str) -> None:
        """Lets go of a hold whose capture will not start."""
        await self.captures.release_capture(token, server_id)

    async def require_held(self, caller: Caller, server_id: str) -> None:
        """The server must be the caller's and held (or captured) by a capture."""
        await self.captures.require_held(caller, server_id)

    # -- power and deletion -------------------------------------------------

    async def _power(self, caller: Caller, server_id: str, target: ServerState) -> Server:
        server = await self.get(caller, server_id)
        require_server_transition(server, target)
        changed = await self._servers.transition(
            server_id, {server.state}, {"state": target}, task=""
        )
        if changed is None:
            return await self._power(caller, server_id, target)  # raced: decide again
        return changed

    async def start(self, caller: Caller, server_id: str) -> Server:
        return await self._power(caller, server_id, ServerState.ACTIVE)

    async def stop(self, caller: Caller, server_id: str) -> Server:
        return await self._power(caller, server_id, ServerState.STOPPED)

    async def delete(self, caller: Caller, server_id: str) -> None:
        await self._power(caller, server_id, ServerState.DELETED)
        await self._disks.remove(server_id)

    # -- network faults (fleet.domain.network) -------------------------------

    async def inject_network_fault(self, caller: Caller, server_id: str) -> Server:
        return await self.network.inject_fault(caller, server_id)

    # -- lifecycle ----------------------------------------------------------

    async def recover(self) -> int:
        """After a restart nothing stays BUILDING: the work that was cut off
        is marked failed with a reason (the servers can be deleted and built
        again)."""
        interrupted = await self._servers.in_states({ServerState.BUILDING, ServerState.REBUILDING})
        for server in interrupted:
            failure = DomainError(
                "INTERRUPTED", f"{server.last_operation} interrupted by a restart"
            )
            await self._fail(server, failure, server.state)
        for server in await self._servers.in_states({ServerState.STOPPED}):
            if server.task in CAPTURE_TASKS:  # the image service fails its image
                await self.captures.let_go(server.id, server.task)
        await self._disks.remove_scratch()
        for server in await self._servers.in_states({ServerState.ACTIVE}):
            if server.network_state is NetworkState.DOWN:
                self._spawn(self.network.watchdog(server.id))
        return len(interrupted)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._images.close()


def _as_domain_error(error: Exception, doing: str) -> DomainError:
    if isinstance(error, DomainError):
        return error
    log.error("%s failed", doing, exc_info=error)
    return DomainError("DEPLOYMENT_FAILED", f"{doing} failed: {type(error).__name__}")
