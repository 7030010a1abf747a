"""domain.flavors: the in-memory flavor catalog and the ListFlavors pages."""

from __future__ import annotations

import pytest
from unit_fakes import FLAVORS, H2_MODEL, S4_MODEL, make_flavor

from bms_image.common.errors import InvalidArgument, NotFound
from bms_image.common.flavors import FlavorCatalog
from bms_image.common.model import Flavor
from bms_image.common.paging import PageTokens
from bms_image.fleet.domain.flavors import FlavorDirectory
from support.fakes import FakePublicImages

CATALOG = FlavorCatalog(reversed(FLAVORS))


def test_catalog_is_sorted_by_name() -> None:
    assert [f.name for f in CATALOG.all()] == sorted(f.name for f in FLAVORS)


def test_find_and_get() -> None:
    assert CATALOG.find("physical.h2.large") == FLAVORS[2]
    assert CATALOG.find("physical.nope") is None
    assert CATALOG.find("flavors/physical.h2.large") is None, "names, not resource names"
    assert CATALOG.get("physical.s4.large").hardware_model == S4_MODEL
    with pytest.raises(NotFound) as caught:
        CATALOG.get("physical.nope")
    assert caught.value.reason == "FLAVOR_NOT_FOUND"
    assert "physical.s4.large" in caught.value.message


def test_hardware_models() -> None:
    assert CATALOG.hardware_models() == sorted({H2_MODEL, S4_MODEL})
    assert CATALOG.names_for_model(S4_MODEL) == ["physical.s4.large", "physical.s4.xlarge"]
    assert CATALOG.names_for_model("unknown") == []


class Flavors:
    """A FlavorRepository over a fixed list."""

    def __init__(self, flavors: list[Flavor]) -> None:
        self.flavors = flavors

    async def list_flavors(self) -> list[Flavor]:
        return sorted(self.flavors, key=lambda f: f.name)


async def test_directory_pages_through_every_flavor_once() -> None:
    flavors = [make_flavor(f"physical.f{i:02}", S4_MODEL) for i in range(7)]
    directory = FlavorDirectory(Flavors(flavors), PageTokens(b"k" * 32), FakePublicImages())
    names: list[str] = []
    token, pages = "", 0
    while True:
        page, token = await directory.list(3, token, "t")
        pages += 1
        names += [f.name for f in page]
        if not token:
            break
    assert names == [f.name for f in flavors]
    assert pages == 3
    page, token = await directory.list(0, "", "t")
    assert len(page) == 7 and token == ""


async def test_directory_refuses_foreign_tokens_and_bad_sizes() -> None:
    directory = FlavorDirectory(Flavors(list(FLAVORS)), PageTokens(b"k" * 32), FakePublicImages())
    foreign = PageTokens(b"k" * 32).encode(1, "alpha\n")
    with pytest.raises(InvalidArgument):
        await directory.list(1, foreign, "t")
    with pytest.raises(InvalidArgument):
        await directory.list(1001, "", "t")


async def test_directory_get() -> None:
    directory = FlavorDirectory(Flavors(list(FLAVORS)), PageTokens(b"k" * 32), FakePublicImages())
    assert (await directory.get("physical.h2.large", "t")).hardware_model == H2_MODEL
    with pytest.raises(NotFound):
        await directory.get("physical.nope", "t")


async def test_directory_offers_the_public_images_with_the_callers_token() -> None:
    published = FakePublicImages({"physical.h2.large": ["img-1", "img-2"]})
    directory = FlavorDirectory(Flavors(list(FLAVORS)), PageTokens(b"k" * 32), published)
    flavor = await directory.get("physical.h2.large", "caller-token")
    assert flavor.public_image_ids == ("img-1", "img-2")
    page, _ = await directory.list(0, "", "other-token")
    assert {f.name: f.public_image_ids for f in page}["physical.h2.large"] == ("img-1", "img-2")
    assert all(f.public_image_ids == () for f in page if f.name != "physical.h2.large")
    assert published.tokens == ["caller-token", "other-token"]
