"""Admin changes to the public catalog: publishing, updating, deleting and
deprecating public images. Each test gets a service of its own, since what
it changes is seen by every project."""

from __future__ import annotations

import api_support as api
import grpc

from bms.image.v1 import image_pb2, provisioning_pb2
from support.builders import S4_MODEL, public_image


async def test_admin_creates_public_image_for_every_project(
    images, provisioning, as_project
) -> None:
    admin = as_project("ops", admin=True)
    created = await images.CreateImage(
        image_pb2.CreateImageRequest(image=public_image(hardware_model=S4_MODEL)),
        metadata=admin,
    )
    assert created.type == image_pb2.IMAGE_TYPE_PUBLIC
    assert created.owner_project == ""
    assert created.hardware_model == ""
    assert list(created.supported_flavors) == [f"flavors/{api.H2}", f"flavors/{api.S4}"]
    assert created.status == image_pb2.IMAGE_STATUS_QUEUED

    for project in ("alpha", "beta", "ops"):
        metadata = as_project(project)
        got = await images.GetImage(image_pb2.GetImageRequest(name=created.name), metadata=metadata)
        assert got.type == image_pb2.IMAGE_TYPE_PUBLIC
        assert created.name in await api.names_listed(images, metadata)
        assert created.name in await api.names_listed(images, metadata, "type = public")
        assert created.name in await api.names_listed(images, metadata, f"flavor = {api.S4}")
        assert created.name not in await api.names_listed(images, metadata, f"flavor = {api.KI1}")
        assert created.name not in await api.names_listed(images, metadata, "type = private")
        for flavor, offered in ((api.S4, True), (api.H2, True), (api.KI1, False)):
            got_flavor = await provisioning.GetFlavor(
                provisioning_pb2.GetFlavorRequest(name=f"flavors/{flavor}"), metadata=metadata
            )
            assert (created.name in got_flavor.public_images) is offered, flavor
    # A public image holds no project's quota and is no project's private image.
    assert await api.names_listed(images, admin, "type = private") == []


async def test_request_id_makes_public_create_idempotent(images, as_project) -> None:
    admin = as_project("ops", admin=True)
    request = image_pb2.CreateImageRequest(image=public_image(), request_id=api.new_request_id())
    first = await images.CreateImage(request, metadata=admin)
    again = await images.CreateImage(request, metadata=admin)
    assert again.name == first.name, "a retried public CreateImage created a second image"
    assert await api.names_listed(images, admin, "name = Rocky*") == [first.name]


async def test_admin_updates_public_images(images, as_project) -> None:
    admin = as_project("ops", admin=True)
    centos = (await api.public_by_display_name(images, admin))[api.CENTOS]
    updated = await images.UpdateImage(
        api.update_request(
            centos.name, ["description", "tags"], description="patched", tags=["lts"]
        ),
        metadata=admin,
    )
    assert updated.description == "patched" and list(updated.tags) == ["lts"]
    assert updated.type == image_pb2.IMAGE_TYPE_PUBLIC
    seen = await images.GetImage(
        image_pb2.GetImageRequest(name=centos.name), metadata=as_project("alpha")
    )
    assert seen.description == "patched"


async def test_admin_deletes_a_public_image_everywhere(images, provisioning, as_project) -> None:
    admin = as_project("ops", admin=True)
    ubuntu = (await api.public_by_display_name(images, admin))[api.UBUNTU]
    await images.DeleteImage(image_pb2.DeleteImageRequest(name=ubuntu.name), metadata=admin)
    alpha = as_project("alpha")
    await api.expect_error(
        images.GetImage(image_pb2.GetImageRequest(name=ubuntu.name), metadata=alpha),
        grpc.StatusCode.NOT_FOUND,
        "IMAGE_NOT_FOUND",
    )
    assert ubuntu.name not in await api.names_listed(images, alpha)
    assert ubuntu.name not in await api.names_listed(images, alpha, "deprecated = true")
    flavors = await provisioning.ListFlavors(provisioning_pb2.ListFlavorsRequest(), metadata=alpha)
    for flavor in flavors.flavors:
        assert ubuntu.name not in flavor.public_images, flavor.name


async def test_deprecate_public_image(images, provisioning, as_project) -> None:
    admin = as_project("ops", admin=True)
    windows = (await api.public_by_display_name(images, admin))[api.WINDOWS]
    deprecated = await images.DeprecateImage(
        image_pb2.DeprecateImageRequest(name=windows.name), metadata=admin
    )
    assert deprecated.deprecated
    assert deprecated.etag != windows.etag
    api.assert_same_except(windows, deprecated, "deprecated")
    for project in ("alpha", "beta"):
        metadata = as_project(project)
        assert windows.name not in await api.names_listed(images, metadata)
        assert windows.name not in await api.names_listed(images, metadata, "os_type = windows")
        assert windows.name not in await api.names_listed(images, metadata, "deprecated = false")
        assert await api.names_listed(images, metadata, "deprecated = true") == [windows.name]
        assert await api.names_listed(
            images, metadata, "deprecated = true AND os_type = windows"
        ) == [windows.name]
        got = await images.GetImage(image_pb2.GetImageRequest(name=windows.name), metadata=metadata)
        assert got.deprecated and got.display_name == api.WINDOWS
    again = await images.DeprecateImage(
        image_pb2.DeprecateImageRequest(name=windows.name), metadata=admin
    )
    assert again.deprecated
