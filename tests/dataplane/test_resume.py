"""Broken streams and their resumption: an upload that breaks off keeps what
arrived (the image is QUEUED with `uploaded_bytes`) and a new stream from that
offset completes it; a download restarts from any offset."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import dataplane_support as dp
import grpc
import pytest

from bms.image.v1 import image_pb2
from bms_image.common.serving import RunningService
from support import chunk_store
from support.builders import MiB, random_bytes, sha256_hex
from support.services import fresh_project
from support.tokens import Metadata

pytestmark = pytest.mark.asyncio(loop_scope="module")


class ClientGaveUp(Exception):
    """Raised by a request generator to break its stream off."""


async def break_off_upload(
    images: dp.Stub,
    metadata: Metadata,
    name: str,
    content: bytes,
    offset: int,
    sent_until: int,
    data_dir: Path,
    how: str = "cancel",
) -> None:
    """Starts an upload from `offset` declaring the whole `content`, sends the
    bytes up to `sent_until`, waits until the server has taken them in, then
    breaks the stream off: `cancel` cancels the call, `raise` makes the
    request generator fail (which the client library turns into a cancel)."""
    proceed = asyncio.Event()
    counted = dp.CountedRequests(data_dir)

    async def requests() -> AsyncIterator[image_pb2.UploadImageDataRequest]:
        yield counted.count(
            dp.upload_metadata(
                name, offset=offset, size_bytes=len(content), sha256=sha256_hex(content)
            )
        )
        for piece in dp.split(content[offset:sent_until], [300_001, 65_536]):
            yield counted.count(dp.chunk_message(piece))
        counted.paused.set()
        await proceed.wait()
        if how == "raise":
            raise ClientGaveUp("the client lost its source file")
        await asyncio.Event().wait()  # hangs until cancelled

    call = images.UploadImageData(requests(), metadata=metadata)
    await counted.taken_in()
    image = await dp.get_image(images, metadata, name)
    assert image.status == dp.SAVING, dp.status_name(image.status)
    if how == "cancel":
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    else:
        proceed.set()
        with pytest.raises((grpc.aio.AioRpcError, asyncio.CancelledError)):
            await call


async def interrupted_upload(
    images: dp.Stub,
    metadata: Metadata,
    content: bytes,
    sent: int,
    data_dir: Path,
    how: str = "cancel",
) -> image_pb2.Image:
    """A new image whose upload of `content` broke off (`break_off_upload`)
    after `sent` bytes, once the server has put it back to QUEUED."""
    created = await dp.create_image(images, metadata)
    await break_off_upload(images, metadata, created.name, content, 0, sent, data_dir, how)
    return await dp.wait_for_image(images, metadata, created.name, dp.QUEUED)


@pytest.mark.parametrize("how", ["cancel", "raise"])
async def test_broken_upload_resumes_from_uploaded_bytes(
    images: dp.Stub, alpha: Metadata, how: str, data_dir: Path
) -> None:
    content = random_bytes(5 * MiB + 77)
    sent = 2 * MiB + 1234

    image = await interrupted_upload(images, alpha, content, sent, data_dir, how)

    assert image.uploaded_bytes == sent
    assert str(sent) in image.status_reason
    assert (image.size_bytes, image.sha256) == (0, "")
    assert dp.staged(data_dir, image.name) == content[:sent]
    assert not chunk_store.stored(data_dir, image.name)
    await dp.expect_error(
        dp.download_all(images, alpha, image.name),
        grpc.StatusCode.FAILED_PRECONDITION,
        "IMAGE_NOT_ACTIVE",
    )

    resumed = await dp.resume_upload(images, alpha, image.name, content, sent)

    assert resumed.status == dp.ACTIVE, dp.status_name(resumed.status)
    assert (resumed.size_bytes, resumed.sha256) == (len(content), sha256_hex(content))
    assert resumed.uploaded_bytes == 0
    assert resumed.status_reason == ""
    assert await dp.download_verified(images, alpha, image.name) == content
    dp.assert_only_stored(data_dir, image.name)


async def test_upload_resumes_after_two_breaks(
    images: dp.Stub, alpha: Metadata, data_dir: Path
) -> None:
    content = random_bytes(3 * MiB)

    queued = await interrupted_upload(images, alpha, content, MiB, data_dir)
    assert queued.uploaded_bytes == MiB
    await break_off_upload(images, alpha, queued.name, content, MiB, 2 * MiB + 1, data_dir)
    image = await dp.wait_for_image(images, alpha, queued.name, dp.QUEUED)
    assert image.uploaded_bytes == 2 * MiB + 1

    # Resuming without a declared checksum still yields the checksum of everything.
    resumed = await dp.upload(
        images,
        alpha,
        queued.name,
        content[2 * MiB + 1 :],
        offset=2 * MiB + 1,
        sha256="",
        size_bytes=0,
    )
    await dp.assert_stored(images, alpha, resumed, content)


async def test_resume_with_a_wrong_offset_is_refused_and_keeps_the_bytes(
    images: dp.Stub, alpha: Metadata, data_dir: Path
) -> None:
    content = random_bytes(2 * MiB)
    sent = MiB + 7
    queued = await interrupted_upload(images, alpha, content, sent, data_dir)

    for wrong in (0, sent - 1, sent + 1):
        rich = await dp.expect_error(
            dp.resume_upload(images, alpha, queued.name, content, wrong),
            grpc.StatusCode.FAILED_PRECONDITION,
            "UPLOAD_OFFSET_MISMATCH",
        )
        assert rich.info.metadata["uploaded_bytes"] == str(sent)
        image = await dp.get_image(images, alpha, queued.name)
        assert (image.status, image.uploaded_bytes) == (dp.QUEUED, sent)
        assert dp.staged(data_dir, queued.name) == content[:sent]

    resumed = await dp.resume_upload(images, alpha, queued.name, content, sent)
    assert (resumed.status, resumed.sha256) == (dp.ACTIVE, sha256_hex(content))


async def test_fresh_upload_with_a_nonzero_offset_is_refused(
    images: dp.Stub, alpha: Metadata, data_dir: Path
) -> None:
    created = await dp.create_image(images, alpha)

    rich = await dp.expect_error(
        dp.upload(images, alpha, created.name, b"tail", offset=10),
        grpc.StatusCode.FAILED_PRECONDITION,
        "UPLOAD_OFFSET_MISMATCH",
    )

    assert rich.info.metadata["uploaded_bytes"] == "0"
    await dp.assert_untouched(images, alpha, created.name, data_dir)


async def test_resume_with_different_bytes_fails_the_checksum(
    images: dp.Stub, alpha: Metadata, data_dir: Path
) -> None:
    content = random_bytes(2 * MiB)
    queued = await interrupted_upload(images, alpha, content, MiB, data_dir)

    await dp.expect_error(
        dp.upload(
            images,
            alpha,
            queued.name,
            random_bytes(MiB),
            offset=MiB,
            size_bytes=len(content),
            sha256=sha256_hex(content),
        ),
        grpc.StatusCode.DATA_LOSS,
        "IMAGE_CHECKSUM_MISMATCH",
    )

    image = await dp.get_image(images, alpha, queued.name)
    assert image.status == dp.KILLED
    assert dp.files_of(data_dir, queued.name) == []


async def test_a_second_upload_while_one_is_in_progress_is_refused(
    images: dp.Stub, alpha: Metadata, data_dir: Path
) -> None:
    content = random_bytes(2 * MiB)
    created = await dp.create_image(images, alpha)
    rest = asyncio.Event()
    first = await dp.held_upload(images, alpha, created.name, content, MiB, data_dir, rest)

    rich = await dp.expect_error(
        dp.upload(images, alpha, created.name, content),
        grpc.StatusCode.FAILED_PRECONDITION,
        "IMAGE_NOT_QUEUED",
    )
    assert "in progress" in rich.status.message

    rest.set()
    done = await first
    await dp.assert_stored(images, alpha, done, content)


async def test_deleting_an_interrupted_upload_removes_its_staged_bytes(
    images: dp.Stub, alpha: Metadata, data_dir: Path
) -> None:
    content = random_bytes(MiB)
    queued = await interrupted_upload(images, alpha, content, 100_000, data_dir)
    assert dp.staged(data_dir, queued.name) == content[:100_000]

    await images.DeleteImage(image_pb2.DeleteImageRequest(name=queued.name), metadata=alpha)

    assert dp.files_of(data_dir, queued.name) == []


# -- downloads ---------------------------------------------------------------


async def test_download_resumes_from_any_offset(
    service: RunningService, images: dp.Stub, alpha: Metadata
) -> None:
    chunk = service.settings.chunk_bytes
    content = random_bytes(3 * chunk + 5)
    created = await dp.create_image(images, alpha)
    await dp.upload(images, alpha, created.name, content)

    for offset in (0, 1, chunk - 1, chunk, 2 * chunk + 7, len(content) - 1, len(content)):
        got = await dp.download(images, alpha, created.name, offset, max_chunk=chunk)
        assert got.data == content[offset:], offset
        assert got.size_bytes == len(content)
        assert got.sha256 == sha256_hex(content), "the final sha256 is of the whole image"


async def test_broken_download_is_completed_by_a_resumed_one(
    service: RunningService, images: dp.Stub, alpha: Metadata
) -> None:
    content = random_bytes(4 * MiB + 999)
    created = await dp.create_image(images, alpha)
    await dp.upload(images, alpha, created.name, content)

    call = images.DownloadImageData(
        image_pb2.DownloadImageDataRequest(name=created.name), metadata=alpha
    )
    received = b""
    async for message in call:
        assert message.offset == len(received)
        received += message.chunk
        if len(received) >= 2 * MiB:
            call.cancel()
            break
    assert 0 < len(received) < len(content)

    rest = await dp.download(images, alpha, created.name, len(received))
    whole = received + rest.data
    assert sha256_hex(whole) == rest.sha256
    assert whole == content


async def test_download_offset_out_of_range_is_invalid(
    service: RunningService, images: dp.Stub, alpha: Metadata
) -> None:
    created = await dp.create_image(images, alpha)
    await dp.upload(images, alpha, created.name, random_bytes(5000))

    for offset in (5001, 1 << 40, -1):
        rich = await dp.expect_error(
            dp.download_all(images, alpha, created.name, offset), grpc.StatusCode.INVALID_ARGUMENT
        )
        assert "offset" in rich.fields


async def test_download_of_an_image_without_data_is_a_failed_precondition(
    service: RunningService, images: dp.Stub, alpha: Metadata
) -> None:
    queued = await dp.create_image(images, alpha)
    await dp.expect_error(
        dp.download_all(images, alpha, queued.name),
        grpc.StatusCode.FAILED_PRECONDITION,
        "IMAGE_NOT_ACTIVE",
    )
    killed = await dp.create_image(images, alpha, display_name="killed")
    await dp.expect_error(
        dp.upload(images, alpha, killed.name, b"abc", sha256="0" * 64), grpc.StatusCode.DATA_LOSS
    )
    await dp.expect_error(
        dp.download_all(images, alpha, killed.name),
        grpc.StatusCode.FAILED_PRECONDITION,
        "IMAGE_NOT_ACTIVE",
    )


async def test_download_of_another_projects_private_image_is_not_found(
    service: RunningService, images: dp.Stub, as_project: Callable[..., Metadata]
) -> None:
    alpha, beta = as_project(fresh_project("alpha")), as_project(fresh_project("beta"))
    created = await dp.create_image(images, alpha)
    await dp.upload(images, alpha, created.name, random_bytes(1000))

    await dp.expect_error(
        dp.download_all(images, beta, created.name), grpc.StatusCode.NOT_FOUND, "IMAGE_NOT_FOUND"
    )
    await dp.expect_error(
        dp.download_all(images, beta, created.name, 10),
        grpc.StatusCode.NOT_FOUND,
        "IMAGE_NOT_FOUND",
    )


async def test_public_catalog_images_download_and_verify(
    service: RunningService, images: dp.Stub, as_project: Callable[..., Metadata]
) -> None:
    beta = as_project(fresh_project("beta"))
    listed = await images.ListImages(
        image_pb2.ListImagesRequest(filter="type = public", page_size=1000), metadata=beta
    )
    assert len(listed.images) >= 5
    for public in listed.images:
        assert public.status == dp.ACTIVE
        assert public.size_bytes >= MiB, public.display_name  # catalog_image_mib = 1
        data = await dp.download_verified(images, beta, public.name, service.settings.chunk_bytes)
        assert len(data) == public.size_bytes, public.display_name
        assert sha256_hex(data) == public.sha256, public.display_name
        middle = public.size_bytes // 2 + 3
        tail = await dp.download(images, beta, public.name, middle)
        assert tail.data == data[middle:]
        assert tail.sha256 == public.sha256


async def test_image_deleted_during_its_upload_ends_the_upload_as_not_found(
    images: dp.Stub, alpha: Metadata, data_dir: Path
) -> None:
    """DeleteImage while bytes are arriving: the image is gone at once, the
    upload ends with NOT_FOUND (the servicer's own `_finish` says so for a
    deletion that lands while the blob is stored) and nothing stays on disk."""
    content = random_bytes(2 * MiB)
    created = await dp.create_image(images, alpha)
    rest = asyncio.Event()
    call = await dp.held_upload(images, alpha, created.name, content, MiB, data_dir, rest)
    await images.DeleteImage(image_pb2.DeleteImageRequest(name=created.name), metadata=alpha)
    await dp.expect_error(dp.get_image(images, alpha, created.name), grpc.StatusCode.NOT_FOUND)

    rest.set()
    await dp.expect_error(call, grpc.StatusCode.NOT_FOUND, "IMAGE_NOT_FOUND")

    assert dp.files_of(data_dir, created.name) == []
    assert not chunk_store.stored(data_dir, created.name)
    await dp.expect_error(dp.get_image(images, alpha, created.name), grpc.StatusCode.NOT_FOUND)


@pytest.mark.parametrize("how", ["lost", "damaged"])
async def test_download_of_an_image_whose_blob_is_gone_is_data_loss(
    images: dp.Stub, alpha: Metadata, data_dir: Path, how: str
) -> None:
    """A chunk whose bytes are lost (its file gone) or damaged (a byte
    flipped) is DATA_LOSS naming the offset of its chunk; the bytes before
    it may have been sent, and they are the image's: never a byte that is
    not."""
    content = random_bytes(3 * MiB + 3000)
    created = await dp.create_image(images, alpha)
    await dp.upload(images, alpha, created.name, content)
    bad = 2 * MiB + 5
    if how == "lost":
        chunk_store.chunk_files(data_dir, created.name)[bad // MiB].unlink()
    else:
        chunk_store.damage_bytes(data_dir, created.name, bad)

    received: list[bytes] = []

    async def drain() -> None:
        call = images.DownloadImageData(
            image_pb2.DownloadImageDataRequest(name=created.name), metadata=alpha
        )
        async for message in call:
            assert not message.last, "a damaged image's download ended as complete"
            received.append(message.chunk)

    refused = await dp.expect_error(drain(), grpc.StatusCode.DATA_LOSS, "IMAGE_DATA_DAMAGED")
    assert f"offset {bad // MiB * MiB}" in refused.message, refused.message
    sent = b"".join(received)
    assert len(sent) <= bad // MiB * MiB, "bytes of the damaged chunk were sent"
    assert sent == content[: len(sent)], "bytes that are not the image's were sent"

    # Every chunk of it lost (a wiped store): DATA_LOSS too, from the first byte.
    chunk_store.lose_bytes(data_dir, created.name)
    received.clear()
    await dp.expect_error(drain(), grpc.StatusCode.DATA_LOSS, "IMAGE_DATA_DAMAGED")
    assert received == []
