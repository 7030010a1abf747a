"""The image service's data plane and catalog use cases (ImageData,
ImageCatalog.delete, Sharing.replicate) over fakes of their ports: no gRPC
server, no database, no blob store."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from unit_fakes import ALPHA, BETA, FLAVORS, InMemoryImages, make_image

from bms_image.common.errors import (
    DataLoss,
    FailedPrecondition,
    QuotaExceeded,
    storage_full,
)
from bms_image.common.flavors import FlavorCatalog
from bms_image.common.model import Caller, DiskFormat, Image, ImageStatus, MemberStatus
from bms_image.common.paging import PageTokens
from bms_image.images.domain.imagedata import ImageData, UploadDeclaration, release_image_bytes
from bms_image.images.domain.images import ImageCatalog
from bms_image.images.domain.sharing import Sharing
from support.fakes import (
    FakeBlobStore,
    FakeInspector,
    FakeMembers,
    FakeRelease,
    FakeStaging,
)

IMAGE_ID = "11111111-1111-4111-8111-111111111111"
DATA = bytes(range(256)) * 64  # 16 KiB


class World:
    def __init__(self, root: Path) -> None:
        self.images = InMemoryImages()
        self.members = FakeMembers()
        self.blobs = FakeBlobStore()
        self.staging = FakeStaging(root / "staging", self.blobs)
        self.inspector = FakeInspector()
        self.release = FakeRelease()
        tokens = PageTokens(b"k" * 32)
        self.catalog = ImageCatalog(
            self.images,
            FlavorCatalog(FLAVORS),
            tokens,
            release_data=self.release,
            members=self.members,
        )
        self.data = ImageData(
            self.catalog, self.images, self.staging, self.blobs, self.inspector, chunk_bytes=4096
        )
        self.sharing = Sharing(self.catalog, self.images, self.members, self.blobs, tokens, 16)

    async def queued(self, **overrides: object) -> Image:
        values: dict[str, object] = {"id": IMAGE_ID, "status": ImageStatus.QUEUED}
        values.update(overrides)
        return await self.images.create_private(make_image(**values), quota_limit=50)

    async def stored(self, image_id: str = IMAGE_ID) -> Image:
        image = await self.images.get(image_id)
        assert image is not None
        return image

    async def download(self, caller: Caller, image_id: str = IMAGE_ID, offset: int = 0) -> bytes:
        _, chunks = await self.data.open_download(caller, image_id, offset)
        return b"".join([chunk async for chunk in chunks])


async def chunks_of(data: bytes, size: int = 4096) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


async def test_an_upload_is_verified_stored_and_downloaded_again(world: World) -> None:
    await world.queued()
    declared = UploadDeclaration(size_bytes=len(DATA), sha256=hashlib.sha256(DATA).hexdigest())
    active = await world.data.upload(ALPHA, IMAGE_ID, declared, chunks_of(DATA))

    assert active.status is ImageStatus.ACTIVE
    assert (active.size_bytes, active.sha256) == (len(DATA), declared.sha256)
    assert world.blobs.blobs[IMAGE_ID] == DATA
    assert await world.staging.keys() == [], "the staged bytes are dropped once stored"
    assert world.inspector.inspected == [f"images/{IMAGE_ID}"]
    assert await world.download(ALPHA) == DATA
    assert await world.download(ALPHA, offset=len(DATA) - 10) == DATA[-10:]


async def test_a_wrong_checksum_kills_the_image_and_drops_its_bytes(world: World) -> None:
    await world.queued()
    declared = UploadDeclaration(sha256="0" * 64)
    with pytest.raises(DataLoss) as caught:
        await world.data.upload(ALPHA, IMAGE_ID, declared, chunks_of(DATA))
    assert caught.value.reason == "IMAGE_CHECKSUM_MISMATCH"
    image = await world.stored()
    assert (image.status, image.uploaded_bytes) == (ImageStatus.KILLED, 0)
    assert await world.staging.keys() == [] and world.blobs.blobs == {}
    assert all(staged.closed for staged in world.staging.opened)


async def test_unsafe_content_kills_the_image(world: World) -> None:
    await world.queued()
    world.inspector.refuse = True
    with pytest.raises(FailedPrecondition) as caught:
        await world.data.upload(ALPHA, IMAGE_ID, UploadDeclaration(), chunks_of(DATA))
    assert caught.value.reason == "IMAGE_UNSAFE"
    assert (await world.stored()).status is ImageStatus.KILLED


async def test_a_converted_upload_stores_the_raw_bytes_and_their_digest(world: World) -> None:
    await world.queued()
    world.inspector.disk_format = DiskFormat.QCOW2
    active = await world.data.upload(ALPHA, IMAGE_ID, UploadDeclaration(), chunks_of(DATA))
    raw = b"raw:" + DATA  # what the fake converter writes
    assert world.blobs.blobs[IMAGE_ID] == raw
    assert (active.disk_format, active.size_bytes, active.sha256) == (
        DiskFormat.QCOW2,
        len(raw),
        hashlib.sha256(raw).hexdigest(),
    )


async def test_a_full_staging_area_keeps_what_was_durable_for_a_resume(world: World) -> None:
    await world.queued()
    world.staging.write_error = storage_full("staging area")
    with pytest.raises(QuotaExceeded) as caught:
        await world.data.upload(ALPHA, IMAGE_ID, UploadDeclaration(), chunks_of(DATA))
    assert caught.value.reason == "STORAGE_FULL"
    assert "resume with metadata.offset = 0" in caught.value.message
    assert caught.value.metadata["uploaded_bytes"] == "0"
    image = await world.stored()
    assert (image.status, image.uploaded_bytes) == (ImageStatus.QUEUED, 0)


async def test_a_resume_continues_from_the_staged_bytes_only(world: World) -> None:
    await world.queued(uploaded_bytes=1000)
    world.staging.put(IMAGE_ID, DATA[:600])  # the staging area lost 400 bytes
    with pytest.raises(FailedPrecondition) as caught:
        await world.data.upload(
            ALPHA, IMAGE_ID, UploadDeclaration(offset=1000), chunks_of(DATA[1000:])
        )
    assert caught.value.reason == "UPLOAD_OFFSET_MISMATCH"
    assert caught.value.metadata == {"uploaded_bytes": "600"}
    image = await world.stored()
    assert (image.status, image.uploaded_bytes) == (ImageStatus.QUEUED, 600)

    resumed = await world.data.upload(
        ALPHA, IMAGE_ID, UploadDeclaration(offset=600), chunks_of(DATA[600:])
    )
    assert resumed.sha256 == hashlib.sha256(DATA).hexdigest(), "the digest spans both halves"
    assert world.blobs.blobs[IMAGE_ID] == DATA


async def test_missing_stored_bytes_are_data_loss(world: World) -> None:
    await world.images.create_private(
        make_image(id=IMAGE_ID, size_bytes=len(DATA), sha256="a" * 64), quota_limit=50
    )
    with pytest.raises(DataLoss) as caught:
        await world.download(ALPHA)
    assert caught.value.reason == "IMAGE_DATA_MISSING"
    assert world.data.downloads.used("alpha") == 0, "the slot is given back"


async def test_recovery_makes_uploads_resumable_and_removes_orphans(world: World) -> None:
    await world.queued(status=ImageStatus.SAVING)
    world.staging.put(IMAGE_ID, DATA[:700])
    world.blobs.blobs["99999999-9999-4999-8999-999999999999"] = b"nobody's"
    report = await world.data.recover()
    assert report == {"resumable": 1, "failed": 0, "orphans": 1}
    image = await world.stored()
    assert (image.status, image.uploaded_bytes) == (ImageStatus.QUEUED, 700)
    assert world.blobs.blobs == {}
    assert await world.staging.size(IMAGE_ID) == 700, "the staged bytes stay for the resume"


async def test_deleting_an_image_releases_its_bytes(world: World) -> None:
    await world.images.create_private(make_image(id=IMAGE_ID), quota_limit=50)
    await world.catalog.delete(ALPHA, IMAGE_ID)
    assert world.release.released == [IMAGE_ID]
    assert (await world.stored()).status is ImageStatus.DELETED


async def test_release_image_bytes_removes_the_blob_and_the_staged_upload(world: World) -> None:
    world.blobs.blobs[IMAGE_ID] = DATA
    world.staging.put(IMAGE_ID, DATA[:10])
    await release_image_bytes(world.blobs, world.staging, IMAGE_ID)
    assert world.blobs.blobs == {} and await world.staging.keys() == []


async def test_a_replica_copies_the_blob_of_an_accepted_share(world: World) -> None:
    await world.images.create_private(
        make_image(id=IMAGE_ID, size_bytes=len(DATA), sha256=hashlib.sha256(DATA).hexdigest()),
        quota_limit=50,
    )
    world.blobs.blobs[IMAGE_ID] = DATA
    await world.members.add(IMAGE_ID, "beta", 16)
    with pytest.raises(FailedPrecondition):
        await world.sharing.replicate(BETA, IMAGE_ID)  # still pending
    await world.members.set_status(IMAGE_ID, "beta", MemberStatus.ACCEPTED)
    replica = await world.sharing.replicate(BETA, IMAGE_ID)
    assert replica.owner_project == "beta" and replica.status is ImageStatus.ACTIVE
    assert world.blobs.blobs[replica.id] == DATA
    assert await world.download(BETA, replica.id) == DATA
