"""The chunk store through the API: the same bytes stored once whoever
uploads them (and nothing in the answers says so), a damaged chunk is
DATA_LOSS and never bad bytes, replicas share chunks, and deleted images'
chunks are freed."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import dataplane_support as dp
import grpc

from bms.image.v1 import image_pb2, sharing_pb2, sharing_pb2_grpc
from bms_image.common.config import Settings
from support import builders, chunk_store
from support.errors import expect_error
from support.services import make_settings, serving

MiB = 1024 * 1024


def _settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path, gc_seconds=0.1)


async def _created(images: dp.Stub, md: dp.Metadata, name: str) -> str:
    image = await images.CreateImage(
        image_pb2.CreateImageRequest(image=builders.private_image(name)), metadata=md
    )
    return image.name


def _fields(image: image_pb2.Image) -> set[str]:
    return {field.name for field, _ in image.ListFields()}


async def _until(condition: object, what: str, seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.05)):
        if condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not reached in {seconds} s: {what}")


async def test_the_same_bytes_are_stored_once_and_no_answer_says_so(tmp_path: Path) -> None:
    data = os.urandom(6 * MiB) + bytes(2 * MiB) + os.urandom(5)
    async with serving(_settings(tmp_path)) as s:
        alpha, beta = s.md("alpha"), s.md("beta")
        catalog = set(chunk_store.all_chunk_files(tmp_path))  # the public images' chunks
        first = await dp.upload(s.images, alpha, await _created(s.images, alpha, "a"), data)
        chunks = chunk_store.all_chunk_files(tmp_path)
        second = await dp.upload(s.images, beta, await _created(s.images, beta, "b"), data)
        assert chunk_store.all_chunk_files(tmp_path) == chunks, "no chunk stored twice"
        new = set(chunks) - catalog
        assert len(new) == 7, "6 random chunks and the tail's; zeros are not stored"
        # The second project's answer is the first's but for its own fields.
        assert _fields(first) == _fields(second)
        for field in ("size_bytes", "sha256", "status", "disk_format", "uploaded_bytes"):
            assert getattr(first, field) == getattr(second, field), field
        assert await dp.download_verified(s.images, beta, second.name) == data
        assert await dp.download_verified(s.images, alpha, first.name) == data


async def test_a_damaged_chunk_is_data_loss_and_no_bad_byte_is_sent(tmp_path: Path) -> None:
    data = os.urandom(5 * MiB)
    async with serving(_settings(tmp_path)) as s:
        md = s.md("alpha")
        image = await dp.upload(s.images, md, await _created(s.images, md, "a"), data)
        chunk_store.damage_bytes(tmp_path, image.name, offset=3 * MiB + 10)
        received = bytearray()
        stream = s.images.DownloadImageData(
            image_pb2.DownloadImageDataRequest(name=image.name), metadata=md
        )

        async def read_all() -> None:
            async for reply in stream:
                received.extend(reply.chunk)

        error = await expect_error(read_all(), grpc.StatusCode.DATA_LOSS, "IMAGE_DATA_DAMAGED")
        assert image.name in error.message and f"offset {3 * MiB}" in error.message
        assert bytes(received) == data[: len(received)], "what came is the image's"
        assert len(received) <= 3 * MiB, "nothing of the damaged chunk or after it"


async def test_a_replica_shares_chunks_and_deleted_images_free_them(tmp_path: Path) -> None:
    data = os.urandom(4 * MiB)
    async with serving(_settings(tmp_path)) as s:
        owner, other = s.md("alpha"), s.md("beta")
        catalog = chunk_store.all_chunk_files(tmp_path)  # the public images' chunks
        sharing = sharing_pb2_grpc.SharingServiceStub(s.channel)
        image = await dp.upload(s.images, owner, await _created(s.images, owner, "a"), data)
        await sharing.CreateImageMember(
            sharing_pb2.CreateImageMemberRequest(
                parent=image.name, member=sharing_pb2.ImageMember(member_project="beta")
            ),
            metadata=owner,
        )
        await sharing.UpdateImageMember(
            sharing_pb2.UpdateImageMemberRequest(
                member=sharing_pb2.ImageMember(
                    name=f"{image.name}/members/beta", status=sharing_pb2.MEMBER_STATUS_ACCEPTED
                ),
                update_mask={"paths": ["status"]},
            ),
            metadata=other,
        )
        chunks = chunk_store.all_chunk_files(tmp_path)
        replica = await sharing.ReplicateImage(
            sharing_pb2.ReplicateImageRequest(name=image.name), metadata=other
        )
        assert chunk_store.all_chunk_files(tmp_path) == chunks, "a replica copies no bytes"
        await s.images.DeleteImage(image_pb2.DeleteImageRequest(name=image.name), metadata=owner)
        await asyncio.sleep(0.5)  # several sweeps
        assert chunk_store.all_chunk_files(tmp_path) == chunks, "the replica still holds them"
        assert await dp.download_verified(s.images, other, replica.name) == data
        await s.images.DeleteImage(image_pb2.DeleteImageRequest(name=replica.name), metadata=other)
        await _until(
            lambda: chunk_store.all_chunk_files(tmp_path) == catalog, "the chunks are freed"
        )
