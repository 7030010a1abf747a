"""A shared image's life: share, accept, list, replicate, the owner deletes
the original, the replica lives on; stopping to share takes the image away
at once; replicating is idempotent per request_id."""

from __future__ import annotations

import uuid

import pytest
import sharing_support as sh

from bms.image.v1 import image_pb2, sharing_pb2
from support.errors import Code, expect_error, expect_invalid
from support.services import ImageStub, SharingStub
from support.tokens import Metadata

pytestmark = pytest.mark.asyncio(loop_scope="module")

service, channel = sh.shared_service_fixtures()

#: Several download chunks (the service sends 1 MiB ones) and an odd tail.
IMAGE_BYTES = 2 * 1024 * 1024 + 12_345


async def get_image(images: ImageStub, md: Metadata, name: str) -> image_pb2.Image:
    return await images.GetImage(image_pb2.GetImageRequest(name=name), metadata=md)


async def assert_gone_for(
    images: ImageStub, sharing: SharingStub, md: Metadata, project: str, name: str
) -> None:
    """The image is invisible to `project`, in every way it could look."""
    await expect_error(get_image(images, md, name), Code.NOT_FOUND, "IMAGE_NOT_FOUND")
    for filter_text in (
        "",
        "type = shared",
        *(f"member_status = {s}" for s in ("pending", "accepted", "rejected")),
    ):
        assert name not in await sh.names_listed(images, md, filter_text), filter_text
    error = await sh.download_error(images, md, name)
    assert error is not None
    assert (error.code, error.reason) == (Code.NOT_FOUND, "IMAGE_NOT_FOUND")
    await expect_error(sh.replicate(sharing, md, name), Code.NOT_FOUND, "IMAGE_NOT_FOUND")
    await expect_error(sh.answer(sharing, md, name, project, sh.ACCEPTED), Code.NOT_FOUND)
    await expect_error(
        sharing.ListImageMembers(sharing_pb2.ListImageMembersRequest(parent=name), metadata=md),
        Code.NOT_FOUND,
    )


async def test_share_accept_replicate_and_outlive_the_original(
    images: ImageStub, sharing: SharingStub, projects: sh.Projects
) -> None:
    alpha, beta = projects("alpha"), projects("beta")
    beta_project = projects.name("beta")
    original = await sh.create_active(
        images, alpha, size=IMAGE_BYTES, display_name="golden-web", tags=["web"]
    )

    # Share: beta sees it pending, may look but not use it.
    member = await sh.share(sharing, alpha, original.name, beta_project)
    assert member.status == sh.PENDING
    pending_view = await get_image(images, beta, original.name)
    assert (pending_view.type, pending_view.owner_project) == (sh.SHARED, projects.name("alpha"))
    assert original.name not in await sh.names_listed(images, beta)
    assert await sh.names_listed(images, beta, "member_status = pending") == [original.name]

    # Accept: listed as SHARED, downloadable, the same bytes.
    accepted = await sh.answer(sharing, beta, original.name, beta_project, sh.ACCEPTED)
    assert accepted.status == sh.ACCEPTED
    shared = await sh.list_images(images, beta, "type = shared")
    assert [i.name for i in shared] == [original.name]
    assert (shared[0].type, shared[0].owner_project) == (sh.SHARED, projects.name("alpha"))
    assert (shared[0].sha256, shared[0].size_bytes) == (original.sha256, IMAGE_BYTES)
    data, sha256, size = await sh.download(images, beta, original.name)
    assert (data, sha256, size) == (original.data, original.sha256, IMAGE_BYTES)

    # Replicate: beta's own private copy, with its own id and bytes.
    request_id = str(uuid.uuid4())
    copy = await sh.replicate(sharing, beta, original.name, "golden-web-copy", request_id)
    assert copy.name != original.name and copy.name.startswith("images/")
    assert copy.display_name == "golden-web-copy"
    assert (copy.owner_project, copy.type, copy.status) == (beta_project, sh.PRIVATE, sh.ACTIVE)
    assert (copy.sha256, copy.size_bytes) == (original.sha256, IMAGE_BYTES)
    assert list(copy.tags) == ["web"]
    assert not copy.protected
    assert await sh.names_listed(images, beta, "type = private") == [copy.name]
    await expect_error(get_image(images, alpha, copy.name), Code.NOT_FOUND, "IMAGE_NOT_FOUND")
    copied, _, _ = await sh.download(images, beta, copy.name)
    assert copied == original.data

    # The owner deletes the original: beta loses it, keeps the copy.
    await images.DeleteImage(image_pb2.DeleteImageRequest(name=original.name), metadata=alpha)
    await assert_gone_for(images, sharing, beta, beta_project, original.name)
    await expect_error(get_image(images, alpha, original.name), Code.NOT_FOUND)

    still = await get_image(images, beta, copy.name)
    assert (still.status, still.sha256, still.size_bytes) == (
        sh.ACTIVE,
        original.sha256,
        IMAGE_BYTES,
    )
    assert await sh.names_listed(images, beta, "type = private") == [copy.name]
    copied_again, sha256, _ = await sh.download(images, beta, copy.name)
    assert copied_again == original.data and sha256 == original.sha256

    # The same request_id still names the copy made by the first call.
    retried = await sh.replicate(sharing, beta, original.name, "golden-web-copy", request_id)
    assert retried.name == copy.name


async def test_stopping_to_share_takes_the_image_away_at_once(
    images: ImageStub, sharing: SharingStub, projects: sh.Projects
) -> None:
    alpha, beta = projects("alpha"), projects("beta")
    beta_project = projects.name("beta")
    original = await sh.create_active(images, alpha)
    await sh.share(sharing, alpha, original.name, beta_project)
    await sh.answer(sharing, beta, original.name, beta_project, sh.ACCEPTED)
    copy = await sh.replicate(sharing, beta, original.name)
    assert original.name in await sh.names_listed(images, beta)

    await sh.unshare(sharing, alpha, original.name, beta_project)

    await assert_gone_for(images, sharing, beta, beta_project, original.name)
    assert await sh.list_members(sharing, alpha, original.name) == []
    await expect_error(
        sharing.GetImageMember(
            sharing_pb2.GetImageMemberRequest(name=sh.member_name(original.name, beta_project)),
            metadata=alpha,
        ),
        Code.NOT_FOUND,
        "IMAGE_MEMBER_NOT_FOUND",
    )
    await expect_error(
        sh.unshare(sharing, alpha, original.name, beta_project),
        Code.NOT_FOUND,
        "IMAGE_MEMBER_NOT_FOUND",
    )
    # The owner keeps the original; beta keeps the copy it made earlier.
    mine, _, _ = await sh.download(images, alpha, original.name)
    assert mine == original.data
    kept, _, _ = await sh.download(images, beta, copy.name)
    assert kept == original.data

    # Sharing again starts over: pending, to be answered anew.
    again = await sh.share(sharing, alpha, original.name, beta_project)
    assert again.status == sh.PENDING
    error = await sh.download_error(images, beta, original.name)
    assert error is not None and error.reason == "SHARED_IMAGE_NOT_ACCEPTED"


async def test_replicating_twice_with_one_request_id_makes_one_copy(
    images: ImageStub, sharing: SharingStub, projects: sh.Projects
) -> None:
    alpha, beta = projects("alpha"), projects("beta")
    beta_project = projects.name("beta")
    original = await sh.create_active(images, alpha, display_name="base")
    await sh.share(sharing, alpha, original.name, beta_project)
    await sh.answer(sharing, beta, original.name, beta_project, sh.ACCEPTED)
    request_id = str(uuid.uuid4())

    first = await sh.replicate(sharing, beta, original.name, request_id=request_id)
    second = await sh.replicate(sharing, beta, original.name, request_id=request_id)

    assert second == first
    assert first.display_name == "base", "an empty display_name keeps the original's"
    assert await sh.names_listed(images, beta, "type = private") == [first.name]

    other = await sh.replicate(sharing, beta, original.name, request_id=str(uuid.uuid4()))
    assert other.name != first.name
    assert await sh.names_listed(images, beta, "type = private") == [first.name, other.name]


@pytest.mark.parametrize("request_id", ["not-a-uuid", str(uuid.uuid4()).upper()])
async def test_a_replicate_request_id_must_be_a_canonical_uuid(
    images: ImageStub, sharing: SharingStub, projects: sh.Projects, request_id: str
) -> None:
    alpha, beta = projects("alpha"), projects("beta")
    original = await sh.create_active(images, alpha)
    await sh.share(sharing, alpha, original.name, projects.name("beta"))
    await sh.answer(sharing, beta, original.name, projects.name("beta"), sh.ACCEPTED)

    await expect_invalid(
        sh.replicate(sharing, beta, original.name, request_id=request_id), "request_id"
    )
    assert await sh.names_listed(images, beta, "type = private") == []
