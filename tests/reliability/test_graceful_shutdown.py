"""SIGTERM while streams are in flight, on a real `bms-image serve`: health
turns NOT_SERVING for watchers, new calls get UNAVAILABLE, the download and
the upload that were running finish within the grace period, the process
exits 0, and after a restart the uploaded image is there, verified."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bms.image.v1 import image_pb2, image_pb2_grpc
from bms_image.images.adapters.catalog import public_image_id
from support.builders import private_image
from support.processes import ServerProcess
from support.tokens import bearer

pytestmark = pytest.mark.e2e

CENTOS = f"images/{public_image_id('centos-7.6-x86_64')}"
UPLOAD = os.urandom(6 * 1024 * 1024)
CHUNK = 256 * 1024
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def auth(server: ServerProcess) -> tuple[tuple[str, str]]:
    return bearer(server.token("alpha"))


async def create_queued(images: image_pb2_grpc.ImageServiceStub, md: tuple[tuple[str, str]]) -> str:
    image = await images.CreateImage(
        image_pb2.CreateImageRequest(image=private_image("uploaded-during-shutdown")),
        metadata=md,
    )
    return str(image.name)


async def test_sigterm_drains_streams_in_flight_and_refuses_new_calls(tmp_path: Path) -> None:
    server = ServerProcess(
        tmp_path, catalog_image_mib="16", shutdown_grace_seconds="20", health_check_seconds="0.2"
    )
    server.start()
    md = auth(server)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            images = image_pb2_grpc.ImageServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            name = await create_queued(images, md)
            expected = await images.GetImage(image_pb2.GetImageRequest(name=CENTOS), metadata=md)

            watch = health.Watch(health_pb2.HealthCheckRequest(service="bms.image.v1.ImageService"))
            assert (await watch.read()).status == SERVING

            download = images.DownloadImageData(
                image_pb2.DownloadImageDataRequest(name=CENTOS), metadata=md
            )
            first = await download.read()
            assert first.offset == 0 and first.chunk

            upload_may_finish = asyncio.Event()

            async def upload_requests() -> AsyncIterator[image_pb2.UploadImageDataRequest]:
                yield image_pb2.UploadImageDataRequest(
                    metadata=image_pb2.UploadImageDataMetadata(
                        name=name,
                        size_bytes=len(UPLOAD),
                        sha256=hashlib.sha256(UPLOAD).hexdigest(),
                        disk_format=image_pb2.DISK_FORMAT_RAW,
                    )
                )
                for start in range(0, len(UPLOAD), CHUNK):
                    if start == len(UPLOAD) // 2:
                        await upload_may_finish.wait()
                    yield image_pb2.UploadImageDataRequest(chunk=UPLOAD[start : start + CHUNK])

            upload = asyncio.ensure_future(
                images.UploadImageData(upload_requests(), metadata=md, timeout=60)
            )
            await _wait_until_saving(images, md, name)

            assert server.process is not None
            server.process.send_signal(signal.SIGTERM)

            assert (await asyncio.wait_for(watch.read(), 10)).status == NOT_SERVING
            await _new_calls_are_refused(server.address, md)

            upload_may_finish.set()
            uploaded = await upload
            assert uploaded.status == image_pb2.IMAGE_STATUS_ACTIVE

            digest = hashlib.sha256(first.chunk)
            last = first
            while not last.last:
                last = await download.read()
                assert last is not grpc.aio.EOF, "the download ended before its last message"
                digest.update(last.chunk)
            assert last.last and last.sha256 == digest.hexdigest() == expected.sha256
            watch.cancel()
    finally:
        code, _ = await asyncio.to_thread(server.terminate)
    assert code == 0, server.output()

    restarted = ServerProcess(tmp_path).start()
    try:
        async with grpc.aio.insecure_channel(restarted.address) as channel:
            image = await image_pb2_grpc.ImageServiceStub(channel).GetImage(
                image_pb2.GetImageRequest(name=name), metadata=auth(restarted)
            )
        assert image.status == image_pb2.IMAGE_STATUS_ACTIVE
        assert image.sha256 == hashlib.sha256(UPLOAD).hexdigest()
    finally:
        restarted.stop()


async def _wait_until_saving(
    images: image_pb2_grpc.ImageServiceStub, md: tuple[tuple[str, str]], name: str
) -> None:
    for _ in range(400):
        image = await images.GetImage(image_pb2.GetImageRequest(name=name), metadata=md)
        if image.status == image_pb2.IMAGE_STATUS_SAVING:
            return
        await asyncio.sleep(0.025)
    raise AssertionError("the upload never started")


async def _new_calls_are_refused(address: str, md: tuple[tuple[str, str]]) -> None:
    """A new connection's call fails UNAVAILABLE once the server stops accepting."""
    for _ in range(200):
        async with grpc.aio.insecure_channel(address) as fresh:
            try:
                await image_pb2_grpc.ImageServiceStub(fresh).GetImage(
                    image_pb2.GetImageRequest(name=CENTOS), metadata=md, timeout=2
                )
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE, error
                return
        await asyncio.sleep(0.025)
    raise AssertionError("new calls were still served after SIGTERM")
