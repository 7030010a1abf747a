"""Helpers shared by the in-process gRPC tests: request builders, catalog
walkers and the names of the seeded catalog. Plain functions, so no second
conftest.py: import the module (`import api_support as api`); builders,
error decoding and projects come from support.* directly."""

from __future__ import annotations

import functools
import re
import uuid
from collections.abc import Awaitable
from typing import Any

import pytest
from google.protobuf import field_mask_pb2

from bms.image.v1 import image_pb2, image_pb2_grpc
from bms_image.common.serving import RunningService
from support import builders, errors, services
from support.builders import private_image
from support.paging import every_page
from support.services import ProjectMetadata
from support.tokens import Metadata

#: Every FAILED_PRECONDITION these tests provoke names its condition.
expect_error = functools.partial(errors.expect_error, precondition="failure")

ERROR_DOMAIN = "image.bms.cloud"

S4 = builders.S4_FLAVOR
H2 = builders.H2_FLAVOR
KI1 = builders.KI1_FLAVOR
#: The public catalog seeded from src/bms_image/common/catalog.toml.
CENTOS = builders.CENTOS_NAME
UBUNTU = builders.UBUNTU_NAME
SLES = builders.SLES_NAME
EULER = builders.EULER_NAME
WINDOWS = builders.WINDOWS_NAME
OPENEULER_ARM = builders.OPENEULER_ARM_NAME
UBUNTU_ARM = builders.UBUNTU_ARM_NAME

IMAGE_NAME = re.compile(r"^images/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def shared_service_fixtures() -> tuple[Any, Any, Any]:
    """support.services.shared_service_fixtures plus an `as_project` giving
    each test projects of its own (ProjectMetadata), for modules whose tests
    leave the public catalog alone."""
    service, channel = services.shared_service_fixtures("shared-service")

    @pytest.fixture
    def as_project(service: RunningService) -> ProjectMetadata:
        return ProjectMetadata(service)

    return service, channel, as_project


def mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


def new_request_id() -> str:
    return str(uuid.uuid4())


def update_request(
    name: str, paths: list[str], etag: str = "", **values: Any
) -> image_pb2.UpdateImageRequest:
    return image_pb2.UpdateImageRequest(
        image=image_pb2.Image(name=name, etag=etag, **values), update_mask=mask(*paths)
    )


def assert_same_except(before: image_pb2.Image, after: image_pb2.Image, *changed: str) -> None:
    for field in image_pb2.Image.DESCRIPTOR.fields:
        if field.name in (*changed, "etag", "update_time"):
            continue
        assert getattr(after, field.name) == getattr(before, field.name), field.name


async def create(
    images: image_pb2_grpc.ImageServiceStub, metadata: Metadata, **overrides: Any
) -> image_pb2.Image:
    request = image_pb2.CreateImageRequest(image=private_image(**overrides))
    return await images.CreateImage(request, metadata=metadata)


async def list_all(
    images: image_pb2_grpc.ImageServiceStub,
    metadata: Metadata,
    filter_text: str = "",
    page_size: int = 1000,
) -> list[image_pb2.Image]:
    """Every image of a listing, following next_page_token to the end."""

    def page(token: str) -> Awaitable[image_pb2.ListImagesResponse]:
        request = image_pb2.ListImagesRequest(
            page_size=page_size, page_token=token, filter=filter_text
        )
        return images.ListImages(request, metadata=metadata)

    return await every_page(page, lambda listed: listed.images)


async def names_listed(
    images: image_pb2_grpc.ImageServiceStub, metadata: Metadata, filter_text: str = ""
) -> list[str]:
    return [image.name for image in await list_all(images, metadata, filter_text)]


async def display_names_listed(
    images: image_pb2_grpc.ImageServiceStub, metadata: Metadata, filter_text: str = ""
) -> set[str]:
    return {image.display_name for image in await list_all(images, metadata, filter_text)}


async def public_by_display_name(
    images: image_pb2_grpc.ImageServiceStub, metadata: Metadata
) -> dict[str, image_pb2.Image]:
    return {
        image.display_name: image for image in await list_all(images, metadata, "type = public")
    }
