"""ImageService: the public catalog, GetImage, CreateImage, request_id
idempotency and cross-project visibility.

The tests of this module share one service: each works in projects of its own
(see api_support.ProjectMetadata) and none changes the public catalog; those
that do are in test_public_images_api.py."""

from __future__ import annotations

import asyncio
import uuid

import api_support as api
import grpc
import pytest

from bms.image.v1 import image_pb2, provisioning_pb2
from support.builders import PUBLIC_NAMES, S4_MODEL, private_image, public_image
from support.errors import expect_invalid

pytestmark = pytest.mark.asyncio(loop_scope="module")
service, channel, as_project = api.shared_service_fixtures()


async def test_public_catalog_is_listed(images, as_project) -> None:
    response = await images.ListImages(image_pb2.ListImagesRequest(), metadata=as_project("alpha"))
    assert response.next_page_token == ""
    assert len(response.images) >= 6
    assert {i.display_name for i in response.images} == PUBLIC_NAMES
    for image in response.images:
        assert api.IMAGE_NAME.match(image.name)
        assert image.type == image_pb2.IMAGE_TYPE_PUBLIC
        assert image.owner_project == ""
        assert image.status == image_pb2.IMAGE_STATUS_ACTIVE
        assert image.size_bytes > 0 and len(image.sha256) == 64
        assert image.supported_flavors
        assert image.plugins
        assert not image.deprecated
        assert image.etag
        assert image.create_time.seconds > 0


async def test_every_project_sees_the_same_public_catalog(images, as_project) -> None:
    alpha = await api.list_all(images, as_project("alpha"))
    beta = await api.list_all(images, as_project("beta"))
    admin = await api.list_all(images, as_project("ops", admin=True))
    assert alpha == beta == admin


async def test_get_image_returns_the_listed_image(images, as_project) -> None:
    metadata = as_project("alpha")
    for image in await api.list_all(images, metadata):
        got = await images.GetImage(image_pb2.GetImageRequest(name=image.name), metadata=metadata)
        assert got == image


async def test_get_unknown_image_is_not_found(images, as_project) -> None:
    name = f"images/{uuid.uuid4()}"
    rich = await api.expect_error(
        images.GetImage(image_pb2.GetImageRequest(name=name), metadata=as_project("alpha")),
        grpc.StatusCode.NOT_FOUND,
        "IMAGE_NOT_FOUND",
    )
    assert name in rich.status.message


async def test_create_private_image(images, as_project) -> None:
    metadata = as_project("alpha")
    created = await images.CreateImage(
        image_pb2.CreateImageRequest(
            image=private_image(
                display_name="web tier",
                description="nginx + app",
                tags=["web", "prod"],
                plugins=[
                    image_pb2.Plugin(kind=image_pb2.PLUGIN_KIND_CLOUD_INIT, version="0.7.9"),
                    image_pb2.Plugin(
                        kind=image_pb2.PLUGIN_KIND_BMS_NETWORK_CONFIG, version="2.1.3"
                    ),
                ],
            )
        ),
        metadata=metadata,
    )
    assert api.IMAGE_NAME.match(created.name)
    assert created.display_name == "web tier"
    assert created.description == "nginx + app"
    assert created.type == image_pb2.IMAGE_TYPE_PRIVATE
    assert created.owner_project == as_project.name("alpha")
    assert created.status == image_pb2.IMAGE_STATUS_QUEUED
    assert created.hardware_model == S4_MODEL
    assert list(created.supported_flavors) == [f"flavors/{api.S4}"]
    assert created.os_type == image_pb2.OS_TYPE_LINUX
    assert (created.os_distro, created.os_version) == ("centos", "7.6")
    assert created.architecture == image_pb2.ARCHITECTURE_X86_64
    assert created.disk_format == image_pb2.DISK_FORMAT_RAW
    assert created.min_disk_gb == 40
    assert created.size_bytes == 0 and created.sha256 == ""
    assert list(created.tags) == ["web", "prod"]
    assert [(p.kind, p.version) for p in created.plugins] == [
        (image_pb2.PLUGIN_KIND_CLOUD_INIT, "0.7.9"),
        (image_pb2.PLUGIN_KIND_BMS_NETWORK_CONFIG, "2.1.3"),
    ]
    assert not created.protected and not created.deprecated
    assert created.etag
    assert created.create_time.seconds > 0
    assert created.update_time == created.create_time

    got = await images.GetImage(image_pb2.GetImageRequest(name=created.name), metadata=metadata)
    assert got == created
    assert created.name in await api.names_listed(images, metadata)
    assert await api.names_listed(images, metadata, "type = private") == [created.name]


async def test_create_ignores_output_only_fields(images, as_project) -> None:
    forged_name = f"images/{uuid.uuid4()}"
    created = await api.create(
        images,
        as_project("alpha"),
        name=forged_name,
        owner_project=as_project.name("beta"),
        status=image_pb2.IMAGE_STATUS_ACTIVE,
        status_reason="forged",
        size_bytes=123,
        sha256="ab" * 32,
        supported_flavors=[f"flavors/{api.H2}"],
        source_server="servers/forged",
        deprecated=True,
        etag='"99"',
    )
    assert created.name != forged_name
    assert created.owner_project == as_project.name("alpha")
    assert created.status == image_pb2.IMAGE_STATUS_QUEUED
    assert created.status_reason == ""
    assert created.size_bytes == 0 and created.sha256 == ""
    assert list(created.supported_flavors) == [f"flavors/{api.S4}"]
    assert created.source_server == ""
    assert not created.deprecated
    assert created.etag != '"99"'


async def test_private_image_flavors_follow_its_hardware_model(
    images, provisioning, as_project
) -> None:
    metadata = as_project("alpha")
    flavors = (
        await provisioning.ListFlavors(provisioning_pb2.ListFlavorsRequest(), metadata=metadata)
    ).flavors
    for model in sorted({f.hardware_model for f in flavors}):
        created = await api.create(images, metadata, hardware_model=model)
        assert sorted(created.supported_flavors) == sorted(
            f.name for f in flavors if f.hardware_model == model
        )


async def test_create_min_disk_boundaries(images, as_project) -> None:
    metadata = as_project("alpha")
    assert (await api.create(images, metadata, min_disk_gb=1)).min_disk_gb == 1
    assert (await api.create(images, metadata, min_disk_gb=1024)).min_disk_gb == 1024
    # proto3 cannot tell 0 from unset: the documented default applies.
    assert (await api.create(images, metadata, min_disk_gb=0)).min_disk_gb == 40
    assert (await api.create(images, metadata, display_name="x" * 128)).display_name == "x" * 128
    ten = [f"t{i}" for i in range(10)]
    assert list((await api.create(images, metadata, tags=ten)).tags) == ten


async def test_public_image_needs_known_flavors(images, as_project) -> None:
    admin = as_project("ops", admin=True)
    del_flavors = public_image()
    del del_flavors.supported_flavors[:]
    await expect_invalid(
        images.CreateImage(image_pb2.CreateImageRequest(image=del_flavors), metadata=admin),
        "image.supported_flavors",
        "INVALID_IMAGE",
    )
    await expect_invalid(
        images.CreateImage(
            image_pb2.CreateImageRequest(
                image=public_image(supported_flavors=["flavors/physical.nope"])
            ),
            metadata=admin,
        ),
        "image.supported_flavors",
        "INVALID_IMAGE",
    )
    assert await api.names_listed(images, admin, "name = Rocky*") == []


async def test_only_an_admin_creates_public_images(images, as_project) -> None:
    metadata = as_project("alpha")
    await api.expect_error(
        images.CreateImage(image_pb2.CreateImageRequest(image=public_image()), metadata=metadata),
        grpc.StatusCode.PERMISSION_DENIED,
        "ADMIN_REQUIRED",
    )
    assert await api.names_listed(images, metadata, "name = Rocky*") == []


async def test_shared_images_cannot_be_created(images, as_project) -> None:
    await expect_invalid(
        images.CreateImage(
            image_pb2.CreateImageRequest(image=private_image(type=image_pb2.IMAGE_TYPE_SHARED)),
            metadata=as_project("alpha"),
        ),
        "image.type",
    )


async def test_request_id_makes_create_idempotent(images, as_project) -> None:
    metadata = as_project("alpha")
    request_id = api.new_request_id()
    request = image_pb2.CreateImageRequest(image=private_image(), request_id=request_id)
    first = await images.CreateImage(request, metadata=metadata)
    again = await images.CreateImage(request, metadata=metadata)
    assert again == first
    # A retry returns the first image even if the body changed in between.
    changed = image_pb2.CreateImageRequest(
        image=private_image(display_name="other"), request_id=request_id
    )
    assert (await images.CreateImage(changed, metadata=metadata)).name == first.name
    assert await api.names_listed(images, metadata, "type = private") == [first.name]
    # Without a request_id, every call creates an image.
    other = await images.CreateImage(
        image_pb2.CreateImageRequest(image=private_image()), metadata=metadata
    )
    assert other.name != first.name


async def test_concurrent_retries_create_one_image(images, as_project) -> None:
    metadata = as_project("alpha")
    request = image_pb2.CreateImageRequest(image=private_image(), request_id=api.new_request_id())
    results = await asyncio.gather(
        *(images.CreateImage(request, metadata=metadata) for _ in range(5))
    )
    assert len({r.name for r in results}) == 1
    assert await api.names_listed(images, metadata, "type = private") == [results[0].name]


async def test_request_id_is_scoped_to_the_project(images, as_project) -> None:
    request = image_pb2.CreateImageRequest(image=private_image(), request_id=api.new_request_id())
    alpha = await images.CreateImage(request, metadata=as_project("alpha"))
    beta = await images.CreateImage(request, metadata=as_project("beta"))
    assert alpha.name != beta.name
    assert (alpha.owner_project, beta.owner_project) == (
        as_project.name("alpha"),
        as_project.name("beta"),
    )


async def test_request_id_must_be_a_uuid(images, as_project) -> None:
    metadata = as_project("alpha")
    for bad in ("retry-1", "12345", "g" * 32):
        await expect_invalid(
            images.CreateImage(
                image_pb2.CreateImageRequest(image=private_image(), request_id=bad),
                metadata=metadata,
            ),
            "request_id",
        )
    assert await api.names_listed(images, metadata, "type = private") == []


async def test_private_images_are_invisible_to_other_projects(images, as_project) -> None:
    alpha = as_project("alpha")
    owned = await api.create(images, alpha, display_name="alpha secret", tags=["secret"])
    unknown = f"images/{uuid.uuid4()}"
    for metadata in (as_project("beta"), as_project("beta", admin=True)):
        for name in (owned.name, unknown):
            calls = [
                images.GetImage(image_pb2.GetImageRequest(name=name), metadata=metadata),
                images.UpdateImage(
                    api.update_request(name, ["display_name"], display_name="stolen"),
                    metadata=metadata,
                ),
                images.DeleteImage(image_pb2.DeleteImageRequest(name=name), metadata=metadata),
                images.DeprecateImage(
                    image_pb2.DeprecateImageRequest(name=name), metadata=metadata
                ),
            ]
            messages = []
            for call in calls:
                rich = await api.expect_error(call, grpc.StatusCode.NOT_FOUND, "IMAGE_NOT_FOUND")
                messages.append(rich.status.message.replace(name, "images/ID"))
            if name == owned.name:
                owned_messages = messages
            else:
                assert messages == owned_messages, "NOT_FOUND must not tell owned from absent"
        for filter_text in (
            "",
            "type = private",
            "type = shared",
            "owner_project = alpha",
            'name = "alpha secret"',
            "tag = secret",
            f"flavor = {api.S4}",
            "status = queued",
        ):
            assert owned.name not in await api.names_listed(images, metadata, filter_text)
    # Untouched for its owner.
    got = await images.GetImage(image_pb2.GetImageRequest(name=owned.name), metadata=alpha)
    assert got == owned


async def test_public_images_are_read_only_for_non_admins(images, as_project) -> None:
    metadata = as_project("alpha")
    centos = (await api.public_by_display_name(images, metadata))[api.CENTOS]
    await api.expect_error(
        images.UpdateImage(
            image_pb2.UpdateImageRequest(
                image=image_pb2.Image(name=centos.name, display_name="mine now"),
                update_mask=api.mask("display_name"),
            ),
            metadata=metadata,
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "PUBLIC_IMAGE_READ_ONLY",
    )
    await api.expect_error(
        images.DeleteImage(image_pb2.DeleteImageRequest(name=centos.name), metadata=metadata),
        grpc.StatusCode.PERMISSION_DENIED,
        "PUBLIC_IMAGE_READ_ONLY",
    )
    await api.expect_error(
        images.DeprecateImage(image_pb2.DeprecateImageRequest(name=centos.name), metadata=metadata),
        grpc.StatusCode.PERMISSION_DENIED,
        "ADMIN_REQUIRED",
    )
    got = await images.GetImage(image_pb2.GetImageRequest(name=centos.name), metadata=metadata)
    assert got == centos
