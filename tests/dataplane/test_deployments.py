"""Each deployment sweeps only what it wrote (issue 14, item 7). A
deployment is one database (with all its replicas); at its first start it
marks the blob store's prefix (or directory) as its own, and a deployment
that finds the mark of another refuses to start, naming the setting to
change, instead of deleting the other's blobs as orphans. A store from
before marks is claimed by the first deployment that starts on it. At start,
multipart uploads a crash left under the prefix are aborted, not others'."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import dataplane_support as dp
import pytest

from bms_image.images.adapters.blobs.s3 import S3BlobStore
from bms_image.images.adapters.blobs.store import DEPLOYMENT_MARKER
from bms_image.images.adapters.chunks.s3 import S3ChunkObjects
from bms_image.processes import start
from support import chunk_store
from support.builders import random_bytes
from support.services import fresh_project, make_settings


def s3_settings(endpoint: str, bucket: str, **overrides: Any) -> dict[str, Any]:
    return {
        "blob_backend": "s3",
        "s3_endpoint_url": endpoint,
        "s3_bucket": bucket,
        "s3_access_key": "testing",
        "s3_secret_key": "testing",
        **overrides,
    }


def s3_store(endpoint: str, bucket: str, prefix: str = "images/") -> S3BlobStore:
    return S3BlobStore(
        bucket, endpoint_url=endpoint, access_key="testing", secret_key="testing", prefix=prefix
    )


async def test_a_second_deployment_on_the_same_prefix_refuses_to_start(
    tmp_path: Path, s3_endpoint: str, isolated_aws_config: None
) -> None:
    bucket = f"deploy-{uuid.uuid4().hex[:12]}"
    settings = s3_settings(s3_endpoint, bucket)
    async with dp.own_service(tmp_path / "first", **settings) as own:
        alpha = own.metadata(fresh_project("alpha"))
        created = await dp.create_image(own.images, alpha)
        content = random_bytes(70_000)
        await dp.upload(own.images, alpha, created.name, content)

    # Another database (another deployment) on the same bucket and prefix:
    # its orphan sweep would take the first one's image for its own orphan.
    with pytest.raises(RuntimeError, match="BMS_IMAGE_S3_PREFIX") as refused:
        await start(make_settings(tmp_path / "second", **settings))
    assert f"s3://{bucket}/images/" in str(refused.value)
    chunks = chunk_store.object_names(tmp_path / "first", created.name)
    assert chunks, "random bytes have chunks"
    async with s3_store(s3_endpoint, bucket) as store:
        assert chunks <= set(await S3ChunkObjects(store).names()), (
            "the second deployment deleted the first's chunks"
        )

    # With a prefix of its own it starts, and both keep their images.
    async with dp.own_service(tmp_path / "third", **settings, s3_prefix="other/") as other:
        beta = other.metadata(fresh_project("beta"))
        theirs = await dp.create_image(other.images, beta)
        await dp.upload(other.images, beta, theirs.name, random_bytes(1000))
    async with dp.own_service(tmp_path / "first", **settings) as again:
        assert await dp.download_verified(again.images, alpha, created.name) == content


async def test_a_prefix_from_before_marks_is_claimed_by_its_first_start(
    tmp_path: Path, s3_endpoint: str, isolated_aws_config: None
) -> None:
    bucket = f"deploy-{uuid.uuid4().hex[:12]}"
    async with s3_store(s3_endpoint, bucket) as store:
        await store.ensure_bucket()
        assert not [k async for k in _all_keys(store) if k.endswith(DEPLOYMENT_MARKER)]
    settings = s3_settings(s3_endpoint, bucket)
    async with dp.own_service(tmp_path / "old", **settings):
        pass
    async with dp.own_service(tmp_path / "old", **settings):
        pass  # its own mark: it starts again
    with pytest.raises(RuntimeError, match="another deployment"):
        await start(make_settings(tmp_path / "new", **settings))


async def _all_keys(store: S3BlobStore) -> Any:
    response = await store._s3.list_objects_v2(Bucket=store.bucket)
    for entry in response.get("Contents", []):
        yield str(entry["Key"])


async def test_a_start_aborts_the_uploads_a_crash_left_and_only_its_own(
    tmp_path: Path, s3_endpoint: str, isolated_aws_config: None
) -> None:
    bucket = f"deploy-{uuid.uuid4().hex[:12]}"
    left = str(uuid.uuid4())
    async with s3_store(s3_endpoint, bucket) as store:
        await store.ensure_bucket()
        for key in (f"images/{left}", f"images/deeper/{left}", f"elsewhere/{left}"):
            await store._s3.create_multipart_upload(Bucket=bucket, Key=key)
    settings = s3_settings(s3_endpoint, bucket, s3_abort_incomplete_after_seconds=0.0)
    async with dp.own_service(tmp_path, **settings):
        pass
    async with s3_store(s3_endpoint, bucket, prefix="") as everything:
        remaining = sorted(key for key, _ in await everything.incomplete_uploads())
    assert remaining == [f"elsewhere/{left}", f"images/deeper/{left}"]


async def test_a_second_deployment_on_the_same_blob_directory_refuses_to_start(
    tmp_path: Path,
) -> None:
    """The local backend too: two databases sharing one data directory."""
    first = {"database_url": f"sqlite:///{tmp_path / 'first.db'}"}
    async with dp.own_service(tmp_path, **first) as own:
        alpha = own.metadata(fresh_project("alpha"))
        created = await dp.create_image(own.images, alpha)
        content = random_bytes(10_000)
        await dp.upload(own.images, alpha, created.name, content)
    with pytest.raises(RuntimeError, match="BMS_IMAGE_DATA_DIR"):
        await start(make_settings(tmp_path, database_url=f"sqlite:///{tmp_path / 'second.db'}"))
    async with dp.own_service(tmp_path, **first) as again:
        assert await dp.download_verified(again.images, alpha, created.name) == content
