"""ImageService.ListImages: pagination and filters.

The tests of this module share one service; each works in projects of its own
and none changes a public image, so they cannot see each other's images."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import api_support as api
import pytest
import pytest_asyncio

from bms.image.v1 import image_pb2, image_pb2_grpc, provisioning_pb2
from support.builders import H2_MODEL, KI1_MODEL, PUBLIC_NAMES, S4_MODEL
from support.errors import expect_invalid
from support.services import fresh_project
from support.tokens import Metadata, bearer

pytestmark = pytest.mark.asyncio(loop_scope="module")
service, channel, as_project = api.shared_service_fixtures()

# Private images of the dataset's main project.
WEB = "CentOS 7.6 web tier"
BUILD = "Ubuntu build agent"
ARM = "openEuler arm base"
SQL = "Windows SQL node"
ODD = "100% under_score"
PRIVATE = {WEB, BUILD, ARM, SQL, ODD}
# The other project's image: it must never show up in the main project's lists.
FOREIGN = "CentOS foreign secret"

#: What sets each private image apart from support.builders.private_image.
OWNED: dict[str, dict[str, Any]] = {
    WEB: {"hardware_model": S4_MODEL, "tags": ["web", "prod"], "protected": True},
    BUILD: {
        "os_distro": "ubuntu",
        "os_version": "22.04",
        "hardware_model": H2_MODEL,
        "tags": ["ci"],
    },
    ARM: {
        "os_distro": "openeuler",
        "os_version": "22.03",
        "architecture": image_pb2.ARCHITECTURE_AARCH64,
        "hardware_model": KI1_MODEL,
    },
    SQL: {
        "os_type": image_pb2.OS_TYPE_WINDOWS,
        "os_distro": "windows-server",
        "os_version": "2019",
        "hardware_model": S4_MODEL,
        "tags": ["db"],
    },
    ODD: {"hardware_model": H2_MODEL},
}
FOREIGN_IMAGE = {"hardware_model": S4_MODEL, "tags": ["web", "ci"], "protected": True}


@dataclass
class Dataset:
    owner: Metadata
    other: Metadata
    owner_project: str
    other_project: str


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def dataset(service, channel) -> Dataset:
    images = image_pb2_grpc.ImageServiceStub(channel)
    owner_project, other_project = fresh_project("alpha"), fresh_project("beta")
    owner = bearer(service.authority.issue(owner_project))
    other = bearer(service.authority.issue(other_project))
    for display_name, overrides in OWNED.items():
        await api.create(images, owner, display_name=display_name, **overrides)
    await api.create(images, other, display_name=FOREIGN, **FOREIGN_IMAGE)
    return Dataset(owner, other, owner_project, other_project)


FILTERS = [
    ("", PUBLIC_NAMES | PRIVATE),
    ("type = public", PUBLIC_NAMES),
    ("type = PUBLIC", PUBLIC_NAMES),
    ("type = private", PRIVATE),
    ("type = shared", set()),
    ("type != public", PRIVATE),
    (
        "flavor = physical.s4.large",
        {api.CENTOS, api.UBUNTU, api.SLES, api.EULER, api.WINDOWS, WEB, SQL},
    ),
    ("flavor = flavors/physical.h2.large", {api.CENTOS, api.SLES, api.EULER, BUILD, ODD}),
    ('flavor = "physical.ki1.2xlarge"', {api.OPENEULER_ARM, api.UBUNTU_ARM, ARM}),
    ("flavor = physical.d2.large AND type = private", set()),
    ("flavor = physical.s4.large AND type = private", {WEB, SQL}),
    ("os_type = windows", {api.WINDOWS, SQL}),
    ("os_type = linux", (PUBLIC_NAMES | PRIVATE) - {api.WINDOWS, SQL}),
    ("os_distro = ubuntu", {api.UBUNTU, api.UBUNTU_ARM, BUILD}),
    ("os_distro != centos", (PUBLIC_NAMES | PRIVATE) - {api.CENTOS, WEB, ODD}),
    ('os_version = "22.04"', {api.UBUNTU, api.UBUNTU_ARM, BUILD}),
    ("os_version = 12sp3", {api.SLES}),
    ("architecture = aarch64", {api.OPENEULER_ARM, api.UBUNTU_ARM, ARM}),
    (
        "architecture = x86_64 AND type = public",
        PUBLIC_NAMES - {api.OPENEULER_ARM, api.UBUNTU_ARM},
    ),
    ("status = queued", PRIVATE),
    ("status = active", PUBLIC_NAMES),
    ("status = killed", set()),
    (f'name = "{api.CENTOS}"', {api.CENTOS}),
    ('name = "centos 7.6 64bit"', set()),
    ("name = Cent*", {api.CENTOS, WEB}),
    # Like the exact match (above), a prefix match is case-sensitive, on
    # every database (SQLite's LIKE alone would ignore case).
    ("name = cent*", set()),
    ("name = CENTOS*", set()),
    ('name = "Ubuntu 22.04*"', {api.UBUNTU, api.UBUNTU_ARM}),
    ("name = *", PUBLIC_NAMES | PRIVATE),
    ("name = Nothing*", set()),
    ('name = "100%*"', {ODD}),
    ('name = "1%*"', set()),  # % is a literal, not a wildcard
    ('name = "100_*"', set()),  # _ is a literal, not a wildcard
    ("tag = web", {WEB}),
    ("tag = ci", {BUILD}),
    ("tag = nope", set()),
    ("tag != web AND type = private", PRIVATE - {WEB}),
    ("protected = true", {WEB}),
    ("protected = false", (PUBLIC_NAMES | PRIVATE) - {WEB}),
    ("deprecated = true", set()),
    ("deprecated = false", PUBLIC_NAMES | PRIVATE),
    (
        "os_type = linux AND architecture = x86_64 AND type = public",
        {api.CENTOS, api.UBUNTU, api.SLES, api.EULER},
    ),
    ('  os_type="linux"  AND  tag  =  "prod"  ', {WEB}),
    # SQL injection attempts are plain values that match nothing.
    ('name = "x\' OR 1=1 --"', set()),
    ('tag = "\'; DROP TABLE images; --"', set()),
    ("os_distro = \"centos' OR '1'='1\"", set()),
    ('name = "\\" OR 1=1 --"', set()),
]


@pytest.mark.parametrize(
    ("filter_text", "expected"), FILTERS, ids=[f[0] or "none" for f in FILTERS]
)
async def test_filter(images, dataset, filter_text, expected) -> None:
    listed = await api.list_all(images, dataset.owner, filter_text)
    names = [image.display_name for image in listed]
    assert len(names) == len(set(names)), "an image was listed twice"
    assert set(names) == expected
    assert FOREIGN not in names


async def test_filter_by_owner_project(images, dataset) -> None:
    assert (
        await api.display_names_listed(
            images, dataset.owner, f"owner_project = {dataset.owner_project}"
        )
        == PRIVATE
    )
    # Another project's name finds nothing: its images stay invisible.
    assert (
        await api.display_names_listed(
            images, dataset.owner, f"owner_project = {dataset.other_project}"
        )
        == set()
    )
    assert await api.display_names_listed(images, dataset.other, "type = private") == {FOREIGN}
    assert await api.display_names_listed(images, dataset.other, "tag = web") == {FOREIGN}


async def test_injection_attempts_leave_the_catalog_intact(images, dataset) -> None:
    for filter_text in ('name = "x\' OR 1=1 --"', 'tag = "\'; DROP TABLE images; --"'):
        assert await api.names_listed(images, dataset.owner, filter_text) == []
    assert await api.display_names_listed(images, dataset.owner) == PUBLIC_NAMES | PRIVATE


INVALID_FILTERS = [
    "flavor = physical.nope",
    "flavor = flavors/",
    "flavor != physical.s4.large",
    "flavor = physical.s4.large AND flavor = physical.h2.large",
    "colour = red",
    "type = secret",
    "status = deleted",
    "protected = yes",
    "os_type = linux OR os_type = windows",
    "os_type = linux and architecture = x86_64",
    "name =",
    "name",
    "= linux",
    "type = public AND",
    "type ~ public",
    '"type" = public',
    'name = "unterminated',
    "name = " + "x" * 1030,
]


@pytest.mark.parametrize("filter_text", INVALID_FILTERS, ids=[f[:40] for f in INVALID_FILTERS])
async def test_invalid_filter(images, as_project, filter_text) -> None:
    rich = await expect_invalid(
        images.ListImages(
            image_pb2.ListImagesRequest(filter=filter_text),
            metadata=as_project(fresh_project()),
        ),
        "filter",
        "INVALID_FILTER",
    )
    assert len(rich.status.message) < 2000


async def _walk(images, metadata: Metadata, page_size: int, filter_text: str = ""):
    pages: list[list[image_pb2.Image]] = []
    token = ""
    while True:
        response = await images.ListImages(
            image_pb2.ListImagesRequest(page_size=page_size, page_token=token, filter=filter_text),
            metadata=metadata,
        )
        pages.append(list(response.images))
        token = response.next_page_token
        if not token:
            return pages
        assert len(pages) < 1000, "pagination did not end"


async def test_page_size_one_walks_every_image_once_in_a_stable_order(images, dataset) -> None:
    everything = await api.list_all(images, dataset.owner, page_size=1000)
    assert len(everything) == len(PUBLIC_NAMES | PRIVATE)
    pages = await _walk(images, dataset.owner, 1)
    assert all(len(page) == 1 for page in pages)
    walked = [page[0] for page in pages]
    assert [i.name for i in walked] == [i.name for i in everything]
    assert len({i.name for i in walked}) == len(walked)
    # Oldest first: the seeded public catalog, then the private images as created.
    times = [i.create_time.ToDatetime() for i in walked]
    assert times == sorted(times)
    assert {i.display_name for i in walked[: len(PUBLIC_NAMES)]} == PUBLIC_NAMES
    assert [i.display_name for i in walked[len(PUBLIC_NAMES) :]] == [WEB, BUILD, ARM, SQL, ODD]
    # The same walk again gives the same order.
    again = [page[0].name for page in await _walk(images, dataset.owner, 1)]
    assert again == [i.name for i in walked]


@pytest.mark.parametrize("page_size", [2, 3, 5])
async def test_pages_of_any_size_cover_the_listing(images, dataset, page_size) -> None:
    everything = await api.names_listed(images, dataset.owner, "os_type = linux")
    pages = await _walk(images, dataset.owner, page_size, "os_type = linux")
    assert all(len(page) == page_size for page in pages[:-1])
    assert 1 <= len(pages[-1]) <= page_size
    assert [i.name for page in pages for i in page] == everything


async def test_default_page_size(images, as_project) -> None:
    metadata = as_project(fresh_project())
    response = await images.ListImages(image_pb2.ListImagesRequest(page_size=0), metadata=metadata)
    assert {i.display_name for i in response.images} == PUBLIC_NAMES
    assert response.next_page_token == ""
    response = await images.ListImages(
        image_pb2.ListImagesRequest(page_size=1000), metadata=metadata
    )
    assert len(response.images) == len(PUBLIC_NAMES) and response.next_page_token == ""


async def test_an_exact_last_page_ends_the_walk(images, as_project) -> None:
    metadata = as_project(fresh_project())
    pages = await _walk(images, metadata, len(PUBLIC_NAMES))
    assert [len(page) for page in pages] == [len(PUBLIC_NAMES)]


async def test_images_created_during_a_walk_come_last(images, as_project) -> None:
    metadata = as_project(fresh_project())
    first = await images.ListImages(image_pb2.ListImagesRequest(page_size=2), metadata=metadata)
    added = await api.create(images, metadata, display_name="added mid-walk")
    seen = [i.name for i in first.images]
    token = first.next_page_token
    while token:
        response = await images.ListImages(
            image_pb2.ListImagesRequest(page_size=2, page_token=token), metadata=metadata
        )
        seen += [i.name for i in response.images]
        token = response.next_page_token
    assert len(seen) == len(set(seen)) == len(PUBLIC_NAMES) + 1
    assert seen[-1] == added.name


async def test_page_size_may_change_between_pages(images, dataset) -> None:
    everything = await api.names_listed(images, dataset.owner)
    first = await images.ListImages(
        image_pb2.ListImagesRequest(page_size=3), metadata=dataset.owner
    )
    rest = await images.ListImages(
        image_pb2.ListImagesRequest(page_size=1000, page_token=first.next_page_token),
        metadata=dataset.owner,
    )
    assert [i.name for i in (*first.images, *rest.images)] == everything
    assert rest.next_page_token == ""


@pytest.mark.parametrize("page_size", [-1, 1001, -(2**31)])
async def test_page_size_out_of_range(images, as_project, page_size) -> None:
    await expect_invalid(
        images.ListImages(
            image_pb2.ListImagesRequest(page_size=page_size),
            metadata=as_project(fresh_project()),
        ),
        "page_size",
    )


async def test_page_token_is_bound_to_filter_project_and_content(images, dataset) -> None:
    first = await images.ListImages(
        image_pb2.ListImagesRequest(page_size=1, filter="type = public"), metadata=dataset.owner
    )
    token = first.next_page_token
    assert token

    async def refused(metadata: Metadata, filter_text: str, page_token: str) -> None:
        await expect_invalid(
            images.ListImages(
                image_pb2.ListImagesRequest(page_size=1, filter=filter_text, page_token=page_token),
                metadata=metadata,
            ),
            "page_token",
            "INVALID_PAGE_TOKEN",
        )

    # Another filter, even an equivalent one, or none.
    for other_filter in (
        "",
        "type = private",
        "type = PUBLIC",
        "type = public AND os_type = linux",
    ):
        await refused(dataset.owner, other_filter, token)
    # Another project, with the very same filter.
    await refused(dataset.other, "type = public", token)
    # Tampered: a changed character is refused (the last one is left alone:
    # it may carry only base64 padding bits).
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for position in range(0, len(token) - 1, max(1, len(token) // 12)):
        replacement = alphabet[(alphabet.index(token[position]) + 1) % len(alphabet)]
        tampered = token[:position] + replacement + token[position + 1 :]
        await refused(dataset.owner, "type = public", tampered)
    for junk in ("x", "%%%", token + "AAAA", token[:-4], "eyJhIjo1LCJzIjoiMCJ9"):
        await refused(dataset.owner, "type = public", junk)
    # The genuine token still works.
    second = await images.ListImages(
        image_pb2.ListImagesRequest(page_size=1, filter="type = public", page_token=token),
        metadata=dataset.owner,
    )
    assert second.images[0].name != first.images[0].name


async def test_token_of_a_flavor_listing_is_refused(images, provisioning, dataset) -> None:
    flavors = await provisioning.ListFlavors(
        provisioning_pb2.ListFlavorsRequest(page_size=1), metadata=dataset.owner
    )
    await expect_invalid(
        images.ListImages(
            image_pb2.ListImagesRequest(page_token=flavors.next_page_token), metadata=dataset.owner
        ),
        "page_token",
        "INVALID_PAGE_TOKEN",
    )


async def test_list_never_includes_an_unknown_status_code(images, dataset) -> None:
    for image in await api.list_all(images, dataset.owner):
        assert image.status in (image_pb2.IMAGE_STATUS_QUEUED, image_pb2.IMAGE_STATUS_ACTIVE)
        assert image.type in (image_pb2.IMAGE_TYPE_PUBLIC, image_pb2.IMAGE_TYPE_PRIVATE)
