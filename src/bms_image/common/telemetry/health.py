"""Health that follows the dependencies: each service is SERVING only while
the things it needs (database, blob store, fleet disks) answer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path

from grpc_health.v1 import health, health_pb2

log = logging.getLogger(__name__)

Check = Callable[[], Awaitable[None]]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def free_space(directory: Path, min_free_bytes: int) -> Check:
    """A check that fails while the file system of `directory` has less than
    `min_free_bytes` free (BMS_IMAGE_MIN_FREE_BYTES): uploads staged there
    would fail with STORAGE_FULL, so balancers should send them elsewhere."""

    async def check() -> None:
        usage = await asyncio.to_thread(shutil.disk_usage, directory)
        if usage.free < min_free_bytes:
            raise OSError(
                f"{usage.free} bytes free in {directory}, under the {min_free_bytes} "
                "of BMS_IMAGE_MIN_FREE_BYTES"
            )

    return check


class HealthMonitor:
    """Runs every check each `interval` seconds (each bounded by it too) and
    sets each service, and the overall "" entry, from the checks it needs."""

    def __init__(
        self,
        servicer: health.aio.HealthServicer,
        checks: Mapping[str, Check],
        needs: Mapping[str, Sequence[str]],
        interval: float,
    ) -> None:
        self._servicer = servicer
        self._checks = checks
        self._needs = {**needs, "": list(checks)}
        self._interval = interval
        self._failing: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None

    async def check_once(self) -> dict[str, str]:
        """Runs the checks and publishes the statuses; returns what fails and why."""
        results = await asyncio.gather(*(self._run(name) for name in self._checks))
        failing = {name: why for name, why in zip(self._checks, results, strict=True) if why}
        for name, why in failing.items():
            if self._failing.get(name) != why:
                log.warning("health: %s is failing: %s", name, why)
        for name in self._failing.keys() - failing.keys():
            log.info("health: %s is back", name)
        self._failing = failing
        for service, needed in self._needs.items():
            healthy = not any(name in failing for name in needed)
            await self._servicer.set(service, SERVING if healthy else NOT_SERVING)
        return failing

    async def _run(self, name: str) -> str:
        try:
            await asyncio.wait_for(self._checks[name](), self._interval)
        except TimeoutError:
            return f"no answer within {self._interval:g}s"
        except Exception as error:
            return f"{type(error).__name__}: {error}"
        return ""

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.check_once()

    async def stop(self) -> None:
        """Stops checking (before a shutdown sets everything NOT_SERVING)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
