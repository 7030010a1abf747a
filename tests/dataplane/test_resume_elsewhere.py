"""An upload resumes on any process that shares the database and the blob
store (issue 16, item 3): its bytes are staged in the chunk store, not in a
file of the process that took them. Two services run on one data directory
(one SQLite database, one chunk directory), as two replicas would; the
first takes half an upload and is cut off, the second takes the rest, and
the first serves the result."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import dataplane_support as dp
import grpc
import pytest

from bms.image.v1 import image_pb2
from support import chunk_store
from support.builders import MiB, random_bytes, sha256_hex
from support.services import fresh_project
from support.tokens import Metadata


async def cut_off(
    own: dp.OwnService, metadata: Metadata, name: str, content: bytes, sent: int
) -> None:
    """Sends the first `sent` bytes of `content` to `own`, waits until it
    took them in, then cuts the stream off; returns once it is QUEUED."""
    counted = dp.CountedRequests(own.service)

    async def requests() -> AsyncIterator[image_pb2.UploadImageDataRequest]:
        yield counted.count(
            dp.upload_metadata(name, size_bytes=len(content), sha256=sha256_hex(content))
        )
        for piece in dp.split(content[:sent], [MiB + 1]):
            yield counted.count(dp.chunk_message(piece))
        counted.paused.set()
        await asyncio.Event().wait()  # the client is cut off from this process

    call = own.images.UploadImageData(requests(), metadata=metadata)
    await counted.taken_in()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await dp.wait_for_image(own.images, metadata, name, dp.QUEUED)


async def test_an_upload_cut_off_on_one_process_is_finished_on_another(tmp_path: Path) -> None:
    content = random_bytes(20 * MiB + 12_345)
    sent = 11 * MiB + 7  # mid-chunk: the tail is stored at the break and continued
    async with dp.own_service(tmp_path) as first, dp.own_service(tmp_path) as second:
        alpha = first.metadata(fresh_project("replicas"))
        created = await dp.create_image(first.images, alpha)
        await cut_off(first, alpha, created.name, content, sent)
        queued = await dp.get_image(first.images, alpha, created.name)
        assert queued.uploaded_bytes == sent
        assert dp.staged(tmp_path, created.name) == content[:sent]

        # The second process sees the same offset and takes the rest.
        seen = await dp.get_image(second.images, alpha, created.name)
        assert (seen.status, seen.uploaded_bytes) == (dp.QUEUED, sent)
        done = await dp.resume_upload(second.images, alpha, created.name, content, sent)

        assert done.status == dp.ACTIVE, dp.status_name(done.status)
        assert (done.size_bytes, done.sha256) == (len(content), sha256_hex(content))
        assert await dp.download_verified(first.images, alpha, created.name) == content
        dp.assert_only_stored(tmp_path, created.name)
        assert chunk_store.staged(tmp_path, created.name) is None


async def test_a_resume_elsewhere_past_the_stored_bytes_is_told_the_real_offset(
    tmp_path: Path,
) -> None:
    """The client believes more went through than the first process stored
    (its last messages were lost with the connection): the second process
    refuses that offset with the one the store holds."""
    content = random_bytes(3 * MiB)
    async with dp.own_service(tmp_path) as first, dp.own_service(tmp_path) as second:
        alpha = first.metadata(fresh_project("replicas"))
        created = await dp.create_image(first.images, alpha)
        await cut_off(first, alpha, created.name, content, 2 * MiB)

        refused = await dp.expect_error(
            dp.resume_upload(second.images, alpha, created.name, content, 2 * MiB + 1),
            grpc.StatusCode.FAILED_PRECONDITION,
            "UPLOAD_OFFSET_MISMATCH",
        )
        assert refused.info.metadata["uploaded_bytes"] == str(2 * MiB)
        done = await dp.resume_upload(second.images, alpha, created.name, content, 2 * MiB)
        assert done.sha256 == sha256_hex(content)
