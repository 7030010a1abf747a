"""Blob store fixtures: every contract test runs against LocalBlobStore in a
temporary directory and against S3BlobStore talking to a real S3 protocol
server (moto in server mode, in a thread, on a loopback port)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bms_image.images.adapters.blobs.local import LocalBlobStore
from bms_image.images.adapters.blobs.s3 import MIN_PART_BYTES, S3BlobStore
from bms_image.images.adapters.blobs.store import BlobStore

#: Small enough to keep the tests fast, and S3's minimum part size, so that a
#: file of a few parts really is a multipart upload.
PART_BYTES = MIN_PART_BYTES


@pytest.fixture
async def s3_store(s3_endpoint: str, isolated_aws_config: None) -> AsyncIterator[S3BlobStore]:
    """An open S3BlobStore on a fresh bucket of its own."""
    store = S3BlobStore(
        f"test-{uuid.uuid4().hex[:16]}",
        endpoint_url=s3_endpoint,
        region="us-east-1",
        access_key="testing",
        secret_key="testing",
        prefix="images/",
        part_bytes=PART_BYTES,
    )
    async with store:
        await store.ensure_bucket()
        yield store


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    """Each backend in turn, empty. (A plain fixture: it asks for the async
    s3_store only when the S3 backend's turn comes.)"""
    if request.param == "local":
        return LocalBlobStore(tmp_path / "blobs")
    s3_store: S3BlobStore = request.getfixturevalue("s3_store")
    return s3_store
