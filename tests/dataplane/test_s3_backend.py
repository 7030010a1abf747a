"""The data plane on the S3 backend: the service configured with
BMS_IMAGE_BLOB_BACKEND=s3 against a real S3 protocol server (moto) on
loopback, through the same gRPC calls as on local files."""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path

import dataplane_support as dp
import grpc
import pytest

from bms.image.v1 import image_pb2
from bms_image.images.adapters.blobs.s3 import S3BlobStore
from bms_image.images.adapters.chunks.s3 import S3ChunkObjects
from support import chunk_store
from support.builders import random_bytes, sha256_hex
from support.services import fresh_project


def _s3_settings(endpoint: str) -> dict[str, object]:
    return {
        "blob_backend": "s3",
        "s3_endpoint_url": endpoint,
        "s3_bucket": f"svc-{uuid.uuid4().hex[:12]}",
        "s3_access_key": "testing",
        "s3_secret_key": "testing",
    }


def _s3_store(endpoint: str, bucket: str) -> S3BlobStore:
    return S3BlobStore(bucket, endpoint_url=endpoint, access_key="testing", secret_key="testing")


async def _object_keys(endpoint: str, bucket: str) -> list[str]:
    """The whole blobs' keys in the bucket."""
    async with _s3_store(endpoint, bucket) as store:
        return await store.keys()


async def _chunk_objects(endpoint: str, bucket: str) -> set[str]:
    """The names of the chunk objects in the bucket."""
    async with _s3_store(endpoint, bucket) as store:
        return set(await S3ChunkObjects(store).names())


@pytest.mark.parametrize("size", [1, 1024 * 1024 - 1, 1024 * 1024 + 1, 6 * 1024 * 1024 + 7])
async def test_round_trip_on_s3(
    tmp_path: Path, s3_endpoint: str, isolated_aws_config: None, size: int
) -> None:
    settings = _s3_settings(s3_endpoint)
    async with dp.own_service(tmp_path, **settings) as own:
        alpha = own.metadata(fresh_project("alpha"))
        created = await dp.create_image(own.images, alpha)
        content = random_bytes(size)
        uploaded = await dp.upload(own.images, alpha, created.name, content)
        assert uploaded.status == image_pb2.IMAGE_STATUS_ACTIVE
        assert (uploaded.size_bytes, uploaded.sha256) == (size, sha256_hex(content))
        got = await dp.download_verified(own.images, alpha, created.name)
        assert got == content
        image_id = created.name.removeprefix("images/")
        bucket = str(settings["s3_bucket"])
        assert chunk_store.stored(tmp_path, created.name)
        chunks = chunk_store.object_names(tmp_path, created.name)
        assert chunks, "random bytes have chunks"
        assert chunks <= await _chunk_objects(s3_endpoint, bucket), "chunks not in S3"
        assert not list((tmp_path / "blobs").glob("*.blob")), "bytes went to local files"
        assert chunk_store.all_chunk_files(tmp_path) == [], "bytes went to local files"
        assert image_id not in await _object_keys(s3_endpoint, bucket), "stored whole"

        await own.images.DeleteImage(
            image_pb2.DeleteImageRequest(name=created.name), metadata=alpha
        )
        assert not chunk_store.stored(tmp_path, created.name)
        assert image_id not in await _object_keys(s3_endpoint, bucket)
        # The next collection frees its chunks (its own: random bytes).
        async with _s3_store(s3_endpoint, bucket) as store:
            await chunk_store.collect(tmp_path, objects=S3ChunkObjects(store), later=timedelta(0))
        assert chunks & await _chunk_objects(s3_endpoint, bucket) == set()


async def test_checksum_mismatch_on_s3_leaves_no_object(
    tmp_path: Path, s3_endpoint: str, isolated_aws_config: None
) -> None:
    settings = _s3_settings(s3_endpoint)
    async with dp.own_service(tmp_path, **settings) as own:
        alpha = own.metadata(fresh_project("alpha"))
        created = await dp.create_image(own.images, alpha)
        await dp.expect_error(
            dp.upload(own.images, alpha, created.name, random_bytes(5000), sha256="0" * 64),
            grpc.StatusCode.DATA_LOSS,
        )
        catalog_keys = await _object_keys(s3_endpoint, str(settings["s3_bucket"]))
        assert created.name.removeprefix("images/") not in catalog_keys
        assert not chunk_store.stored(tmp_path, created.name)
        assert chunk_store.staged(tmp_path, created.name) is None, "the staged chunks stayed"
        # The staged chunk was stored as it arrived; the killed image dropped its
        # reference, and the next collection frees it.
        async with _s3_store(s3_endpoint, str(settings["s3_bucket"])) as store:
            await chunk_store.collect(tmp_path, objects=S3ChunkObjects(store), later=timedelta(0))
        # Every chunk object is one of the stored images' (the catalog's).
        stored = set[str]().union(
            *[
                chunk_store.object_names(tmp_path, key)
                for key in await chunk_store.complete_keys(tmp_path)
            ]
        )
        assert await _chunk_objects(s3_endpoint, str(settings["s3_bucket"])) == stored
