"""Concurrent uploads and downloads per project are bounded in each process
(BMS_IMAGE_MAX_UPLOADS_PER_PROJECT, BMS_IMAGE_MAX_DOWNLOADS_PER_PROJECT):
one more gets RESOURCE_EXHAUSTED with a QuotaFailure, other projects are not
affected, and a slot comes back however its stream ended (success, refusal,
cancellation)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import dataplane_support as dp
import grpc
import pytest

from bms.image.v1 import image_pb2
from support.builders import MiB, random_bytes
from support.errors import expect_error
from support.services import fresh_project
from support.tokens import Metadata

RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def held_upload(own: dp.OwnService, metadata: Metadata, name: str) -> grpc.aio.StreamUnaryCall:
    """An upload that sends one chunk and then waits (until cancelled)."""

    async def requests() -> AsyncIterator[image_pb2.UploadImageDataRequest]:
        yield dp.upload_metadata(name)
        yield dp.chunk_message(random_bytes(1000))
        await asyncio.Event().wait()

    return own.images.UploadImageData(requests(), metadata=metadata)


async def cancelled(call: grpc.aio.Call) -> None:
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call  # type: ignore[misc]


async def test_uploads_over_the_project_limit_are_refused_and_slots_come_back(
    tmp_path: Path,
) -> None:
    async with dp.own_service(tmp_path, max_uploads_per_project=2) as own:
        project = fresh_project("uploads")
        alpha, beta = own.metadata(project), own.metadata(fresh_project("other"))
        # Failed uploads give their slot back: more of them than the limit.
        for _ in range(3):
            bad = await dp.create_image(own.images, alpha)
            await expect_error(
                dp.upload(own.images, alpha, bad.name, random_bytes(5000), sha256="0" * 64),
                grpc.StatusCode.DATA_LOSS,
            )
        first, second, third = [await dp.create_image(own.images, alpha) for _ in range(3)]
        holding = [held_upload(own, alpha, first.name), held_upload(own, alpha, second.name)]
        for image in (first, second):
            await dp.wait_for_image(own.images, alpha, image.name, dp.SAVING, within=30)

        refused = await expect_error(
            dp.upload(own.images, alpha, third.name, random_bytes(5000)),
            RESOURCE_EXHAUSTED,
            "CONCURRENT_UPLOADS_EXCEEDED",
        )
        assert refused.quota_failure is not None
        assert [v.subject for v in refused.quota_failure.violations] == [f"projects/{project}"]
        untouched = await dp.wait_for_image(own.images, alpha, third.name, dp.QUEUED)
        assert untouched.uploaded_bytes == 0
        other = await dp.create_image(own.images, beta)
        assert (
            await dp.upload(own.images, beta, other.name, random_bytes(5000))
        ).status == dp.ACTIVE

        await cancelled(holding[0])
        await dp.wait_for_image(own.images, alpha, first.name, dp.QUEUED, within=30)
        done = await dp.upload(own.images, alpha, third.name, random_bytes(5000))
        assert done.status == dp.ACTIVE, dp.status_name(done.status)
        await cancelled(holding[1])


async def test_downloads_over_the_project_limit_are_refused_and_slots_come_back(
    tmp_path: Path,
) -> None:
    async with dp.own_service(tmp_path, max_downloads_per_project=2) as own:
        project = fresh_project("downloads")
        alpha = own.metadata(project)
        created = await dp.create_image(own.images, alpha)
        content = random_bytes(24 * MiB)  # more than the transport buffers: a held stream waits
        await dp.upload(own.images, alpha, created.name, content)
        # Streams that end, also at the end of the image, give their slot back.
        for _ in range(3):
            await dp.download_all(own.images, alpha, created.name, offset=len(content))
        holding = []
        for _ in range(2):
            call = own.images.DownloadImageData(
                image_pb2.DownloadImageDataRequest(name=created.name), metadata=alpha
            )
            first = await call.read()
            assert first.chunk
            holding.append(call)

        refused = await expect_error(
            dp.download_all(own.images, alpha, created.name),
            RESOURCE_EXHAUSTED,
            "CONCURRENT_DOWNLOADS_EXCEEDED",
        )
        assert refused.quota_failure is not None
        assert [v.subject for v in refused.quota_failure.violations] == [f"projects/{project}"]

        holding[0].cancel()
        # The cancelled stream's slot is given back once the service has
        # closed it; a hang guard, not a timing assertion.
        deadline = time.monotonic() + 30
        while True:
            try:
                assert await dp.download_verified(own.images, alpha, created.name) == content
                break
            except grpc.aio.AioRpcError as error:
                if error.code() != RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        holding[1].cancel()
