"""A resume continues only from bytes that are really there (issue 14, item
3). When the bytes staged for an upload are fewer than its recorded offset
(chunk files of the store were lost or restored, or a crash fell between two
steps), the service refuses the resume with
FAILED_PRECONDITION UPLOAD_OFFSET_MISMATCH carrying the real offset, records
that offset for GetImage, and a resume from it yields the right bytes: never
a prefix of zeros.

The tests speak of behaviour; how the bytes are lost is one helper,
`lose_staged_bytes`, the only place that knows where uploads are staged."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import dataplane_support as dp
import grpc
import pytest

from bms.image.v1 import image_pb2, image_pb2_grpc
from bms_image.common.serving import RunningService
from support import chunk_store
from support.builders import MiB, random_bytes, sha256_hex
from support.processes import ServerProcess
from support.services import fresh_project
from support.tokens import Metadata, bearer

pytestmark = pytest.mark.asyncio(loop_scope="module")


def lose_staged_bytes(data_dir: Path, name: str, keep: int) -> None:
    """What a lost or restored blob store does to a staged upload: only the
    files of its chunks before `keep` (a multiple of the chunk size) are
    left, though the records still name the others."""
    files = chunk_store.chunk_files(data_dir, f"upload-{dp.image_id(name)}")
    assert keep % MiB == 0 and len(files) * MiB > keep, (keep, len(files))
    for path in files[keep // MiB :]:
        path.unlink()


async def upload_first_part(
    images: dp.Stub, metadata: Metadata, name: str, part: bytes, data_dir: Path
) -> None:
    """Sends `part` (declaring neither size nor checksum, as a plain client
    may; a multiple of 8 MiB, the batch the service stores at once), waits
    until the service has staged it, then breaks the stream off."""

    async def requests() -> AsyncIterator[image_pb2.UploadImageDataRequest]:
        yield dp.upload_metadata(name)
        for piece in dp.split(part, [300_001, 65_536]):
            yield dp.chunk_message(piece)
        await asyncio.Event().wait()  # the client hangs until cancelled

    call = images.UploadImageData(requests(), metadata=metadata)
    await dp.wait_for_staged(data_dir, name, len(part), within=30)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    image = await dp.wait_for_image(images, metadata, name, dp.QUEUED, within=30)
    assert image.uploaded_bytes == len(part)


async def resume_after_loss(
    images: dp.Stub, metadata: Metadata, data_dir: Path, content: bytes, sent: int, keep: int
) -> None:
    created = await dp.create_image(images, metadata)
    await upload_first_part(images, metadata, created.name, content[:sent], data_dir)
    lose_staged_bytes(data_dir, created.name, keep)

    # The resume is refused on its first message: sending no bytes after it
    # spares the client library a race between its writes and the status.
    refused = await dp.expect_error(
        dp.upload(images, metadata, created.name, b"", offset=sent, size_bytes=0, sha256=""),
        grpc.StatusCode.FAILED_PRECONDITION,
        "UPLOAD_OFFSET_MISMATCH",
    )
    assert refused.info.metadata["uploaded_bytes"] == str(keep)
    assert f"metadata.offset = {keep}" in refused.status.message
    image = await images.GetImage(image_pb2.GetImageRequest(name=created.name), metadata=metadata)
    assert image.status == dp.QUEUED, dp.status_name(image.status)
    assert image.uploaded_bytes == keep, "the corrected offset is what GetImage reports"

    # No size or checksum declared: the service alone keeps zeros out.
    resumed = await dp.upload(
        images, metadata, created.name, content[keep:], offset=keep, size_bytes=0, sha256=""
    )
    assert resumed.status == dp.ACTIVE, dp.status_name(resumed.status)
    assert (resumed.size_bytes, resumed.sha256) == (len(content), sha256_hex(content))
    assert await dp.download_verified(images, metadata, created.name) == content


@pytest.mark.parametrize("keep", [0, 3 * MiB], ids=["deleted", "truncated"])
async def test_a_resume_after_lost_staged_bytes_is_refused_with_the_real_offset(
    service: RunningService, channel: grpc.aio.Channel, keep: int
) -> None:
    images = image_pb2_grpc.ImageServiceStub(channel)
    alpha = bearer(service.authority.issue(fresh_project("lost")))
    content = random_bytes(10 * MiB + 11)
    await resume_after_loss(
        images, alpha, service.settings.data_dir, content, sent=8 * MiB, keep=keep
    )


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(tmp_path, catalog_image_mib="1", shutdown_grace_seconds="1").start()
    try:
        yield process
    finally:
        process.stop()


@pytest.mark.e2e
async def test_a_real_service_refuses_a_resume_past_the_bytes_it_holds(
    serve: ServerProcess,
) -> None:
    """The same against a `bms-image serve` process, every staged chunk's
    file deleted between the two halves of the upload."""
    async with grpc.aio.insecure_channel(serve.address) as opened:
        images = image_pb2_grpc.ImageServiceStub(opened)
        alpha = bearer(serve.token(fresh_project("lost")))
        content = random_bytes(9 * MiB + 5)
        await resume_after_loss(images, alpha, serve.data_dir, content, sent=8 * MiB, keep=0)
