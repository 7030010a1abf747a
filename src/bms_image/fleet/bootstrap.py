"""The provisioner's composition root: the fleet, its servicers and its
health, either as a process of its own (`start`) or mounted on an image
service's server (`embed`). The fleet reaches images only through
ImageService, with the caller's token and, for captures, its own service
identity. It owns its tables (fleet/adapters/tables.py) and migrates only
them; its flavors come from the shared catalog file, and which public images
each offers from ImageService."""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from bms.image.v1 import capture_pb2, capture_pb2_grpc, provisioning_pb2, provisioning_pb2_grpc
from bms_image.common.auth import ServiceCredential, TokenAuthority
from bms_image.common.config import Settings
from bms_image.common.flavors import FlavorCatalog, load_flavors
from bms_image.common.model import PROVISIONER_IDENTITY
from bms_image.common.paging import PageTokens
from bms_image.common.serving import (
    Guest,
    Host,
    RunningService,
    begin_serving,
    client_channel,
    enable_reflection,
    listen,
    new_server,
    open_database,
    page_tokens,
    server_options,
    token_authority,
    writable,
)
from bms_image.common.telemetry.health import Check, HealthMonitor
from bms_image.common.telemetry.metrics import ServiceMetrics
from bms_image.common.telemetry.tracing import Tracing
from bms_image.common.tls import image_service_credentials
from bms_image.fleet.adapters.disk_layout import DiskLayout
from bms_image.fleet.adapters.firstboot import CloudInitFiles
from bms_image.fleet.adapters.image_source import ImageSource
from bms_image.fleet.adapters.public_images import PublishedImages
from bms_image.fleet.adapters.servers import SqlServerRepository
from bms_image.fleet.domain.flavors import FlavorDirectory
from bms_image.fleet.domain.fleet import Fleet
from bms_image.fleet.domain.ports import NO_SPANS
from bms_image.fleet.domain.servers import ProvisioningStage
from bms_image.fleet.grpc.capture import CaptureServicer
from bms_image.fleet.grpc.provisioning import ProvisioningServicer
from bms_image.store.db import FLEET, Database

log = logging.getLogger(__name__)

PROVISIONING_SERVICE = provisioning_pb2.DESCRIPTOR.services_by_name["ProvisioningService"].full_name
CAPTURE_SERVICE = capture_pb2.DESCRIPTOR.services_by_name["ServerCaptureService"].full_name


async def build_fleet(
    settings: Settings,
    database: Database,
    flavors: FlavorCatalog,
    tokens: PageTokens,
    channel: grpc.aio.Channel,
    metrics: ServiceMetrics,
    closing: AsyncExitStack,
    authority: TokenAuthority,
    tracing: Tracing | None = None,
) -> Fleet:
    """The fleet, reading images over `channel` (to ImageService), recovered
    from a restart; with `tracing`, a span for each step of a deployment."""
    images = ImageSource(
        channel,
        settings.data_dir / "fleet" / "image-cache",
        ServiceCredential(authority, PROVISIONER_IDENTITY),
    )
    fleet = Fleet(
        SqlServerRepository(database),
        flavors,
        images,
        tokens,
        DiskLayout(settings.data_dir / "fleet", images),
        CloudInitFiles(),
        on_finished=lambda event, seconds: metrics.deployment_finished(
            "active" if event.stage is ProvisioningStage.ACTIVE else "failed",
            event.boot_source.name.lower(),
            seconds,
        ),
        max_servers_per_project=settings.max_servers_per_project,
        max_deployments_per_project=settings.max_deployments_per_project,
        spans=tracing.spans() if tracing is not None else NO_SPANS,
    )
    closing.push_async_callback(fleet.close)
    interrupted = await fleet.recover()
    if interrupted:
        log.info("%d deployments were cut off by the restart and marked failed", interrupted)
    return fleet


def _add_provisioning(
    server: grpc.aio.Server,
    fleet: Fleet,
    flavors: FlavorCatalog,
    channel: grpc.aio.Channel,
    tokens: PageTokens,
) -> None:
    directory = FlavorDirectory(flavors, tokens, PublishedImages(channel))
    provisioning_pb2_grpc.add_ProvisioningServiceServicer_to_server(
        ProvisioningServicer(directory, fleet), server
    )


async def embed(host: Host) -> Guest:
    """The fleet inside an image service's process, on that service's port:
    it reads images over the host's private socket, and the host's catalog
    captures servers by calling it directly. Its tables share the host's
    database, migrated as a schema of their own."""
    settings = host.settings
    await host.database.migrate(FLEET)
    flavors = FlavorCatalog(load_flavors())
    channel = client_channel(settings, host.image_service, None, host.closing, host.tracing)
    fleet = await build_fleet(
        settings, host.database, flavors, host.page_tokens, channel, host.metrics,
        host.closing, host.authority, host.tracing,
    )  # fmt: skip
    _add_provisioning(host.server, fleet, flavors, channel, host.page_tokens)
    return Guest(
        captures=fleet,
        services=[PROVISIONING_SERVICE],
        checks={"fleet disks": writable(settings.data_dir / "fleet")},
        needs={PROVISIONING_SERVICE: ["database", "fleet disks"]},
    )


async def start(settings: Settings, tracing: Tracing | None = None) -> RunningService:
    """The fleet as its own process: ProvisioningService and
    ServerCaptureService on its own port, fetching images from the
    ImageService at settings.image_service with each caller's token; with
    `tracing`, its calls, its calls to ImageService and its deployments
    make spans."""
    settings = settings.resolved()
    if not settings.image_service:
        raise RuntimeError("the provisioner needs --image-service HOST:PORT")
    server_options(settings)  # refuses bad limits before opening anything
    database = open_database(settings)
    await database.migrate(FLEET)
    closing = AsyncExitStack()
    flavors = FlavorCatalog(load_flavors())
    tokens = page_tokens(settings)
    authority = token_authority(settings)
    metrics = ServiceMetrics()
    server = new_server(settings, authority, metrics, tracing)
    channel = client_channel(
        settings, settings.image_service, image_service_credentials(settings), closing, tracing
    )
    fleet = await build_fleet(
        settings, database, flavors, tokens, channel, metrics, closing, authority, tracing
    )
    _add_provisioning(server, fleet, flavors, channel, tokens)
    capture_pb2_grpc.add_ServerCaptureServiceServicer_to_server(CaptureServicer(fleet), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection(server, [PROVISIONING_SERVICE, CAPTURE_SERVICE])
    port = await listen(server, settings, database, closing)
    log.info("provisioner fetching images from %s", settings.image_service)
    checks: dict[str, Check] = {
        "database": database.ping,
        "fleet disks": writable(settings.data_dir / "fleet"),
    }
    return await begin_serving(
        settings, database, server, health_servicer, port, authority, closing, metrics,
        HealthMonitor(
            health_servicer, checks,
            {PROVISIONING_SERVICE: list(checks), CAPTURE_SERVICE: list(checks)},
            settings.health_check_seconds,
        ),
    )  # fmt: skip
