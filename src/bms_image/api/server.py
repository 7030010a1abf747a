"""Assembles the service: database, domain, servicers, health, reflection."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from bms.image.v1 import (
    capture_pb2,
    capture_pb2_grpc,
    image_pb2,
    image_pb2_grpc,
    provisioning_pb2,
    provisioning_pb2_grpc,
    sharing_pb2,
    sharing_pb2_grpc,
)

from ..auth import ServiceCredential, TokenAuthority
from ..blobs.local import LocalBlobStore
from ..blobs.s3 import S3BlobStore
from ..blobs.staging import Staging, release_image_bytes
from ..blobs.store import BlobStore, PrefixOwned
from ..catalog.seed import seed, seed_flavors
from ..config import Settings
from ..domain.flavors import FlavorCatalog, FlavorDirectory
from ..domain.imagedata import ImageData
from ..domain.images import ImageCatalog
from ..domain.model import IMAGE_SERVICE_IDENTITY, PROVISIONER_IDENTITY
from ..domain.paging import PageTokens
from ..domain.servers import ProvisioningStage
from ..domain.sharing import Sharing
from ..formats import ContentInspector
from ..provisioner.capture_client import RemoteCaptures
from ..provisioner.fleet import Fleet
from ..provisioner.images import ImageSource
from ..store.db import Database
from ..store.deployment import deployment_id
from ..store.repository import SqlFlavorRepository, SqlImageRepository, SqlMemberRepository
from ..store.servers import SqlServerRepository
from ..telemetry.health import Check, HealthMonitor, free_space
from ..telemetry.logs import configure_logging
from ..telemetry.metrics import Inventory, ServiceMetrics
from .capture import CaptureServicer
from .guard import CallGuard
from .images import ImageServicer
from .provisioning import ProvisioningServicer
from .sharing import SharingServicer
from .tls import image_service_credentials, provisioner_credentials, server_credentials

log = logging.getLogger(__name__)

#: Allocations between young-generation collections (CPython's default: 700).
GC_YOUNG_THRESHOLD = 20_000

IMAGE_SERVICE = image_pb2.DESCRIPTOR.services_by_name["ImageService"].full_name
SHARING_SERVICE = sharing_pb2.DESCRIPTOR.services_by_name["SharingService"].full_name
PROVISIONING_SERVICE = provisioning_pb2.DESCRIPTOR.services_by_name["ProvisioningService"].full_name
CAPTURE_SERVICE = capture_pb2.DESCRIPTOR.services_by_name["ServerCaptureService"].full_name


#: Bytes of request headers (the token among them) a call may send; a call
#: over it is refused with RESOURCE_EXHAUSTED. gRPC's soft limit by default,
#: made the hard limit too: between its soft (8 KiB) and hard (16 KiB)
#: defaults gRPC refuses calls at random.
MAX_METADATA_BYTES = 8 * 1024
#: Pings a client may send too early (under 10 s apart without data) before
#: the server closes its connection (GOAWAY too_many_pings).
MAX_PING_STRIKES = 2


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """Deliberate transport limits: bounded messages and headers, streams per
    connection (grpc.max_concurrent_streams: HTTP/2 makes a client's further
    calls on that connection wait, they are not refused), keepalive that
    detects dead peers of long streams, ping-flood protection, and no silent
    port sharing between servers. RuntimeError for a limit below 1. The RPCs
    of the whole process are bounded by the server's maximum_concurrent_rpcs
    (settings.max_concurrent_rpcs), which refuses the call beyond it."""
    for name in ("max_streams_per_connection", "max_concurrent_rpcs", "max_message_bytes"):
        if getattr(settings, name) < 1:
            raise RuntimeError(
                f"BMS_IMAGE_{name.upper()} must be at least 1, not {getattr(settings, name)}"
            )
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_concurrent_streams", settings.max_streams_per_connection),
        ("grpc.max_metadata_size", MAX_METADATA_BYTES),
        ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", MAX_PING_STRIKES),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.so_reuseport", 0),
    ]


@dataclass
class RunningService:
    settings: Settings
    database: Database
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    authority: TokenAuthority
    closing: AsyncExitStack
    metrics: ServiceMetrics
    monitor: HealthMonitor

    @property
    def address(self) -> str:
        host = self.settings.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def stop(self, grace: float | None = None) -> None:
        """Health goes NOT_SERVING first so balancers drain us, then in-flight
        calls get `grace` seconds to finish; new calls are refused meanwhile."""
        await self.monitor.stop()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.settings.shutdown_grace_seconds if grace is None else grace)
        await self.closing.aclose()  # the fleet and the rest may still write as they stop
        await self.database.close()


async def open_blob_store(
    settings: Settings, closing: AsyncExitStack, database: Database
) -> BlobStore:
    """The configured backend: local files (default) or an S3-compatible
    store, claimed for this deployment (see BlobStore.claim): a prefix or
    directory another deployment owns is refused, since each sweeps what it
    takes for orphans. On S3, multipart uploads a crash left are aborted."""
    deployment = await deployment_id(database)
    if settings.blob_backend == "local":
        local = LocalBlobStore(settings.data_dir / "blobs")
        try:
            await local.claim(deployment)
        except PrefixOwned as owned:
            raise RuntimeError(
                f"the blob directory {local.root} belongs to another deployment "
                f"({owned.owner}, not {deployment}): give this one a BMS_IMAGE_DATA_DIR "
                "of its own, or point BMS_IMAGE_DATABASE_URL at that deployment's database"
            ) from None
        return local
    if settings.blob_backend != "s3":
        raise RuntimeError(f"unknown blob backend {settings.blob_backend!r}: use local or s3")
    store = S3BlobStore(
        settings.s3_bucket,
        endpoint_url=settings.s3_endpoint_url or None,
        region=settings.s3_region,
        access_key=settings.s3_access_key or None,
        secret_key=settings.s3_secret_key or None,
        prefix=settings.s3_prefix,
    )
    await closing.enter_async_context(store)
    try:
        await store.ensure_bucket()
        await store.claim(deployment)
    except PrefixOwned as owned:
        await store.close()
        raise RuntimeError(
            f"the S3 prefix s3://{store.bucket}/{store.prefix} belongs to another deployment "
            f"({owned.owner}, not {deployment}): give this one a prefix of its own with "
            "BMS_IMAGE_S3_PREFIX (or BMS_IMAGE_S3_BUCKET), or point BMS_IMAGE_DATABASE_URL "
            "at that deployment's database"
        ) from None
    except BaseException:
        await store.close()
        raise
    aborted = await store.abort_incomplete_uploads(settings.s3_abort_incomplete_after_seconds)
    if aborted:
        log.info("aborted %d incomplete multipart uploads a crash left", aborted)
    return store


async def start_fleet(
    settings: Settings,
    database: Database,
    flavors: FlavorCatalog,
    page_tokens: PageTokens,
    image_service: str,
    credentials: grpc.ChannelCredentials | None,
    metrics: ServiceMetrics,
    closing: AsyncExitStack,
    authority: TokenAuthority,
) -> Fleet:
    """The provisioner. It reaches images only through ImageService: over a
    private socket of this very server when embedded, or to another process;
    either way with the caller's token and, for captures, its own service
    identity."""
    channel = _client_channel(settings, image_service, credentials, closing)
    fleet = Fleet(
        SqlServerRepository(database),
        flavors,
        ImageSource(
            channel,
            settings.data_dir / "fleet" / "image-cache",
            ServiceCredential(authority, PROVISIONER_IDENTITY),
        ),
        page_tokens,
        settings.data_dir / "fleet",
        on_finished=lambda event, seconds: metrics.deployment_finished(
            "active" if event.stage is ProvisioningStage.ACTIVE else "failed",
            event.boot_source.name.lower(),
            seconds,
        ),
        max_servers_per_project=settings.max_servers_per_project,
        max_deployments_per_project=settings.max_deployments_per_project,
    )
    closing.push_async_callback(fleet.close)
    interrupted = await fleet.recover()
    if interrupted:
        log.info("%d deployments were cut off by the restart and marked failed", interrupted)
    return fleet


async def start(settings: Settings) -> RunningService:
    settings = settings.resolved()
    options = server_options(settings)  # refuses bad limits before opening anything
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    database = Database(settings.database_url, sqlite_synchronous=settings.sqlite_synchronous)
    await database.migrate()
    closing = AsyncExitStack()
    blobs = await open_blob_store(settings, closing, database)
    staging = Staging(settings.data_dir / "staging")
    added = await seed(database, blobs, staging, settings.catalog_image_mib * 1024 * 1024)
    if added:
        log.info("seeded %d catalog entries", added)
    flavor_repository = SqlFlavorRepository(database)
    image_repository = SqlImageRepository(database, settings.metadata_cache_seconds)
    member_repository = SqlMemberRepository(database)
    flavors = FlavorCatalog(await flavor_repository.list_flavors())
    page_tokens = _page_tokens(settings)

    async def release(image_id: str) -> None:
        await release_image_bytes(blobs, staging, image_id)

    catalog = ImageCatalog(
        image_repository,
        flavors,
        page_tokens,
        settings.private_image_quota,
        release_data=release,
        members=member_repository,
    )
    data = ImageData(
        catalog,
        image_repository,
        staging,
        blobs,
        ContentInspector(
            max_virtual_bytes=settings.max_virtual_bytes,
            timeout_seconds=settings.convert_timeout_seconds,
        ),
        max_image_bytes=settings.max_image_bytes,
        chunk_bytes=settings.chunk_bytes,
        max_uploads_per_project=settings.max_uploads_per_project,
        max_downloads_per_project=settings.max_downloads_per_project,
    )
    recovered = await data.recover()
    if any(recovered.values()):
        log.info("recovered after restart: %s", recovered)
    authority = _authority(settings)
    metrics = ServiceMetrics()

    async def inventory() -> Inventory:
        images, quota_used = await image_repository.inventory()
        return Inventory(images, quota_used, settings.private_image_quota)

    metrics.watch_inventory(asyncio.get_running_loop(), inventory)
    server = grpc.aio.server(
        interceptors=[CallGuard(authority, metrics)],
        options=options,
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )
    image_pb2_grpc.add_ImageServiceServicer_to_server(ImageServicer(catalog, data), server)
    sharing = Sharing(
        catalog, image_repository, member_repository, blobs, page_tokens, settings.max_image_members
    )
    sharing_pb2_grpc.add_SharingServiceServicer_to_server(SharingServicer(sharing, catalog), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = await _listen(server, settings, database, closing)
    services = [IMAGE_SERVICE, SHARING_SERVICE]
    if settings.provisioner == "embedded":
        loopback = _private_socket(server, closing)
        fleet = await start_fleet(
            settings, database, flavors, page_tokens, loopback, None, metrics, closing, authority
        )
        catalog.attach_captures(fleet)
        provisioning_pb2_grpc.add_ProvisioningServiceServicer_to_server(
            ProvisioningServicer(FlavorDirectory(flavor_repository, page_tokens), fleet), server
        )
        services.append(PROVISIONING_SERVICE)
    elif settings.provisioner != "none":
        raise RuntimeError(f"provisioner must be embedded or none, not {settings.provisioner!r}")
    elif settings.provisioner_address:
        credentials = provisioner_credentials(settings)
        channel = _client_channel(settings, settings.provisioner_address, credentials, closing)
        identity = ServiceCredential(authority, IMAGE_SERVICE_IDENTITY)
        catalog.attach_captures(RemoteCaptures(channel, identity))
    enable_reflection(server, services)
    checks: dict[str, Check] = {
        "database": database.ping,
        "blob store": blobs.ping,
        "data disk": free_space(settings.data_dir, settings.min_free_bytes),
    }
    needs = {
        IMAGE_SERVICE: ["database", "blob store", "data disk"],
        SHARING_SERVICE: ["database", "blob store"],
    }
    if PROVISIONING_SERVICE in services:
        checks["fleet disks"] = _writable(settings.data_dir / "fleet")
        needs[PROVISIONING_SERVICE] = ["database", "fleet disks"]
    return await _serving(
        settings, database, server, health_servicer, port, authority, closing, metrics,
        HealthMonitor(health_servicer, checks, needs, settings.health_check_seconds),
    )  # fmt: skip


async def _serving(
    settings: Settings,
    database: Database,
    server: grpc.aio.Server,
    health_servicer: health.aio.HealthServicer,
    port: int,
    authority: TokenAuthority,
    closing: AsyncExitStack,
    metrics: ServiceMetrics,
    monitor: HealthMonitor,
) -> RunningService:
    """Starts serving: metrics endpoint, the port, then health from the first check."""
    if settings.metrics_listen:
        try:
            closing.callback(metrics.serve(settings.metrics_listen, settings.metrics_allow_remote))
        except (OSError, ValueError) as error:
            await closing.aclose()
            await database.close()
            raise RuntimeError(
                f"cannot serve metrics on {settings.metrics_listen}: {error}"
            ) from None
    await server.start()
    await monitor.check_once()
    monitor.start()
    log.info("serving on %s (database %s)", settings.listen, database.description)
    return RunningService(
        settings, database, server, health_servicer, port, authority, closing, metrics, monitor
    )


def _writable(directory: Path) -> Check:
    async def check() -> None:
        if not await asyncio.to_thread(os.access, directory, os.W_OK):
            raise OSError(f"{directory} is not writable")

    return check


async def _listen(
    server: grpc.aio.Server, settings: Settings, database: Database, closing: AsyncExitStack
) -> int:
    """Binds the port (TLS when configured); on failure releases what was
    opened and says why."""
    try:
        credentials = server_credentials(settings)
        if credentials is None:
            return int(server.add_insecure_port(settings.listen))
        return int(server.add_secure_port(settings.listen, credentials))
    except RuntimeError as error:
        await closing.aclose()
        await database.close()
        raise RuntimeError(f"cannot listen on {settings.listen}: {error}") from None


def _client_channel(
    settings: Settings,
    target: str,
    credentials: grpc.ChannelCredentials | None,
    closing: AsyncExitStack,
) -> grpc.aio.Channel:
    """A channel to our other service (closed with this one), plaintext
    or TLS, with the same message limits as our own port."""
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
    ]
    channel = (
        grpc.aio.insecure_channel(target, options=options)
        if credentials is None
        else grpc.aio.secure_channel(target, credentials, options=options)
    )
    closing.push_async_callback(channel.close)
    return channel


def _private_socket(server: grpc.aio.Server, closing: AsyncExitStack) -> str:
    """A Unix socket only this user can reach (a fresh 0700 directory), for
    the embedded provisioner: it needs no certificate when the public port
    requires one, and skips TCP. Callers on it still need a valid token."""
    directory = tempfile.mkdtemp(prefix="bms-image-")
    closing.callback(shutil.rmtree, directory, ignore_errors=True)
    target = f"unix:{directory}/image-service.sock"
    server.add_insecure_port(target)
    return target


def _authority(settings: Settings) -> TokenAuthority:
    return TokenAuthority(settings.secret(), settings.previous_token_secrets())


def enable_reflection(server: grpc.aio.Server, services: list[str]) -> None:
    """Reflection lists exactly the services this process serves."""
    reflection.enable_server_reflection(
        (
            *services,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )


def _page_tokens(settings: Settings) -> PageTokens:
    return PageTokens(hashlib.sha256(b"page-token\0" + settings.secret().encode()).digest())


async def start_provisioner(settings: Settings) -> RunningService:
    """The fleet as its own process: ProvisioningService on its own port,
    fetching images from the ImageService at settings.image_service with each
    caller's token. It shares the database (servers, flavors) and the token
    secret with the image service."""
    settings = settings.resolved()
    if not settings.image_service:
        raise RuntimeError("the provisioner needs --image-service HOST:PORT")
    options = server_options(settings)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    database = Database(settings.database_url, sqlite_synchronous=settings.sqlite_synchronous)
    await database.migrate()
    await seed_flavors(database)
    closing = AsyncExitStack()
    flavor_repository = SqlFlavorRepository(database)
    flavors = FlavorCatalog(await flavor_repository.list_flavors())
    page_tokens = _page_tokens(settings)
    authority = _authority(settings)
    metrics = ServiceMetrics()
    server = grpc.aio.server(
        interceptors=[CallGuard(authority, metrics)],
        options=options,
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )
    fleet = await start_fleet(
        settings,
        database,
        flavors,
        page_tokens,
        settings.image_service,
        image_service_credentials(settings),
        metrics,
        closing,
        authority,
    )
    provisioning_pb2_grpc.add_ProvisioningServiceServicer_to_server(
        ProvisioningServicer(FlavorDirectory(flavor_repository, page_tokens), fleet), server
    )
    capture_pb2_grpc.add_ServerCaptureServiceServicer_to_server(CaptureServicer(fleet), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection(server, [PROVISIONING_SERVICE, CAPTURE_SERVICE])
    port = await _listen(server, settings, database, closing)
    log.info("provisioner fetching images from %s", settings.image_service)
    checks: dict[str, Check] = {
        "database": database.ping,
        "fleet disks": _writable(settings.data_dir / "fleet"),
    }
    return await _serving(
        settings, database, server, health_servicer, port, authority, closing, metrics,
        HealthMonitor(
            health_servicer, checks,
            {PROVISIONING_SERVICE: list(checks), CAPTURE_SERVICE: list(checks)},
            settings.health_check_seconds,
        ),
    )  # fmt: skip


async def serve(
    settings: Settings, starter: Callable[[Settings], Awaitable[RunningService]] = start
) -> None:
    """Runs until SIGTERM or SIGINT, then shuts down gracefully."""
    configure_logging(settings.log_level, settings.log_format)
    service = await starter(settings)
    # What start-up allocated (modules, ORM mappings, the catalog) lives as
    # long as the process: keep the collector from walking it on every full
    # collection, which showed as 100 ms spikes in list latencies; and
    # collect the young generation less often (a page of images alone
    # allocates thousands of short-lived objects).
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 20)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"bms-image listening on {service.address}", flush=True)
    await stop.wait()
    log.info("shutting down: draining for up to %.0fs", service.settings.shutdown_grace_seconds)
    await service.stop()
