"""Round trips through UploadImageData and DownloadImageData: random raw
content of sizes around the download chunk size, uploaded in odd pieces,
comes back byte for byte and the image reports its real size and SHA-256."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import dataplane_support as dp
import grpc
import pytest

from bms.image.v1 import image_pb2
from bms_image.common.serving import RunningService
from support import chunk_store
from support.builders import MiB, random_bytes, sha256_hex
from support.tokens import Metadata

pytestmark = pytest.mark.asyncio(loop_scope="module")

SIZES = {
    "empty": lambda chunk: 0,
    "one-byte": lambda chunk: 1,
    "chunk-1": lambda chunk: chunk - 1,
    "chunk": lambda chunk: chunk,
    "chunk+1": lambda chunk: chunk + 1,
    "several-mib": lambda chunk: 5 * MiB + 12_345,
}


@pytest.mark.parametrize("size_name", [name for name in SIZES if name != "empty"])
async def test_round_trip_of_random_raw_content(
    service: RunningService, images: dp.Stub, alpha: Metadata, size_name: str, data_dir: Path
) -> None:
    chunk = service.settings.chunk_bytes
    content = random_bytes(SIZES[size_name](chunk))
    created = await dp.create_image(images, alpha)

    uploaded = await dp.upload(images, alpha, created.name, content)

    assert uploaded.name == created.name
    assert uploaded.status == dp.ACTIVE, dp.status_name(uploaded.status)
    assert uploaded.size_bytes == len(content)
    assert uploaded.sha256 == sha256_hex(content)
    assert uploaded.disk_format == image_pb2.DISK_FORMAT_RAW
    assert uploaded.uploaded_bytes == 0
    assert uploaded.status_reason == ""
    stored = await dp.get_image(images, alpha, created.name)
    assert (stored.status, stored.size_bytes, stored.sha256) == (
        dp.ACTIVE,
        len(content),
        sha256_hex(content),
    )

    got = await dp.download(images, alpha, created.name, max_chunk=chunk)
    assert got.size_bytes == len(content)
    assert got.sha256 == sha256_hex(got.data) == sha256_hex(content)
    assert got.data == content
    # Full chunks of the service's chunk size, then the rest, then the last message.
    expected_chunks = [chunk] * (len(content) // chunk)
    if len(content) % chunk:
        expected_chunks.append(len(content) % chunk)
    assert got.chunk_sizes == expected_chunks
    assert got.messages == len(expected_chunks) + 1

    # The bytes live in exactly one place: the chunk store; nothing is left staged.
    dp.assert_only_stored(data_dir, created.name)
    assert chunk_store.stored_bytes(data_dir, created.name) == content


async def test_round_trip_without_declared_size_or_checksum(
    service: RunningService, images: dp.Stub, alpha: Metadata
) -> None:
    content = random_bytes(2 * MiB + 17)
    created = await dp.create_image(images, alpha)

    uploaded = await dp.upload(
        images, alpha, created.name, content, size_bytes=0, sha256="", chunk_sizes=[MiB - 5]
    )

    await dp.assert_stored(images, alpha, uploaded, content)


async def test_chunks_of_exactly_the_upload_limit_are_accepted(
    service: RunningService, images: dp.Stub, alpha: Metadata
) -> None:
    content = random_bytes(8 * MiB + 1)
    created = await dp.create_image(images, alpha)

    uploaded = await dp.upload(images, alpha, created.name, content, chunk_sizes=[4 * MiB])

    await dp.assert_stored(images, alpha, uploaded, content)


async def test_empty_upload(service: RunningService, images: dp.Stub, alpha: Metadata) -> None:
    """Zero bytes is not an image (it cannot boot, and size 0 means "not
    uploaded"): INVALID_ARGUMENT, and the image stays QUEUED for a real upload."""
    created = await dp.create_image(images, alpha)

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await dp.upload(images, alpha, created.name, b"")

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = await images.GetImage(image_pb2.GetImageRequest(name=created.name), metadata=alpha)
    assert after.status == image_pb2.IMAGE_STATUS_QUEUED
    uploaded = await dp.upload(images, alpha, created.name, random_bytes(4096))
    assert uploaded.status == dp.ACTIVE


async def test_deleted_image_loses_its_blob_and_download(
    images: dp.Stub, alpha: Metadata, data_dir: Path
) -> None:
    created = await dp.create_image(images, alpha)
    await dp.upload(images, alpha, created.name, random_bytes(3000))
    assert chunk_store.stored(data_dir, created.name)
    chunks = chunk_store.chunk_files(data_dir, created.name)
    assert chunks and all(path.is_file() for path in chunks)

    await images.DeleteImage(image_pb2.DeleteImageRequest(name=created.name), metadata=alpha)

    assert not chunk_store.stored(data_dir, created.name)
    assert dp.files_of(data_dir, created.name) == []
    # Its chunks (its own bytes: random, shared by no other image) are freed
    # by the next collection (not one past the puts' TTL: the module's
    # service may be storing bytes of other tests).
    await chunk_store.collect(data_dir, later=timedelta(0), orphans=False)
    assert [path for path in chunks if path.exists()] == []
    await dp.expect_error(dp.download_all(images, alpha, created.name), grpc.StatusCode.NOT_FOUND)
