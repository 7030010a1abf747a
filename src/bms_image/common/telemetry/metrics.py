"""Prometheus metrics of one service process, in a registry of its own (so
that several services in one process, as in tests, never mix their counts)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

#: Seconds: from a cached metadata read to a long image stream.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300,
)  # fmt: skip
DEPLOYMENT_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
#: How long a scrape waits for the database before answering without inventory.
INVENTORY_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class StoreFigures:
    """The chunk store at scrape time: what it holds and what its collector
    and conversion have done since the process started."""

    logical_bytes: int
    stored_bytes: int
    chunks: int
    unreferenced_chunks: int
    legacy_blobs: int  # whole blobs not converted yet (-1: not counted yet)
    gc_sweeps: int
    gc_freed_chunks: int
    gc_orphan_objects: int
    gc_abandoned_puts: int
    gc_last_sweep: float | None  # Unix time
    converted_blobs: int
    #: Requests made to the chunks' backend, by kind (S3: PUT, GET, ...).
    requests: dict[str, int] = field(default_factory=dict)

    @property
    def dedup_ratio(self) -> float:
        return self.logical_bytes / self.stored_bytes if self.stored_bytes else 1.0


@dataclass(frozen=True)
class Inventory:
    """What is stored, counted by the database at scrape time."""

    #: (status, visibility) -> number of images
    images: dict[tuple[str, str], int]
    #: project -> private images counted against its quota
    quota_used: dict[str, int]
    quota_limit: int
    store: StoreFigures | None = None


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.rpcs = Counter(
            "bms_image_rpcs",
            "RPCs handled, by service, method and status code",
            ["service", "method", "code"],
            registry=self.registry,
        )
        self.rpc_seconds = Histogram(
            "bms_image_rpc_duration_seconds",
            "RPC latency, from the call's arrival to its status (streams: their whole life)",
            ["service", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.stream_bytes = Counter(
            "bms_image_stream_bytes",
            "Bytes of messages streamed, by method and direction (received, sent)",
            ["service", "method", "direction"],
            registry=self.registry,
        )
        self.deployments = Counter(
            "bms_image_deployments",
            "Deployments and reinstalls finished, by outcome (active, failed) and boot source",
            ["outcome", "boot_source"],
            registry=self.registry,
        )
        self.deployment_seconds = Histogram(
            "bms_image_deployment_duration_seconds",
            "Time from a server's first progress event to ACTIVE or FAILED",
            ["outcome", "boot_source"],
            buckets=DEPLOYMENT_BUCKETS,
            registry=self.registry,
        )
        #: Labelled children by (method, code or direction; "" for latency):
        #: looking them up in prometheus_client on every call costs more.
        self._children: dict[tuple[str, str], Any] = {}

    def rpc_finished(self, method: str, code: str, seconds: float) -> None:
        counter = self._children.get((method, code))
        if counter is None:
            service, name = split_method(method)
            counter = self._children[method, code] = self.rpcs.labels(service, name, code)
        histogram = self._children.get((method, ""))
        if histogram is None:
            service, name = split_method(method)
            histogram = self._children[method, ""] = self.rpc_seconds.labels(service, name)
        counter.inc()
        histogram.observe(seconds)

    def streamed(self, method: str, direction: str, size: int) -> None:
        child = self._children.get((method, direction))
        if child is None:
            service, name = split_method(method)
            child = self._children[method, direction] = self.stream_bytes.labels(
                service, name, direction
            )
        child.inc(size)

    def deployment_finished(self, outcome: str, boot_source: str, seconds: float) -> None:
        self.deployments.labels(outcome, boot_source).inc()
        self.deployment_seconds.labels(outcome, boot_source).observe(seconds)

    def watch_inventory(
        self, loop: asyncio.AbstractEventLoop, count: Callable[[], Awaitable[Inventory]]
    ) -> None:
        """Images by status and quota usage, counted by the database on the
        service's event loop whenever Prometheus scrapes."""
        self.registry.register(_InventoryCollector(loop, count))

    def serve(self, listen: str, allow_remote: bool = False) -> Callable[[], None]:
        """Starts the HTTP endpoint (/metrics); returns its stop function.
        ValueError for an address that is not loopback, unless allow_remote."""
        host, port = metrics_address(listen, allow_remote)
        server, thread = start_http_server(port, host, registry=self.registry)
        self.port = int(server.server_port)

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)

        return stop


#: The names that are loopback without a lookup (DNS could say otherwise).
_LOOPBACK_NAMES = ("localhost",)


def metrics_address(listen: str, allow_remote: bool = False) -> tuple[str, int]:
    """(host, port) to bind for BMS_IMAGE_METRICS_LISTEN ("host:port"). The
    endpoint has no authentication and its labels name projects, so it binds
    a loopback address (127.0.0.0/8, ::1, localhost) unless allow_remote
    (BMS_IMAGE_METRICS_ALLOW_REMOTE): a bare port ("9100", ":9100", every
    address), another address or another host name is refused."""
    host, separator, port_text = listen.rpartition(":")
    if not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"{listen!r} is not host:port (e.g. 127.0.0.1:9100)")
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not separator or not host:
        host = "0.0.0.0" if allow_remote else ""
        if not host:
            raise ValueError(
                f"{listen!r} names no host, which would serve metrics on every address; "
                "use 127.0.0.1:PORT, or set BMS_IMAGE_METRICS_ALLOW_REMOTE=true to expose "
                "them beyond this machine"
            )
    elif not allow_remote and not _is_loopback(host):
        raise ValueError(
            f"{host} is not a loopback address, and metrics have no authentication; use "
            "127.0.0.1:PORT (scrape through a proxy or an SSH tunnel), or set "
            "BMS_IMAGE_METRICS_ALLOW_REMOTE=true to expose them beyond this machine"
        )
    return host, int(port_text)


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # another host name: its address is not ours to trust
        return False


def split_method(method: str) -> tuple[str, str]:
    """'/bms.image.v1.ImageService/GetImage' -> ('bms.image.v1.ImageService', 'GetImage')."""
    service, _, name = method.lstrip("/").partition("/")
    return service, name


class _InventoryCollector(Collector):
    def __init__(
        self, loop: asyncio.AbstractEventLoop, count: Callable[[], Awaitable[Inventory]]
    ) -> None:
        self._loop = loop
        self._count = count

    def describe(self) -> Iterable[Metric]:
        return []  # computed at scrape time; nothing to check at registration

    def collect(self) -> Iterable[Metric]:
        future = asyncio.run_coroutine_threadsafe(_call(self._count), self._loop)
        try:
            inventory = future.result(INVENTORY_TIMEOUT_SECONDS)
        except Exception as error:  # a scrape must still answer: RPC metrics go on
            future.cancel()
            log.warning("metrics: cannot count the inventory: %s", error)
            return []
        images = GaugeMetricFamily(
            "bms_image_images",
            "Images stored, by status and visibility",
            labels=["status", "visibility"],
        )
        for (status, visibility), number in sorted(inventory.images.items()):
            images.add_metric([status, visibility], number)
        used = GaugeMetricFamily(
            "bms_image_quota_used_images",
            "Private images counted against each project's quota",
            labels=["project"],
        )
        for project, number in sorted(inventory.quota_used.items()):
            used.add_metric([project], number)
        limit = GaugeMetricFamily(
            "bms_image_quota_limit_images",
            "Private images a project may have",
            inventory.quota_limit,
        )
        return [images, used, limit, *_store_metrics(inventory.store)]


def _store_metrics(store: StoreFigures | None) -> list[Metric]:
    if store is None:
        return []
    gauges = [
        ("bms_image_store_logical_bytes", "Bytes of the images stored (their sizes)",
         store.logical_bytes),
        ("bms_image_store_stored_bytes", "Bytes the chunk store holds: chunks, plus an "
         "estimate of the records that index them", store.stored_bytes),
        ("bms_image_store_dedup_ratio", "Logical bytes / stored bytes", store.dedup_ratio),
        ("bms_image_store_chunks", "Chunks stored", store.chunks),
        ("bms_image_store_unreferenced_chunks", "Chunks no manifest references (the "
         "collector frees them)", store.unreferenced_chunks),
        ("bms_image_store_legacy_blobs", "Whole blobs of an earlier version not yet "
         "converted into manifests (-1: not counted yet)", store.legacy_blobs),
    ]  # fmt: skip
    families: list[Metric] = [GaugeMetricFamily(n, h, value) for n, h, value in gauges]
    counters = [
        ("bms_image_gc_sweeps", "Sweeps of the chunk store's collector", store.gc_sweeps),
        ("bms_image_gc_freed_chunks", "Chunks the collector freed", store.gc_freed_chunks),
        ("bms_image_gc_orphan_objects", "Objects without a chunk record the collector "
         "deleted", store.gc_orphan_objects),
        ("bms_image_gc_abandoned_puts", "Puts of dead processes the collector dropped",
         store.gc_abandoned_puts),
        ("bms_image_store_converted_blobs", "Whole blobs converted into manifests",
         store.converted_blobs),
    ]  # fmt: skip
    families += [CounterMetricFamily(n, h, value) for n, h, value in counters]
    if store.gc_last_sweep is not None:
        families.append(
            GaugeMetricFamily(
                "bms_image_gc_last_sweep_timestamp_seconds",
                "When the collector's last sweep ended",
                store.gc_last_sweep,
            )
        )
    requests = CounterMetricFamily(
        "bms_image_store_requests",
        "Requests to the chunks' backend, by kind",
        labels=["kind"],
    )
    for kind, number in sorted(store.requests.items()):
        requests.add_metric([kind], number)
    families.append(requests)
    return families


async def _call(count: Callable[[], Awaitable[Inventory]]) -> Inventory:
    return await count()
