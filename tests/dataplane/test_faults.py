"""Faults of the storage the data plane stands on get the right code, keep the
upload resumable, leak nothing and tell no internals (issue 14, item 7):

- a full file system (a real, tiny tmpfs: ENOSPC) under the staging area
  (a conversion's scratch space) or the blob store -> RESOURCE_EXHAUSTED
  STORAGE_FULL with a QuotaFailure that names the storage, never a path; the
  image stays QUEUED with the durable bytes; no descriptor is left open;
- an S3 store that stops answering -> UNAVAILABLE (retryable), the same
  upload retried once it is back (its bytes are staged in the store, so none
  were kept); no botocore text, endpoint or key reaches
  a message or a status_reason; health turns NOT_SERVING.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import dataplane_support as dp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from moto.server import ThreadedMotoServer

from bms.image.v1 import image_pb2, sharing_pb2, sharing_pb2_grpc
from support import chunk_store
from support.builders import MiB, random_bytes
from support.disks import remount, tmpfs
from support.errors import RichError, expect_error
from support.processes import free_port
from support.services import fresh_project
from support.tokens import Metadata

RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
IMAGE_SERVICE = "bms.image.v1.ImageService"


def descriptors_under(directory: Path) -> list[str]:
    """The files under `directory` this process holds open."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile (the listing's own descriptor)
        if target.startswith(str(directory)):
            found.append(target)
    return found


def open_descriptors() -> int:
    """Descriptors this process holds open, but for the database's (its
    pool of reading threads opens a connection per thread as it grows)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        count += not target.endswith((".db", ".db-wal", ".db-shm"))
    return count


def assert_no_internals(text: str, *internals: str) -> None:
    for internal in ("Traceback", "botocore", "Errno", "[Errno", *internals):
        assert internal not in text, f"{internal!r} leaked into {text!r}"


@asynccontextmanager
async def tiny_storage(
    tmp_path: Path, folder: Path, size: int
) -> AsyncIterator[tuple[dp.OwnService, Metadata, image_pb2.Image]]:
    """A service on `tmp_path` whose `folder` is a tmpfs of `size` bytes,
    the metadata of a project of its own and a new image of that project."""
    async with dp.own_service(tmp_path) as own:
        with tmpfs(folder, size):
            alpha = own.metadata(fresh_project("full"))
            yield own, alpha, await dp.create_image(own.images, alpha)


async def storage_full(
    own: dp.OwnService, metadata: Metadata, name: str, content: bytes, subject: str
) -> RichError:
    """An upload of `content` refused as RESOURCE_EXHAUSTED STORAGE_FULL, its
    QuotaFailure naming the storage `subject` and its message no path."""
    refused = await expect_error(
        dp.upload(own.images, metadata, name, content), RESOURCE_EXHAUSTED, "STORAGE_FULL"
    )
    assert refused.quota_failure is not None
    assert [v.subject for v in refused.quota_failure.violations] == [subject]
    assert_no_internals(refused.message, str(own.data_dir))
    return refused


@dp.needs_qemu_img
async def test_a_full_staging_area_refuses_only_a_conversion_and_keeps_every_byte(
    tmp_path: Path,
) -> None:
    """Uploads are staged in the chunk store: a full local staging area (the
    conversions' scratch space) does not stop a raw upload. A qcow2 upload
    is staged whole, then its conversion finds no room: STORAGE_FULL, and
    every uploaded byte stays staged, so that once there is room a resume
    with no more bytes finishes it."""
    staging = tmp_path / "staging"
    source = tmp_path / "disk.raw"
    disk = random_bytes(6 * MiB)
    source.write_bytes(disk)
    dp.qemu_img("convert", "-f", "raw", "-O", "qcow2", str(source), str(tmp_path / "disk.qcow2"))
    qcow2 = (tmp_path / "disk.qcow2").read_bytes()
    async with tiny_storage(tmp_path, staging, 4 * MiB) as (own, alpha, created):
        raw = await dp.upload(own.images, alpha, created.name, disk)
        assert raw.status == dp.ACTIVE, dp.status_name(raw.status)

        converted = await dp.create_image(own.images, alpha)
        refused = await storage_full(own, alpha, converted.name, qcow2, "storage/staging-area")
        # Once more, resumed with no more bytes: nothing leaks from one to the next
        # (the first may have opened the service's pools' connections).
        descriptors = open_descriptors()
        await expect_error(
            dp.resume_upload(own.images, alpha, converted.name, qcow2, len(qcow2)),
            RESOURCE_EXHAUSTED,
            "STORAGE_FULL",
        )

        image = await dp.wait_for_image(own.images, alpha, converted.name, dp.QUEUED)
        assert image.uploaded_bytes == len(qcow2), "every uploaded byte stays staged"
        assert refused.info.metadata["uploaded_bytes"] == str(len(qcow2))
        assert dp.staged(tmp_path, converted.name) == qcow2
        assert_no_internals(image.status_reason, str(tmp_path))
        assert shutil.disk_usage(staging).used == 0, "a partial scratch file holds the space"
        assert descriptors_under(staging) == [], "a scratch file was left open"
        assert open_descriptors() <= descriptors

        remount(staging, 64 * MiB)  # an operator makes room
        resumed = await dp.resume_upload(own.images, alpha, converted.name, qcow2, len(qcow2))
        assert resumed.status == dp.ACTIVE, dp.status_name(resumed.status)
        assert await dp.download_verified(own.images, alpha, converted.name) == disk
        dp.assert_only_stored(tmp_path, converted.name)


async def test_a_full_blob_store_gives_storage_full_and_the_upload_resumes(
    tmp_path: Path,
) -> None:
    """Staged chunks go to the blob store as they arrive: when it fills up,
    the upload keeps the batches that were stored, a prefix of whole chunks,
    and resumes from there once there is room."""
    blobs = chunk_store.chunks_root(tmp_path)  # where the image store writes bytes
    async with tiny_storage(tmp_path, blobs, 10 * MiB) as (own, alpha, created):
        content = random_bytes(24 * MiB + 5)

        refused = await storage_full(own, alpha, created.name, content, "storage/image-store")

        image = await dp.wait_for_image(own.images, alpha, created.name, dp.QUEUED)
        kept = image.uploaded_bytes
        assert kept % (8 * MiB) == 0 and kept < len(content), "whole batches only"
        assert refused.info.metadata["uploaded_bytes"] == str(kept)
        assert dp.staged(tmp_path, created.name) == content[:kept], "no partial chunk, no zeros"
        assert dp.temp_blobs(tmp_path) == [], "a partial copy holds the space"
        assert descriptors_under(blobs) == []
        assert not chunk_store.stored(tmp_path, created.name)

        remount(blobs, 64 * MiB)  # an operator makes room
        resumed = await dp.resume_upload(own.images, alpha, created.name, content, kept)
        await dp.assert_stored(own.images, alpha, resumed, content)


# -- an S3 store that goes away -------------------------------------------------


@pytest.fixture
def moto_port() -> Iterator[int]:
    """A port for an S3 server of the test's own (it stops and starts it)."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    yield free_port()


def start_moto(port: int) -> ThreadedMotoServer:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server


async def image_health(own: dp.OwnService) -> int:
    answer = await health_pb2_grpc.HealthStub(own.channel).Check(
        health_pb2.HealthCheckRequest(service=IMAGE_SERVICE), timeout=10
    )
    return int(answer.status)


@pytest.mark.timeout(600)
async def test_an_unreachable_s3_store_is_unavailable_and_tells_no_internals(
    tmp_path: Path, moto_port: int, isolated_aws_config: None
) -> None:
    endpoint = f"http://127.0.0.1:{moto_port}"
    bucket = f"faults-{uuid.uuid4().hex[:12]}"
    moto = start_moto(moto_port)
    try:
        async with dp.own_service(
            tmp_path,
            blob_backend="s3",
            s3_endpoint_url=endpoint,
            s3_bucket=bucket,
            s3_access_key="testing",
            s3_secret_key="testing",
            s3_max_attempts=2,  # each refused request is retried once, not four times
        ) as own:
            alpha_project, beta_project = fresh_project("alpha"), fresh_project("beta")
            alpha, beta = own.metadata(alpha_project), own.metadata(beta_project)
            sharing = sharing_pb2_grpc.SharingServiceStub(own.channel)
            stored = await dp.create_image(own.images, alpha)
            stored_content = random_bytes(100_000)
            stored = await dp.upload(own.images, alpha, stored.name, stored_content)
            await sharing.CreateImageMember(
                sharing_pb2.CreateImageMemberRequest(
                    parent=stored.name, member=sharing_pb2.ImageMember(member_project=beta_project)
                ),
                metadata=alpha,
            )
            await sharing.UpdateImageMember(
                sharing_pb2.UpdateImageMemberRequest(
                    member=sharing_pb2.ImageMember(
                        name=f"{stored.name}/members/{beta_project}",
                        status=sharing_pb2.MEMBER_STATUS_ACCEPTED,
                    ),
                    update_mask={"paths": ["status"]},
                ),
                metadata=beta,
            )
            pending = await dp.create_image(own.images, alpha)
            content = random_bytes(200_000)
            moto.stop()
            internals = (endpoint, f"127.0.0.1:{moto_port}", bucket, "Endpoint", "http")

            refused = await expect_error(
                dp.upload(own.images, alpha, pending.name, content),
                UNAVAILABLE,
                "BLOB_STORE_UNAVAILABLE",
            )
            assert_no_internals(refused.message, *internals)
            image = await dp.wait_for_image(own.images, alpha, pending.name, dp.QUEUED)
            # Uploads are staged in the store itself: none of its bytes could be
            # made durable, and the image says so (a retry starts at 0).
            assert image.uploaded_bytes == 0, "bytes the store never took were counted"
            assert refused.info.metadata["uploaded_bytes"] == "0"
            assert_no_internals(image.status_reason, *internals)

            unread = await expect_error(
                dp.download_all(own.images, alpha, stored.name),
                UNAVAILABLE,
                "BLOB_STORE_UNAVAILABLE",
            )
            assert_no_internals(unread.message, *internals)

            # A replica is a manifest naming the same chunks: it needs no
            # byte from the store, so it is made (ACTIVE, the source's size
            # and digest); reading it is UNAVAILABLE as the source is.
            replica = await sharing.ReplicateImage(
                sharing_pb2.ReplicateImageRequest(name=stored.name), metadata=beta
            )
            assert replica.status == dp.ACTIVE, dp.status_name(replica.status)
            assert (replica.size_bytes, replica.sha256) == (stored.size_bytes, stored.sha256)
            unread = await expect_error(
                dp.download_all(own.images, beta, replica.name),
                UNAVAILABLE,
                "BLOB_STORE_UNAVAILABLE",
            )
            assert_no_internals(unread.message, *internals)
            killed = await own.images.ListImages(
                image_pb2.ListImagesRequest(filter="status = killed"), metadata=beta
            )
            assert list(killed.images) == []

            failing = await own.service.monitor.check_once()
            assert "blob store" in failing
            assert await image_health(own) == health_pb2.HealthCheckResponse.NOT_SERVING

            moto = start_moto(moto_port)  # back, with its buckets (moto keeps them in memory)
            resumed = await dp.resume_upload(own.images, alpha, pending.name, content, 0)
            await dp.assert_stored(own.images, alpha, resumed, content)
            assert await dp.download_verified(own.images, beta, replica.name) == stored_content
            await own.service.monitor.check_once()
            assert await image_health(own) == health_pb2.HealthCheckResponse.SERVING
    finally:
        moto.stop()


# -- quota (EDQUOT) and a failed fsync, injected at the file-write seam ----------


async def test_a_full_quota_and_a_failed_fsync_keep_only_durable_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EDQUOT is STORAGE_FULL as ENOSPC is. A batch of chunks counts only
    once every chunk of it is durable: when a write or the fsync that makes
    it durable fails, the offset stays at the batches stored before it,
    never further."""
    async with dp.own_service(tmp_path) as own:
        alpha = own.metadata(fresh_project("quota"))
        created = await dp.create_image(own.images, alpha)
        content = random_bytes(20 * MiB)
        allowed = 8 * MiB + 7  # the first batch of chunks fits, no more
        real_write, real_fsync = os.write, os.fsync
        written = 0

        def write(fd: int, data: bytes | memoryview) -> int:
            nonlocal written
            if written + len(data) > allowed:  # the project's disk quota is reached
                raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
            written += len(data)
            return real_write(fd, data)

        monkeypatch.setattr(os, "write", write)
        quota = await expect_error(
            dp.upload(own.images, alpha, created.name, content), RESOURCE_EXHAUSTED, "STORAGE_FULL"
        )
        monkeypatch.setattr(os, "write", real_write)
        queued = await dp.wait_for_image(own.images, alpha, created.name, dp.QUEUED)
        kept = queued.uploaded_bytes
        assert kept in (0, 8 * MiB), "only whole batches count"
        assert quota.info.metadata["uploaded_bytes"] == str(kept)
        assert dp.staged(tmp_path, created.name) == content[:kept]

        def fsync(fd: int) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "fsync", fsync)
        await expect_error(
            dp.resume_upload(own.images, alpha, created.name, content, kept),
            RESOURCE_EXHAUSTED,
            "STORAGE_FULL",
        )
        monkeypatch.setattr(os, "fsync", real_fsync)
        queued = await dp.wait_for_image(own.images, alpha, created.name, dp.QUEUED)
        assert queued.uploaded_bytes == kept, "bytes whose fsync failed were counted"
        assert dp.staged(tmp_path, created.name) == content[:kept]
        assert dp.temp_blobs(tmp_path) == []

        resumed = await dp.resume_upload(own.images, alpha, created.name, content, kept)
        await dp.assert_stored(own.images, alpha, resumed, content)
