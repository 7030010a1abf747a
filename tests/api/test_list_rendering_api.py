"""ListImages builds its pages from images rendered before (bytes kept per
image revision, viewer type and flavor catalog): every change must show on
the very next page, to the viewers it concerns and to no one else."""

from __future__ import annotations

import dataclasses

import grpc
import pytest
from google.protobuf import field_mask_pb2

from bms.image.v1 import image_pb2, sharing_pb2, sharing_pb2_grpc
from bms_image.common.flavors import FlavorCatalog, load_flavors
from support import builders
from support.services import ImageStub, fresh_project, token_metadata
from support.tokens import Metadata

DATA = builders.random_bytes(64 * 1024)


async def listed(
    images: ImageStub, md: Metadata, filter_text: str = ""
) -> dict[str, image_pb2.Image]:
    """Every image of the caller's listing, by name, one small page at a time
    (so that later pages are read too)."""
    found: dict[str, image_pb2.Image] = {}
    token = ""
    for _ in range(100):
        page = await images.ListImages(
            image_pb2.ListImagesRequest(filter=filter_text, page_size=3, page_token=token),
            metadata=md,
        )
        for image in page.images:
            assert image.name not in found, "an image listed twice"
            found[image.name] = image
        token = page.next_page_token
        if not token:
            return found
    raise AssertionError("pagination did not end")


async def active_image(images: ImageStub, md: Metadata, display_name: str) -> image_pb2.Image:
    created = await images.CreateImage(
        image_pb2.CreateImageRequest(image=builders.private_image(display_name)), metadata=md
    )
    requests = [
        image_pb2.UploadImageDataRequest(
            metadata=image_pb2.UploadImageDataMetadata(name=created.name)
        ),
        image_pb2.UploadImageDataRequest(chunk=DATA),
    ]
    return await images.UploadImageData(iter(requests), metadata=md)


MEMBER = fresh_project("member")


@pytest.fixture
def projects(service) -> tuple[Metadata, Metadata, Metadata]:
    """Call metadata of an owner, the member-to-be MEMBER and a bystander."""
    return (
        token_metadata(service, fresh_project("owner")),
        token_metadata(service, MEMBER),
        token_metadata(service, fresh_project("other")),
    )


@pytest.mark.asyncio
async def test_an_update_shows_on_the_next_page_to_every_viewer(images, projects) -> None:
    owner, _, other = projects
    image = await active_image(images, owner, "before")
    assert (await listed(images, owner))[image.name].display_name == "before"
    await images.UpdateImage(
        image_pb2.UpdateImageRequest(
            image=image_pb2.Image(name=image.name, display_name="after"),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
        ),
        metadata=owner,
    )
    now = (await listed(images, owner))[image.name]
    assert now.display_name == "after" and now.etag != image.etag
    assert image.name not in await listed(images, other)


@pytest.mark.asyncio
async def test_a_share_shows_once_accepted_and_only_to_the_member(
    images, channel, projects
) -> None:
    owner, member, other = projects
    sharing = sharing_pb2_grpc.SharingServiceStub(channel)
    image = await active_image(images, owner, "shared one")
    await listed(images, owner)  # rendered as the owner's own
    await sharing.CreateImageMember(
        sharing_pb2.CreateImageMemberRequest(
            parent=image.name, member=sharing_pb2.ImageMember(member_project=MEMBER)
        ),
        metadata=owner,
    )
    assert image.name not in await listed(images, member), "pending: not listed yet"
    await sharing.UpdateImageMember(
        sharing_pb2.UpdateImageMemberRequest(
            member=sharing_pb2.ImageMember(
                name=f"{image.name}/members/{MEMBER}",
                status=sharing_pb2.MEMBER_STATUS_ACCEPTED,
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["status"]),
        ),
        metadata=member,
    )
    seen_by_member = (await listed(images, member))[image.name]
    seen_by_owner = (await listed(images, owner))[image.name]
    assert seen_by_member.type == image_pb2.IMAGE_TYPE_SHARED
    assert seen_by_owner.type == image_pb2.IMAGE_TYPE_PRIVATE
    assert image.name not in await listed(images, other)


@pytest.mark.asyncio
async def test_a_deprecation_shows_on_the_next_page(images, service, projects) -> None:
    owner, _, _ = projects
    admin = token_metadata(service, "platform", admin=True)
    public = await images.CreateImage(
        image_pb2.CreateImageRequest(image=builders.public_image("to be deprecated")),
        metadata=admin,
    )
    assert public.name in await listed(images, owner)
    await images.DeprecateImage(image_pb2.DeprecateImageRequest(name=public.name), metadata=admin)
    assert public.name not in await listed(images, owner)
    deprecated = (await listed(images, owner, "deprecated = true"))[public.name]
    assert deprecated.deprecated


@pytest.mark.asyncio
async def test_a_deleted_image_leaves_the_next_page(images, projects) -> None:
    owner, _, _ = projects
    image = await active_image(images, owner, "short-lived")
    assert image.name in await listed(images, owner)
    await images.DeleteImage(image_pb2.DeleteImageRequest(name=image.name), metadata=owner)
    assert image.name not in await listed(images, owner)
    with pytest.raises(grpc.aio.AioRpcError):
        await images.GetImage(image_pb2.GetImageRequest(name=image.name), metadata=owner)


def test_a_flavor_change_changes_the_rendering_key() -> None:
    """A private image's supported_flavors come from the flavor catalog: a
    catalog with another flavor for a model renders under another key."""
    flavors = load_flavors()
    more = [*flavors, dataclasses.replace(flavors[0], name="physical.new.flavor")]
    assert FlavorCatalog(flavors).fingerprint == FlavorCatalog(list(flavors)).fingerprint
    assert FlavorCatalog(flavors).fingerprint != FlavorCatalog(more).fingerprint
