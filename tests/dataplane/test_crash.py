"""Crashes: `bms-image serve` killed with SIGKILL in the middle of an upload
comes back on the same data directory with the upload resumable (QUEUED,
`uploaded_bytes` = the bytes staged durably: whole batches of chunks; what
was in flight is lost, never turned into other bytes) and no half-written
blob; bytes no image owns are collected at start."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import dataplane_support as dp
import grpc
import pytest

from bms.image.v1 import image_pb2, image_pb2_grpc
from support import chunk_store
from support.builders import MiB, random_bytes, sha256_hex
from support.processes import ServeProcess


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[ServeProcess]:
    """A `bms-image serve` process on tmp_path/data (started by the test);
    if it is still running at the end it must stop cleanly on SIGTERM."""
    process = ServeProcess(tmp_path / "data")
    process.data_dir.mkdir()
    try:
        yield process
        assert process.stop() in (0, None), process.output()
    finally:
        process.kill()


async def assert_only_active_blobs(
    images: image_pb2_grpc.ImageServiceStub, metadata: tuple[tuple[str, str], ...], data_dir: Path
) -> None:
    """Every blob on disk (whole, of an earlier version) and every complete
    manifest belongs to an ACTIVE image the caller can see (its own or a
    public one), and no temporary file is left from a copy. Then, after one
    collection (once a killed process's puts count as abandoned): no pending
    manifest is left, every manifest's chunks are live with their files,
    the refs count the entries, and every chunk file belongs to a row.
    (Temporary files of chunk puts a SIGKILL cut off are no chunks: the
    sweep of orphans deletes them once an hour old, since another process
    on the same store may be writing its own.)"""
    assert sorted((data_dir / "blobs").glob(".tmp-*")) == []
    listed = await images.ListImages(
        image_pb2.ListImagesRequest(page_size=1000, filter="status = active"), metadata=metadata
    )
    active = {image.name.removeprefix("images/") for image in listed.images}
    on_disk = {p.name.removesuffix(".blob") for p in (data_dir / "blobs").glob("*.blob")}
    assert on_disk <= active, f"orphan blobs: {on_disk - active}"
    manifests = set(await chunk_store.complete_keys(data_dir))
    assert manifests <= active, f"orphan manifests: {manifests - active}"
    await chunk_store.collect(data_dir)
    assert await chunk_store.inconsistencies(data_dir) == []


@dataclass
class InFlight:
    """One upload the crash interrupts."""

    content: bytes
    sent: int
    name: str = ""
    call: Any = None


async def test_sigkill_with_uploads_in_flight(serve: ServeProcess) -> None:
    """One crash, several uploads: one half sent, one with every byte sent
    but the stream not yet closed, one of an image deleted meanwhile, and one
    broken off (resumable) before the crash. Bytes are durable a batch of
    8 chunks (8 MiB) at a time, and all of them when a stream ends: the
    crash keeps the first batch of the uploads in flight, and every byte of
    the one broken off before it."""
    data_dir = serve.data_dir
    batch = 8 * MiB
    uploads = {
        "half-sent": InFlight(random_bytes(24 * MiB + 3), 13 * MiB + 12_345),
        "all-sent": InFlight(random_bytes(10 * MiB + 12_345), 10 * MiB + 12_345),
        "deleted": InFlight(random_bytes(12 * MiB), 9 * MiB),
        "broken-before": InFlight(random_bytes(12 * MiB), 9 * MiB + 5),
    }
    durable = {"half-sent": batch, "all-sent": batch}
    serve.start()
    alpha = serve.metadata("alpha")
    more = asyncio.Event()

    async with grpc.aio.insecure_channel(serve.address) as channel:
        images = image_pb2_grpc.ImageServiceStub(channel)
        for label, upload_ in uploads.items():
            upload_.name = (await dp.create_image(images, alpha, display_name=label)).name
            upload_.call = images.UploadImageData(
                dp.paced_requests(upload_.name, upload_.content, upload_.sent, more)(),
                metadata=alpha,
            )
        for label, upload_ in uploads.items():
            await dp.wait_for_staged(data_dir, upload_.name, min(upload_.sent, batch), within=30)
            assert (await dp.get_image(images, alpha, upload_.name)).status == dp.SAVING, label

        broken = uploads["broken-before"]
        broken.call.cancel()
        for _ in range(250):
            image = await dp.get_image(images, alpha, broken.name)
            if image.status == dp.QUEUED:
                break
            await asyncio.sleep(0.02)
        # All it had taken in when it was cancelled (at least the first batch).
        assert image.status == dp.QUEUED
        assert batch <= image.uploaded_bytes <= broken.sent
        durable["broken-before"] = image.uploaded_bytes
        assert dp.staged(data_dir, broken.name) == broken.content[: image.uploaded_bytes]

        deleted = uploads["deleted"]
        await images.DeleteImage(image_pb2.DeleteImageRequest(name=deleted.name), metadata=alpha)
        assert dp.files_of(data_dir, deleted.name) == []

        serve.kill()
        for label in ("half-sent", "all-sent", "deleted"):
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await uploads[label].call
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, label

    serve.start()  # the same data directory, a new port
    async with grpc.aio.insecure_channel(serve.address) as channel:
        images = image_pb2_grpc.ImageServiceStub(channel)
        await dp.expect_error(dp.get_image(images, alpha, deleted.name), grpc.StatusCode.NOT_FOUND)
        assert dp.files_of(data_dir, deleted.name) == []
        await assert_only_active_blobs(images, alpha, data_dir)

        for label in ("half-sent", "all-sent", "broken-before"):
            upload_ = uploads[label]
            image = await dp.get_image(images, alpha, upload_.name)
            assert image.status == dp.QUEUED, (label, dp.status_name(image.status))
            assert image.uploaded_bytes == durable[label], label
            assert (image.size_bytes, image.sha256) == (0, ""), label
            if label != "broken-before":
                assert "restart" in image.status_reason, label
            staged = dp.staged(data_dir, upload_.name)
            assert staged == upload_.content[: durable[label]], label
            assert not chunk_store.stored(data_dir, upload_.name), label

            resumed = await dp.resume_upload(
                images, alpha, upload_.name, upload_.content, durable[label], chunk_sizes=[4 * MiB]
            )

            assert resumed.status == dp.ACTIVE, (label, dp.status_name(resumed.status))
            assert resumed.size_bytes == len(upload_.content), label
            assert resumed.sha256 == sha256_hex(upload_.content), label
            data = await dp.download_verified(images, alpha, upload_.name)
            assert data == upload_.content, label
            dp.assert_only_stored(data_dir, upload_.name)
        await assert_only_active_blobs(images, alpha, data_dir)


async def test_sigkill_while_bytes_are_flowing(serve: ServeProcess) -> None:
    """Killed at an arbitrary point of a fast stream: whatever was staged is
    a prefix of the content, and exactly that is reported and resumable."""
    content = random_bytes(40 * MiB)
    data_dir = serve.data_dir
    serve.start()
    alpha = serve.metadata("alpha")

    async with grpc.aio.insecure_channel(serve.address) as channel:
        images = image_pb2_grpc.ImageServiceStub(channel)
        created = await dp.create_image(images, alpha)

        async def requests() -> AsyncIterator[image_pb2.UploadImageDataRequest]:
            yield dp.upload_metadata(
                created.name, size_bytes=len(content), sha256=sha256_hex(content)
            )
            for piece in dp.split(content, [MiB - 1]):
                yield dp.chunk_message(piece)
                await asyncio.sleep(0.005)  # keep the stream going while the test kills

        call = images.UploadImageData(requests(), metadata=alpha)
        await dp.wait_for_staged(data_dir, created.name, 8 * MiB, within=30)
        serve.kill()
        with pytest.raises(grpc.aio.AioRpcError):
            await call

    staged_at_crash = chunk_store.staged_size(data_dir, created.name)
    assert staged_at_crash is not None and 8 * MiB <= staged_at_crash < len(content)

    serve.start()
    async with grpc.aio.insecure_channel(serve.address) as channel:
        images = image_pb2_grpc.ImageServiceStub(channel)
        image = await dp.get_image(images, alpha, created.name)
        assert image.status == dp.QUEUED, dp.status_name(image.status)
        assert image.uploaded_bytes == staged_at_crash
        offset = image.uploaded_bytes
        assert dp.staged(data_dir, created.name) == content[:offset]
        assert not chunk_store.stored(data_dir, created.name)

        resumed = await dp.resume_upload(
            images, alpha, created.name, content, offset, chunk_sizes=[4 * MiB]
        )
        assert (resumed.status, resumed.sha256) == (dp.ACTIVE, sha256_hex(content))
        await assert_only_active_blobs(images, alpha, data_dir)


# -- in-process restarts: collecting what no image owns -----------------------


async def test_restart_collects_bytes_no_image_owns(tmp_path: Path) -> None:
    data_dir = tmp_path
    async with dp.own_service(data_dir) as own:
        alpha = own.metadata("alpha")
        active = await dp.create_image(own.images, alpha, display_name="active")
        active_content = random_bytes(MiB + 1)
        await dp.upload(own.images, alpha, active.name, active_content)
        killed = await dp.create_image(own.images, alpha, display_name="killed")
        await dp.expect_error(
            dp.upload(own.images, alpha, killed.name, b"abc", sha256="0" * 64),
            grpc.StatusCode.DATA_LOSS,
        )
        queued = await dp.create_image(own.images, alpha, display_name="queued")
        deleted = await dp.create_image(own.images, alpha, display_name="deleted")
        await own.images.DeleteImage(
            image_pb2.DeleteImageRequest(name=deleted.name), metadata=alpha
        )

    # What a crash or an operator could leave behind.
    nobody = f"images/{uuid.uuid4()}"
    planted = {
        "unknown blob": chunk_store.whole_blob(data_dir, nobody),
        "unknown staged upload": dp.legacy_staging_file(data_dir, nobody),
        "temporary blob copy": data_dir / "blobs" / f".tmp-{uuid.uuid4().hex}",
        "killed image's blob": chunk_store.whole_blob(data_dir, killed.name),
        "killed image's staged upload": dp.legacy_staging_file(data_dir, killed.name),
        "deleted image's blob": chunk_store.whole_blob(data_dir, deleted.name),
        "deleted image's staged upload": dp.legacy_staging_file(data_dir, deleted.name),
        "queued image's blob": chunk_store.whole_blob(data_dir, queued.name),
        "active image's stale staged upload": dp.legacy_staging_file(data_dir, active.name),
    }
    for path in planted.values():
        path.write_bytes(random_bytes(4096))
    queued_prefix = random_bytes(10_000)
    dp.legacy_staging_file(data_dir, queued.name).write_bytes(queued_prefix)
    # The same in the chunk store: manifests (naming the active image's
    # chunks) of images that should have none, a put a killed process left,
    # a chunk file no row claims and an old temporary file of a put.
    manifests = {
        "unknown image's manifest": nobody,
        "killed image's manifest": killed.name,
        "deleted image's manifest": deleted.name,
        "queued image's manifest": queued.name,
    }
    for key in manifests.values():
        await chunk_store.plant_manifest(data_dir, active.name, key)
    abandoned = f"pending-{uuid.uuid4().hex}"
    await chunk_store.plant_manifest(
        data_dir, active.name, abandoned, pending_for=timedelta(hours=1)
    )
    planted["chunk file of no row"] = chunk_store.plant_orphan_chunk(data_dir)
    planted["old temporary chunk file"] = chunk_store.plant_stale_temp_chunk(data_dir)

    async with dp.own_service(data_dir) as own:
        stored = [what for what, key in manifests.items() if chunk_store.stored(data_dir, key)]
        assert stored == [], f"not released at start: {stored}"
        # The collector's first sweep runs at start, beside the service.
        deadline = time.monotonic() + 10
        while True:
            left = {what: path for what, path in planted.items() if path.exists()}
            pending = abandoned in chunk_store.manifest_keys(data_dir)
            if (not left and not pending) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert left == {}, f"not collected at start: {sorted(left)}"
        assert not pending, "the abandoned put's manifest outlived the first sweep"

        # The active image keeps its blob; the queued one keeps its staged bytes,
        # which become its uploaded_bytes.
        assert await dp.download_verified(own.images, alpha, active.name) == active_content
        image = await dp.get_image(own.images, alpha, queued.name)
        assert (image.status, image.uploaded_bytes) == (dp.QUEUED, len(queued_prefix))
        rest = random_bytes(5000)
        resumed = await dp.upload(
            own.images,
            alpha,
            queued.name,
            rest,
            offset=len(queued_prefix),
            size_bytes=len(queued_prefix) + len(rest),
            sha256=sha256_hex(queued_prefix + rest),
        )
        assert resumed.status == dp.ACTIVE
        staged = [k for k in chunk_store.manifest_keys(data_dir) if k.startswith("upload-")]
        assert staged == [], "the staging files were moved into the store, and released"
        assert (await dp.get_image(own.images, alpha, killed.name)).status == dp.KILLED
        await assert_only_active_blobs(own.images, alpha, data_dir)


@pytest.mark.parametrize("lost", ["manifest", "chunk files"])
async def test_restart_rebuilds_a_lost_public_blob(tmp_path: Path, lost: str) -> None:
    async with dp.own_service(tmp_path) as own:
        beta = own.metadata("beta")
        listed = await own.images.ListImages(
            image_pb2.ListImagesRequest(filter="type = public"), metadata=beta
        )
        public = listed.images[0]
    if lost == "manifest":
        await chunk_store.lose_manifest(tmp_path, public.name)
    else:
        chunk_store.lose_bytes(tmp_path, public.name)

    async with dp.own_service(tmp_path) as own:
        data = await dp.download_verified(own.images, beta, public.name)
        assert sha256_hex(data) == public.sha256
        assert len(data) == public.size_bytes
        assert chunk_store.stored(tmp_path, public.name)
