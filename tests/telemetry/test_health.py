"""Health follows the dependencies: a service whose blob store or database
stops answering goes NOT_SERVING (the others stay SERVING), and comes back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from bms_image.common.serving import RunningService
from bms_image.common.telemetry.health import HealthMonitor
from bms_image.processes import start
from support.disks import tmpfs
from support.services import make_settings

IMAGE = "bms.image.v1.ImageService"
SHARING = "bms.image.v1.SharingService"
PROVISIONING = "bms.image.v1.ProvisioningService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
MiB = 1024 * 1024


async def status(service: RunningService, name: str) -> int:
    async with grpc.aio.insecure_channel(service.address) as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=name), timeout=5
        )
    return int(answer.status)


async def becomes(service: RunningService, name: str, expected: int) -> None:
    """Waits (bounded) for the periodic check to publish `expected`."""
    for _ in range(200):
        if await status(service, name) == expected:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name or 'overall'} never became {expected}")


@pytest.fixture
async def watched(tmp_path: Path) -> AsyncIterator[RunningService]:
    running = await start(make_settings(tmp_path, health_check_seconds=0.2))
    yield running
    await running.stop(0)


async def test_a_missing_blob_store_takes_image_and_sharing_out_not_provisioning(
    watched: RunningService, tmp_path: Path
) -> None:
    blobs = tmp_path / "blobs"
    for name in ("", IMAGE, SHARING, PROVISIONING):
        assert await status(watched, name) == SERVING
    blobs.rename(tmp_path / "blobs-away")
    await becomes(watched, IMAGE, NOT_SERVING)
    assert await status(watched, SHARING) == NOT_SERVING
    assert await status(watched, "") == NOT_SERVING
    assert await status(watched, PROVISIONING) == SERVING, "the fleet does not need blobs"
    (tmp_path / "blobs-away").rename(blobs)
    await becomes(watched, IMAGE, SERVING)
    assert await status(watched, "") == SERVING


@pytest.mark.postgres
async def test_an_unreachable_database_takes_every_service_out_until_it_is_back(
    tmp_path: Path, postgres_url: str
) -> None:
    service = await start(
        make_settings(tmp_path, database_url=postgres_url, health_check_seconds=0.2)
    )
    name = postgres_url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(
        postgres_url.replace("postgresql+asyncpg", "postgresql").rsplit("/", 1)[0] + "/postgres"
    )
    try:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
        )
        await becomes(service, "", NOT_SERVING)
        for each in (IMAGE, SHARING, PROVISIONING):
            assert await status(service, each) == NOT_SERVING
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await becomes(service, "", SERVING)
        assert await status(service, IMAGE) == SERVING
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await admin.close()
        await service.stop(0)


async def test_a_check_that_hangs_counts_as_failing() -> None:
    servicer = health.aio.HealthServicer()

    async def hangs() -> None:
        await asyncio.sleep(60)

    async def answers() -> None:
        return None

    monitor = HealthMonitor(servicer, {"db": hangs, "disk": answers}, {"svc": ["disk"]}, 0.05)
    failing = await monitor.check_once()
    assert set(failing) == {"db"} and "no answer within" in failing["db"]
    answer = await servicer.Check(health_pb2.HealthCheckRequest(service="svc"), None)
    assert answer.status == SERVING
    overall = await servicer.Check(health_pb2.HealthCheckRequest(service=""), None)
    assert overall.status == NOT_SERVING


async def test_shutdown_stops_the_checks_so_health_stays_not_serving(
    watched: RunningService,
) -> None:
    await watched.monitor.stop()
    await watched.health.enter_graceful_shutdown()
    await asyncio.sleep(0.5)  # more than two check intervals
    assert await status(watched, IMAGE) == NOT_SERVING


async def test_a_data_disk_short_of_space_takes_the_image_service_out_until_freed(
    tmp_path: Path,
) -> None:
    """Below BMS_IMAGE_MIN_FREE_BYTES free in the data directory, uploads
    would fail with STORAGE_FULL: the image service says NOT_SERVING."""
    with tmpfs(tmp_path / "data", 64 * MiB) as data_dir:
        running = await start(
            make_settings(data_dir, health_check_seconds=0.2, min_free_bytes=32 * MiB)
        )
        try:
            assert await status(running, IMAGE) == SERVING
            filler = data_dir / "filler"
            filler.write_bytes(b"\0" * (40 * MiB))
            await becomes(running, IMAGE, NOT_SERVING)
            assert await status(running, "") == NOT_SERVING
            assert await status(running, SHARING) == SERVING, "sharing writes no local bytes"
            filler.unlink()
            await becomes(running, IMAGE, SERVING)
        finally:
            await running.stop(0)
