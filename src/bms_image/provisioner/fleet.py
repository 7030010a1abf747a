"""The fleet: deploys servers from images, powers them on and off, deletes
them. Long work runs in tasks of its own, so it goes on when the caller's
stream drops, and reports progress through the event bus."""

from __future__ import annotations

import asyncio
import logging
import shutil
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from .. import disks
from ..api.convert import image_from_proto
from ..domain.errors import DomainError, NotFound
from ..domain.flavors import FlavorCatalog
from ..domain.model import Caller, Image, PluginKind
from ..domain.paging import PageTokens, page_size_or_default
from ..domain.servers import (
    BootSource,
    DeployRequest,
    NetworkState,
    ProvisioningStage,
    Server,
    ServerEvent,
    ServerState,
    choose_boot_source,
    require_cloud_init_for_key,
    require_deployable,
    require_server_transition,
    ssh_key_fingerprint,
    validate_deploy_request,
)
from ..store.servers import SqlServerRepository
from .events import EventBus
from .firstboot import cloud_config_files, first_boot_files, plugin_states
from .images import ImageSource

log = logging.getLogger(__name__)

#: Servers of one batch deployed at the same time (disk copies are I/O bound).
PARALLEL_DEPLOYS = 8
_STATUS_CODE = {
    "NotFound": "NOT_FOUND",
    "PermissionDenied": "PERMISSION_DENIED",
    "InvalidArgument": "INVALID_ARGUMENT",
    "FailedPrecondition": "FAILED_PRECONDITION",
    "QuotaExceeded": "RESOURCE_EXHAUSTED",
    "Aborted": "ABORTED",
    "DataLoss": "DATA_LOSS",
    "Unauthenticated": "UNAUTHENTICATED",
}


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


class Fleet:
    def __init__(
        self,
        servers: SqlServerRepository,
        flavors: FlavorCatalog,
        images: ImageSource,
        page_tokens: PageTokens,
        root: Path,
    ) -> None:
        self._servers = servers
        self._flavors = flavors
        self._images = images
        self._tokens = page_tokens
        self._root = root
        self._disks = root / "servers"
        self._evs_pool = root / "evs-pool"
        self._disks.mkdir(parents=True, exist_ok=True)
        self._evs_pool.mkdir(parents=True, exist_ok=True)
        self.events = EventBus()
        self._tasks: set[asyncio.Task[None]] = set()

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

    def system_disk(self, server_id: str) -> Path:
        directory = self._disks / server_id
        evs = directory / "system.evs"
        return evs if evs.exists() else directory / "system.disk"

    # -- deployment ---------------------------------------------------------

    async def create_servers(
        self, caller: Caller, token: str, request: DeployRequest
    ) -> list[Server]:
        validate_deploy_request(request)
        cloud_config_files(request.user_data)  # bad YAML fails now, not at first boot
        flavor = self._flavors.get(request.flavor)
        described = await self._images.describe(request.image_id, token)
        image = image_from_proto(described)
        require_deployable(image, flavor, self._flavors.names_for_model(image.hardware_model))
        require_cloud_init_for_key(image, request.ssh_public_key)
        boot_source = choose_boot_source(image, flavor, request.boot_source)
        sha256 = await self._images.authorize(described, token)
        now = _now()
        fingerprint = ssh_key_fingerprint(request.ssh_public_key.strip())
        drafts = [
            Server(
                id=str(uuid.uuid4()),
                project=caller.project,
                host_name=f"{request.name_prefix}-{n}",
                flavor=flavor.name,
                hardware_model=flavor.hardware_model,
                image_id=image.id,
                boot_source=boot_source,
                ssh_key_fingerprint=fingerprint,
                create_time=now,
                update_time=now,
            )
            for n in range(1, request.count + 1)
        ]
        servers = await self._servers.add_all(drafts)
        for server in servers:
            await self._event(
                server, ProvisioningStage.VALIDATING, 2.0, "request and image checked"
            )
        plan = _Plan(image, sha256, boot_source, request.ssh_public_key, request.user_data, token)
        task = asyncio.create_task(self._deploy_batch(servers, plan))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return servers

    async def _event(
        self,
        server: Server,
        stage: ProvisioningStage,
        percent: float,
        message: str,
        *,
        state: ServerState = ServerState.BUILDING,
        bytes_done: int = 0,
        bytes_total: int = 0,
        error: DomainError | None = None,
    ) -> None:
        await self.events.publish(
            ServerEvent(
                server_id=server.id,
                stage=stage,
                state=state,
                message=message,
                time=_now(),
                bytes_done=bytes_done,
                bytes_total=bytes_total,
                percent=percent,
                boot_source=server.boot_source,
                error_code=_STATUS_CODE.get(type(error).__name__, "") if error else "",
                error_reason=error.reason if error else "",
            )
        )

    async def _deploy_batch(self, servers: list[Server], plan: _Plan) -> None:
        size = plan.image.size_bytes
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
            cached = await self._images.fetch(plan.image.id, plan.sha256, plan.token, progress)
        except DomainError as error:
            for server in servers:
                await self._fail(server, error)
            return
        except Exception as error:  # never leave servers BUILDING
            log.exception("fetching images/%s failed", plan.image.id)
            for server in servers:
                await self._fail(server, DomainError("DEPLOYMENT_FAILED", str(error)))
            return
        for server in servers:
            await self._event(
                server, ProvisioningStage.VERIFYING_CHECKSUM, 66.0,
                f"image bytes verified (sha256 {plan.sha256[:12]}...)",
                bytes_done=size, bytes_total=size,
            )  # fmt: skip
        limit = asyncio.Semaphore(PARALLEL_DEPLOYS)

        async def one(server: Server) -> None:
            async with limit:
                try:
                    await self._deploy_one(server, plan, cached)
                except DomainError as error:
                    await self._fail(server, error)
                except Exception as error:
                    log.exception("deploying servers/%s failed", server.id)
                    await self._fail(server, DomainError("DEPLOYMENT_FAILED", str(error)))

        await asyncio.gather(*(one(server) for server in servers))

    async def _deploy_one(self, server: Server, plan: _Plan, cached: Path) -> None:
        directory = self._disks / server.id
        await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
        size = plan.image.size_bytes
        if plan.boot_source is BootSource.EVS:
            base = self._evs_pool / cached.name
            if not base.exists():
                await asyncio.to_thread(_link_or_copy, cached, base)
            disk = directory / "system.evs"
            await asyncio.to_thread(
                disks.write_evs_volume, disk, base, directory / "system.overlay"
            )
            await self._event(
                server, ProvisioningStage.EVS_CLONING, 80.0, "EVS volume cloned (copy-on-write)",
                bytes_done=size, bytes_total=size,
            )  # fmt: skip
        else:
            disk = directory / "system.disk"
            await asyncio.to_thread(shutil.copyfile, cached, disk)
            await self._event(
                server, ProvisioningStage.IMAGE_STREAMING, 80.0, "image written to the local disk",
                bytes_done=size, bytes_total=size,
            )  # fmt: skip
        plugins = await asyncio.to_thread(plugin_states, disk)
        if (
            plugins[PluginKind.CLOUD_INIT] == "intact"
            or plugins[PluginKind.CLOUDBASE_INIT] == "intact"
        ):
            files = first_boot_files(server.host_name, plan.ssh_public_key, plan.user_data)
            await asyncio.to_thread(
                disks.append_partition, disks.writable_layer(disk), "cloud-init", "/", files
            )
            await self._event(
                server, ProvisioningStage.FIRST_BOOT, 90.0,
                f"Cloud-Init set host name {server.host_name}"
                + (", SSH key" if plan.ssh_public_key else "")
                + (" and user data" if plan.user_data else ""),
            )  # fmt: skip
        else:
            await self._event(
                server, ProvisioningStage.FIRST_BOOT, 90.0,
                "first boot without Cloud-Init: host name, key and user data not applied",
            )  # fmt: skip
        if plugins[PluginKind.BMS_NETWORK_CONFIG] == "intact":
            network, reason = NetworkState.UP, ""
            await self._event(
                server, ProvisioningStage.NETWORK_CONFIGURED, 95.0,
                "bms-network-config configured the network",
            )  # fmt: skip
        else:
            network = NetworkState.DOWN
            reason = f"bms-network-config is {plugins[PluginKind.BMS_NETWORK_CONFIG]}: no network"
        disk_bytes = await asyncio.to_thread(disks.disk_size, disk)
        active = await self._servers.transition(
            server.id,
            {ServerState.BUILDING},
            {
                "state": ServerState.ACTIVE,
                "state_reason": reason,
                "network_state": network,
                "system_disk_bytes": disk_bytes,
            },
        )
        if active is None:
            raise NotFound("SERVER_NOT_FOUND", f"servers/{server.id} disappeared while built")
        await self._event(
            active, ProvisioningStage.ACTIVE, 100.0, "server is active", state=ServerState.ACTIVE
        )

    async def _fail(self, server: Server, error: DomainError) -> None:
        await asyncio.to_thread(shutil.rmtree, self._disks / server.id, True)
        failed = await self._servers.transition(
            server.id,
            {ServerState.BUILDING},
            {"state": ServerState.ERROR, "state_reason": error.message},
        )
        await self._event(
            failed or server, ProvisioningStage.FAILED, 100.0, error.message,
            state=ServerState.ERROR, error=error,
        )  # fmt: skip

    # -- power and deletion -------------------------------------------------

    async def _power(self, caller: Caller, server_id: str, target: ServerState) -> Server:
        server = await self.get(caller, server_id)
        require_server_transition(server, target)
        changed = await self._servers.transition(server_id, {server.state}, {"state": target})
        if changed is None:
            return await self._power(caller, server_id, target)  # raced: decide again
        return changed

    async def start(self, caller: Caller, server_id: str) -> Server:
        return await self._power(caller, server_id, ServerState.ACTIVE)

    async def stop(self, caller: Caller, server_id: str) -> Server:
        return await self._power(caller, server_id, ServerState.STOPPED)

    async def delete(self, caller: Caller, server_id: str) -> None:
        await self._power(caller, server_id, ServerState.DELETED)
        await asyncio.to_thread(shutil.rmtree, self._disks / server_id, True)

    # -- lifecycle ----------------------------------------------------------

    async def recover(self) -> int:
        """After a restart nothing stays BUILDING: the work that was cut off
        is marked failed with a reason (the servers can be deleted and built
        again)."""
        interrupted = await self._servers.in_states({ServerState.BUILDING})
        for server in interrupted:
            await asyncio.to_thread(shutil.rmtree, self._disks / server.id, True)
            await self._servers.transition(
                server.id,
                {ServerState.BUILDING},
                {
                    "state": ServerState.ERROR,
                    "state_reason": "deployment interrupted by a service restart",
                },
            )
        return len(interrupted)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _link_or_copy(source: Path, target: Path) -> None:
    temp = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
    try:
        temp.hardlink_to(source)
    except OSError:
        shutil.copyfile(source, temp)
    temp.replace(target)
