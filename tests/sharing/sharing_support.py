"""Helpers of the sharing tests: image and member builders, a verifying
downloader and module-scoped service fixtures. Plain functions, so import
the module (`import sharing_support as sh`), never from a conftest module.
Error decoding, stubs and services are support.errors' and support.services':
tests import them from there."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import field_mask_pb2

from bms.image.v1 import image_pb2, sharing_pb2
from support import builders, services
from support.builders import random_bytes, sha256_hex
from support.errors import RichError, decode, outcome
from support.paging import every_page
from support.services import ImageStub, ProjectMetadata, SharingStub
from support.tokens import Metadata

PENDING = sharing_pb2.MEMBER_STATUS_PENDING
ACCEPTED = sharing_pb2.MEMBER_STATUS_ACCEPTED
REJECTED = sharing_pb2.MEMBER_STATUS_REJECTED

ACTIVE = image_pb2.IMAGE_STATUS_ACTIVE
PRIVATE = image_pb2.IMAGE_TYPE_PRIVATE
SHARED = image_pb2.IMAGE_TYPE_SHARED


# -- projects and services -----------------------------------------------------


Projects = ProjectMetadata


def shared_service_fixtures() -> tuple[Any, Any]:
    """support.services.shared_service_fixtures, for modules whose tests use
    projects of their own (the `projects` fixture) and so cannot see each
    other's images; the `images` and `sharing` stubs then use its channel.
    Such modules must run on the module's event loop:
    `pytestmark = pytest.mark.asyncio(loop_scope="module")`."""
    return services.shared_service_fixtures("sharing-service")


# -- images ----------------------------------------------------------------------


def private_image(**overrides: Any) -> image_pb2.Image:
    """support.builders.private_image, named 'shared-golden' unless told."""
    return builders.private_image(**{"display_name": "shared-golden", **overrides})


def mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


async def create_queued(images: ImageStub, md: Metadata, **overrides: Any) -> image_pb2.Image:
    request = image_pb2.CreateImageRequest(image=private_image(**overrides))
    return await images.CreateImage(request, metadata=md)


def upload_requests(
    name: str, data: bytes, chunk: int = 64 * 1024
) -> Iterable[image_pb2.UploadImageDataRequest]:
    yield image_pb2.UploadImageDataRequest(metadata=image_pb2.UploadImageDataMetadata(name=name))
    for start_at in range(0, len(data), chunk):
        yield image_pb2.UploadImageDataRequest(chunk=data[start_at : start_at + chunk])


async def upload(images: ImageStub, md: Metadata, name: str, data: bytes) -> image_pb2.Image:
    return await images.UploadImageData(iter(upload_requests(name, data)), metadata=md)


@dataclass
class Uploaded:
    image: image_pb2.Image
    data: bytes

    @property
    def name(self) -> str:
        return self.image.name

    @property
    def sha256(self) -> str:
        return sha256_hex(self.data)


async def create_active(
    images: ImageStub, md: Metadata, size: int = 3 * 1024 + 17, **overrides: Any
) -> Uploaded:
    """CreateImage then UploadImageData: an ACTIVE private image."""
    created = await create_queued(images, md, **overrides)
    data = random_bytes(size)
    active = await upload(images, md, created.name, data)
    assert active.status == ACTIVE, active
    assert active.size_bytes == size
    assert active.sha256 == sha256_hex(data)
    return Uploaded(active, data)


async def download(images: ImageStub, md: Metadata, name: str) -> tuple[bytes, str, int]:
    """The bytes of a download, with the SHA-256 and size of its last message,
    after checking the offsets and that the last message says what arrived."""
    parts: list[bytes] = []
    offset = 0
    last: image_pb2.DownloadImageDataResponse | None = None
    async for message in images.DownloadImageData(
        image_pb2.DownloadImageDataRequest(name=name), metadata=md
    ):
        assert last is None, "a message after the last one"
        assert message.offset == offset
        parts.append(message.chunk)
        offset += len(message.chunk)
        if message.last:
            last = message
    assert last is not None, "the stream ended without a last message"
    data = b"".join(parts)
    assert last.size_bytes == len(data)
    assert last.sha256 == sha256_hex(data)
    return data, last.sha256, last.size_bytes


async def download_error(images: ImageStub, md: Metadata, name: str) -> RichError | None:
    """None when the whole image downloads, else the decoded error."""
    try:
        await download(images, md, name)
    except grpc.aio.AioRpcError as error:
        return decode(error)
    return None


async def list_images(images: ImageStub, md: Metadata, filter_text: str = "") -> list[Any]:
    """Every image of a listing, following next_page_token to the end."""

    def page(token: str) -> Awaitable[image_pb2.ListImagesResponse]:
        request = image_pb2.ListImagesRequest(page_size=1000, page_token=token, filter=filter_text)
        return images.ListImages(request, metadata=md)

    return await every_page(page, lambda listed: listed.images, most_pages=1000)


async def names_listed(images: ImageStub, md: Metadata, filter_text: str = "") -> list[str]:
    return [image.name for image in await list_images(images, md, filter_text)]


# -- members ---------------------------------------------------------------------


def member_name(image_name: str, project: str) -> str:
    return f"{image_name}/members/{project}"


async def share(
    sharing: SharingStub, md: Metadata, image_name: str, project: str
) -> sharing_pb2.ImageMember:
    return await sharing.CreateImageMember(
        sharing_pb2.CreateImageMemberRequest(
            parent=image_name, member=sharing_pb2.ImageMember(member_project=project)
        ),
        metadata=md,
    )


def answer_request(name: str, status: int) -> sharing_pb2.UpdateImageMemberRequest:
    return sharing_pb2.UpdateImageMemberRequest(
        member=sharing_pb2.ImageMember(name=name, status=status),  # type: ignore[arg-type]
        update_mask=mask("status"),
    )


async def answer(
    sharing: SharingStub, md: Metadata, image_name: str, project: str, status: int
) -> sharing_pb2.ImageMember:
    return await sharing.UpdateImageMember(
        answer_request(member_name(image_name, project), status), metadata=md
    )


async def unshare(sharing: SharingStub, md: Metadata, image_name: str, project: str) -> None:
    await sharing.DeleteImageMember(
        sharing_pb2.DeleteImageMemberRequest(name=member_name(image_name, project)), metadata=md
    )


async def list_members(
    sharing: SharingStub, md: Metadata, image_name: str, page_size: int = 0
) -> list[Any]:
    """Every member of a listing, following next_page_token to the end."""

    def page(token: str) -> Awaitable[sharing_pb2.ListImageMembersResponse]:
        request = sharing_pb2.ListImageMembersRequest(
            parent=image_name, page_size=page_size, page_token=token
        )
        return sharing.ListImageMembers(request, metadata=md)

    return await every_page(page, lambda listed: listed.members, most_pages=1000)


async def replicate(
    sharing: SharingStub,
    md: Metadata,
    image_name: str,
    display_name: str = "",
    request_id: str = "",
) -> image_pb2.Image:
    return await sharing.ReplicateImage(
        sharing_pb2.ReplicateImageRequest(
            name=image_name, display_name=display_name, request_id=request_id
        ),
        metadata=md,
    )


async def gather_outcomes(calls: Iterable[Awaitable[Any]]) -> list[tuple[Any, RichError | None]]:
    """Runs the calls concurrently; the outcome of each, in order."""
    return list(await asyncio.gather(*(outcome(call) for call in calls)))


def status_name(status: int) -> str:
    return str(sharing_pb2.MemberStatus.Name(status))  # type: ignore[arg-type]
