"""ProvisioningService: ListFlavors and GetFlavor against a real server."""

from __future__ import annotations

from collections.abc import Awaitable

import api_support as api
import grpc
import pytest

from bms.image.v1 import image_pb2, provisioning_pb2
from support.builders import S4_MODEL
from support.errors import expect_invalid
from support.paging import every_page
from support.services import fresh_project

pytestmark = pytest.mark.asyncio(loop_scope="module")
service, channel, as_project = api.shared_service_fixtures()


async def all_flavors(provisioning, metadata, page_size: int = 0) -> list[provisioning_pb2.Flavor]:
    def page(token: str) -> Awaitable[provisioning_pb2.ListFlavorsResponse]:
        request = provisioning_pb2.ListFlavorsRequest(page_size=page_size, page_token=token)
        return provisioning.ListFlavors(request, metadata=metadata)

    return await every_page(page, lambda listed: listed.flavors, most_pages=100)


async def test_list_flavors_describes_the_hardware(provisioning, as_project) -> None:
    response = await provisioning.ListFlavors(
        provisioning_pb2.ListFlavorsRequest(), metadata=as_project("alpha")
    )
    flavors = list(response.flavors)
    assert response.next_page_token == ""
    assert len(flavors) >= 4
    names = [f.name for f in flavors]
    assert names == sorted(names), "flavors must be ordered by name"
    assert len(set(names)) == len(names)
    for flavor in flavors:
        assert flavor.name.startswith("flavors/")
        assert flavor.hardware_model
        assert flavor.cpu_cores > 0 and flavor.memory_gib > 0 and flavor.local_disk_gb > 0
        assert flavor.cpu_model and flavor.local_disks and flavor.description
    by_name = {f.name: f for f in flavors}
    assert by_name[f"flavors/{api.S4}"].hardware_model == S4_MODEL
    assert by_name[f"flavors/{api.S4}"].evs_boot is True
    assert by_name[f"flavors/{api.H2}"].evs_boot is False
    assert {f.evs_boot for f in flavors} == {True, False}


async def test_flavor_public_images_match_image_supported_flavors(
    provisioning, images, as_project
) -> None:
    metadata = as_project("alpha")
    flavors = await all_flavors(provisioning, metadata)
    public = await api.list_all(images, metadata, "type = public")
    assert len(public) >= 6
    flavor_names = {f.name for f in flavors}
    expected: dict[str, set[str]] = {name: set() for name in flavor_names}
    for image in public:
        assert image.supported_flavors, f"{image.display_name} supports no flavor"
        for flavor in image.supported_flavors:
            assert flavor in flavor_names, f"{image.display_name} names unknown {flavor}"
            expected[flavor].add(image.name)
    for flavor in flavors:
        assert len(set(flavor.public_images)) == len(flavor.public_images)
        assert set(flavor.public_images) == expected[flavor.name], flavor.name
        assert flavor.public_images, f"{flavor.name} offers no public image"


async def test_get_flavor_returns_what_list_returns(provisioning, as_project) -> None:
    metadata = as_project("alpha")
    for flavor in await all_flavors(provisioning, metadata):
        got = await provisioning.GetFlavor(
            provisioning_pb2.GetFlavorRequest(name=flavor.name), metadata=metadata
        )
        assert got == flavor


async def test_private_images_are_not_a_flavors_public_images(
    provisioning, images, as_project
) -> None:
    metadata = as_project(fresh_project())
    before = await provisioning.GetFlavor(
        provisioning_pb2.GetFlavorRequest(name=f"flavors/{api.S4}"), metadata=metadata
    )
    private = await api.create(images, metadata, hardware_model=S4_MODEL)
    assert private.supported_flavors == [f"flavors/{api.S4}"]
    after = await provisioning.GetFlavor(
        provisioning_pb2.GetFlavorRequest(name=f"flavors/{api.S4}"), metadata=metadata
    )
    assert private.name not in after.public_images
    assert list(after.public_images) == list(before.public_images)


async def test_get_unknown_flavor_is_not_found(provisioning, as_project) -> None:
    rich = await api.expect_error(
        provisioning.GetFlavor(
            provisioning_pb2.GetFlavorRequest(name="flavors/physical.nope.huge"),
            metadata=as_project("alpha"),
        ),
        grpc.StatusCode.NOT_FOUND,
        "FLAVOR_NOT_FOUND",
    )
    assert "physical.nope.huge" in rich.status.message


@pytest.mark.parametrize("name", ["", api.S4, "flavors/", "images/physical.s4.large", "flavor/x"])
async def test_get_flavor_with_malformed_name_is_invalid(provisioning, as_project, name) -> None:
    await expect_invalid(
        provisioning.GetFlavor(
            provisioning_pb2.GetFlavorRequest(name=name), metadata=as_project("alpha")
        ),
        "name",
    )


@pytest.mark.parametrize("page_size", [1, 2, 3])
async def test_list_flavors_pages_walk_every_flavor_once(
    provisioning, as_project, page_size
) -> None:
    metadata = as_project("alpha")
    everything = await all_flavors(provisioning, metadata, page_size=1000)
    paged = await all_flavors(provisioning, metadata, page_size=page_size)
    assert [f.name for f in paged] == [f.name for f in everything]
    first = await provisioning.ListFlavors(
        provisioning_pb2.ListFlavorsRequest(page_size=page_size), metadata=metadata
    )
    assert len(first.flavors) == page_size
    assert first.next_page_token


@pytest.mark.parametrize("page_size", [-1, 1001])
async def test_list_flavors_rejects_bad_page_size(provisioning, as_project, page_size) -> None:
    await expect_invalid(
        provisioning.ListFlavors(
            provisioning_pb2.ListFlavorsRequest(page_size=page_size), metadata=as_project("alpha")
        ),
        "page_size",
    )


async def test_list_flavors_rejects_foreign_and_tampered_tokens(
    provisioning, images, as_project
) -> None:
    metadata = as_project("alpha")
    first = await provisioning.ListFlavors(
        provisioning_pb2.ListFlavorsRequest(page_size=1), metadata=metadata
    )
    token = first.next_page_token
    tampered = token[:-2] + ("AA" if token[-2:] != "AA" else "BB")
    image_page = await images.ListImages(
        image_pb2.ListImagesRequest(page_size=1), metadata=metadata
    )
    assert image_page.next_page_token
    for bad in (tampered, "not a token", image_page.next_page_token, api.KI1):
        await expect_invalid(
            provisioning.ListFlavors(
                provisioning_pb2.ListFlavorsRequest(page_size=1, page_token=bad),
                metadata=metadata,
            ),
            "page_token",
            "INVALID_PAGE_TOKEN",
        )
