"""The Prometheus endpoint: RPCs by service, method and code, latency,
bytes streamed, images by status, quota usage and deployments, read over
HTTP as Prometheus reads them."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bms.image.v1 import image_pb2, image_pb2_grpc, provisioning_pb2
from bms_image.common.serving import RunningService
from bms_image.common.telemetry.metrics import Inventory, ServiceMetrics
from bms_image.images.adapters.catalog import public_image_id
from bms_image.processes import start
from support.builders import private_image
from support.server_requests import create_servers
from support.services import ProvisioningStub, make_settings
from support.tokens import bearer

CENTOS = f"images/{public_image_id('centos-7.6-x86_64')}"
IMAGE_SERVICE = "bms.image.v1.ImageService"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[RunningService]:
    running = await start(make_settings(tmp_path, metrics_listen="127.0.0.1:0"))
    yield running
    await running.stop(0)


async def scrape(service: RunningService) -> Samples:
    """Every sample of /metrics, keyed by name and labels. The scrape runs in
    a thread, as Prometheus' would from outside, while the loop serves."""
    url = f"http://127.0.0.1:{service.metrics.port}/metrics"

    def fetch() -> str:
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())

    text = await asyncio.to_thread(fetch)
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def metadata(service: RunningService, project: str = "alpha") -> tuple[tuple[str, str]]:
    return bearer(service.authority.issue(project))


async def test_rpcs_are_counted_by_method_and_status_code(service: RunningService) -> None:
    async with grpc.aio.insecure_channel(service.address) as channel:
        images = image_pb2_grpc.ImageServiceStub(channel)
        await images.ListImages(image_pb2.ListImagesRequest(), metadata=metadata(service))
        await images.GetImage(image_pb2.GetImageRequest(name=CENTOS), metadata=metadata(service))
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError):
                await images.GetImage(
                    image_pb2.GetImageRequest(name="images/00000000-0000-0000-0000-000000000000"),
                    metadata=metadata(service),
                )
        with pytest.raises(grpc.aio.AioRpcError):
            await images.ListImages(image_pb2.ListImagesRequest())
    rpcs = "bms_image_rpcs_total"
    # The guard counts a call as it ends, which may come a moment after the
    # client has its answer: wait (bounded) until the last call is counted.
    unauthenticated = {"service": IMAGE_SERVICE, "method": "ListImages", "code": "UNAUTHENTICATED"}
    for _ in range(50):
        samples = await scrape(service)
        if value(samples, rpcs, **unauthenticated):
            break
        await asyncio.sleep(0.1)
    assert value(samples, rpcs, service=IMAGE_SERVICE, method="GetImage", code="OK") == 1
    assert value(samples, rpcs, service=IMAGE_SERVICE, method="GetImage", code="NOT_FOUND") == 2
    assert value(samples, rpcs, service=IMAGE_SERVICE, method="ListImages", code="OK") == 1
    assert (
        value(samples, rpcs, service=IMAGE_SERVICE, method="ListImages", code="UNAUTHENTICATED")
        == 1
    )
    latency = "bms_image_rpc_duration_seconds_count"
    assert value(samples, latency, service=IMAGE_SERVICE, method="GetImage") == 3


async def test_bytes_streamed_and_inventory_are_reported(service: RunningService) -> None:
    async with grpc.aio.insecure_channel(service.address) as channel:
        images = image_pb2_grpc.ImageServiceStub(channel)
        image = await images.GetImage(
            image_pb2.GetImageRequest(name=CENTOS), metadata=metadata(service)
        )
        stream = images.DownloadImageData(
            image_pb2.DownloadImageDataRequest(name=CENTOS), metadata=metadata(service)
        )
        received = sum([len(message.chunk) async for message in stream])
        await images.CreateImage(
            image_pb2.CreateImageRequest(image=private_image("counted")),
            metadata=metadata(service, "beta"),
        )
    assert received == image.size_bytes
    samples = await scrape(service)
    sent = value(
        samples,
        "bms_image_stream_bytes_total",
        service=IMAGE_SERVICE,
        method="DownloadImageData",
        direction="sent",
    )
    assert image.size_bytes <= sent < image.size_bytes * 1.01, "chunks plus small framing"
    assert value(samples, "bms_image_images", status="active", visibility="public") == 7
    assert value(samples, "bms_image_images", status="queued", visibility="private") == 1
    assert value(samples, "bms_image_quota_used_images", project="beta") == 1
    assert value(samples, "bms_image_quota_limit_images") == 50


async def test_deployments_are_counted_by_outcome_with_their_duration(
    service: RunningService,
) -> None:
    async with grpc.aio.insecure_channel(service.address) as channel:
        stream = ProvisioningStub(channel).CreateServers(
            create_servers("metered", 2, boot_source=provisioning_pb2.BOOT_SOURCE_LOCAL_DISK),
            metadata=metadata(service),
        )
        finals = [e async for e in stream if e.stage == provisioning_pb2.PROVISIONING_STAGE_ACTIVE]
    assert len(finals) == 2
    samples = await scrape(service)
    labels = {"outcome": "active", "boot_source": "local_disk"}
    assert value(samples, "bms_image_deployments_total", **labels) == 2
    assert value(samples, "bms_image_deployment_duration_seconds_count", **labels) == 2
    assert value(samples, "bms_image_deployment_duration_seconds_sum", **labels) > 0


async def test_a_scrape_still_answers_when_the_inventory_cannot_be_counted() -> None:
    async def unreachable() -> Inventory:
        raise ConnectionRefusedError("database down")

    metrics = ServiceMetrics()
    metrics.watch_inventory(asyncio.get_running_loop(), unreachable)
    metrics.rpc_finished("/bms.image.v1.ImageService/GetImage", "OK", 0.001)
    text = (await asyncio.to_thread(generate_latest, metrics.registry)).decode()
    assert 'bms_image_rpcs_total{code="OK",method="GetImage"' in text
    assert "bms_image_images" not in text
