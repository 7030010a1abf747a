"""What every process's composition root needs to serve: transport limits,
the listening port, channels to the other service, health, reflection, and
running until a signal. No wiring of a process's own pieces happens here."""

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
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection

from bms_image.common.auth import TokenAuthority
from bms_image.common.config import Settings
from bms_image.common.guard import CallGuard
from bms_image.common.paging import PageTokens
from bms_image.common.telemetry.health import Check, HealthMonitor
from bms_image.common.telemetry.logs import configure_logging
from bms_image.common.telemetry.metrics import ServiceMetrics
from bms_image.common.telemetry.tracing import Tracing, start_tracing
from bms_image.common.tls import server_credentials
from bms_image.store.db import Database

log = logging.getLogger(__name__)

#: Allocations between young-generation collections (CPython's default: 700).
GC_YOUNG_THRESHOLD = 20_000


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
    of the whole process are bounded by the call guard's CallLimit
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


@dataclass(frozen=True)
class Host:
    """What an image service lends the provisioner it embeds: its settings,
    database, gRPC server and a private address of its own
    ImageService (see private_socket)."""

    settings: Settings
    database: Database
    server: grpc.aio.Server
    image_service: str
    metrics: ServiceMetrics
    authority: TokenAuthority
    page_tokens: PageTokens
    closing: AsyncExitStack
    #: The host's tracing (None: off), for the guest's channel and spans.
    tracing: Tracing | None = None


@dataclass(frozen=True)
class Guest:
    """What an embedded provisioner gives its host: the captures it serves
    (the image service's CaptureProvider port; typed there, since common
    knows no process's ports), the services it added to the host's server,
    and the health checks they need."""

    captures: Any
    services: list[str]
    checks: dict[str, Check]
    needs: dict[str, list[str]]


#: Mounts a provisioner on an image service (fleet.bootstrap.embed).
Embed = Callable[[Host], Awaitable[Guest]]


def open_database(settings: Settings) -> Database:
    """The process's database, on the settings' URL (created and migrated by the caller)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return Database(settings.database_url, sqlite_synchronous=settings.sqlite_synchronous)


def new_server(
    settings: Settings,
    authority: TokenAuthority,
    metrics: ServiceMetrics,
    tracing: Tracing | None = None,
) -> grpc.aio.Server:
    """A gRPC server with the call guard and the transport limits (checked
    before anything is opened by server_options); with tracing, its server
    interceptor goes first, outside the guard, so that a call's log lines
    and refusals belong to its span."""
    tracing_interceptors = tracing.server_interceptors() if tracing is not None else []
    return grpc.aio.server(
        interceptors=[
            *tracing_interceptors,
            CallGuard(authority, metrics, settings.max_concurrent_rpcs),
        ],
        options=server_options(settings),
    )


async def begin_serving(
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


def writable(directory: Path) -> Check:
    """A health check that fails while `directory` is not writable."""

    async def check() -> None:
        if not await asyncio.to_thread(os.access, directory, os.W_OK):
            raise OSError(f"{directory} is not writable")

    return check


async def listen(
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


def client_channel(
    settings: Settings,
    target: str,
    credentials: grpc.ChannelCredentials | None,
    closing: AsyncExitStack,
    tracing: Tracing | None = None,
) -> grpc.aio.Channel:
    """A channel to our other service (closed with this one), plaintext
    or TLS, with the same message limits as our own port; with tracing, its
    calls are client spans that send the trace on (traceparent)."""
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
    ]
    interceptors = tracing.client_interceptors() if tracing is not None else None
    channel = (
        grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
        if credentials is None
        else grpc.aio.secure_channel(
            target, credentials, options=options, interceptors=interceptors
        )
    )
    closing.push_async_callback(channel.close)
    return channel


def private_socket(server: grpc.aio.Server, closing: AsyncExitStack) -> str:
    """A Unix socket only this user can reach (a fresh 0700 directory), for
    the embedded provisioner: it needs no certificate when the public port
    requires one, and skips TCP. Callers on it still need a valid token."""
    directory = tempfile.mkdtemp(prefix="bms-image-")
    closing.callback(shutil.rmtree, directory, ignore_errors=True)
    target = f"unix:{directory}/image-service.sock"
    server.add_insecure_port(target)
    return target


def token_authority(settings: Settings) -> TokenAuthority:
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


def page_tokens(settings: Settings) -> PageTokens:
    return PageTokens(hashlib.sha256(b"page-token\0" + settings.secret().encode()).digest())


#: A process's composition root: starts it with its settings and tracing.
Starter = Callable[[Settings, Tracing | None], Awaitable[RunningService]]


async def serve(settings: Settings, starter: Starter, service_name: str) -> None:
    """Starts a process with its composition root (`starter`) and runs it
    until SIGTERM or SIGINT, then shuts down gracefully. Tracing is on when
    the OTEL_* environment asks for it (tracing.start_tracing), as
    `service_name` unless OTEL_SERVICE_NAME says otherwise; its last spans
    are exported after the service has stopped."""
    tracing = start_tracing(service_name)
    configure_logging(settings.log_level, settings.log_format)
    if tracing is not None:
        log.info(
            "tracing on: service %s, exporting with %s",
            tracing.service_name, ", ".join(tracing.exporters),
        )  # fmt: skip
    try:
        service = await starter(settings, tracing)
    except BaseException:
        if tracing is not None:
            tracing.shutdown()
        raise
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
    if tracing is not None:
        await asyncio.to_thread(tracing.shutdown)
