"""RenderedImages: pages built from kept bytes, as ListImages sends them."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest
from unit_fakes import ALPHA, BETA, FLAVORS, InMemoryImages, make_image

from bms.image.v1 import image_pb2
from bms_image.common.flavors import FlavorCatalog
from bms_image.common.model import Image, ImageType, Visibility
from bms_image.common.paging import PageTokens
from bms_image.images.domain.images import ImageCatalog
from bms_image.images.domain.query import ListedImage
from bms_image.images.grpc.convert import image_to_proto
from bms_image.images.grpc.rendering import RenderedImages

pytestmark = pytest.mark.asyncio

Known = Callable[[ListedImage], bool] | None


def _catalog() -> ImageCatalog:
    return ImageCatalog(InMemoryImages(), FlavorCatalog(FLAVORS), PageTokens(b"k" * 32))


def _listed(image: Image) -> ListedImage:
    return ListedImage(image.id, image.revision, image.seq, image.visibility, image.owner_project)


class Fetches:
    """A page's fetch: lists `images`, reads those not known; records calls."""

    def __init__(self, images: list[Image], token: str = "") -> None:
        self.images = images
        self.token = token
        self.calls: list[bool] = []  # whether each call was given a `known`

    async def __call__(self, known: Known) -> tuple[list[ListedImage], list[Image], str]:
        self.calls.append(known is not None)
        listed = [_listed(image) for image in self.images]
        wanted = {item.id for item in listed if known is None or not known(item)}
        read = [image for image in self.images if image.id in wanted]
        return listed, read, self.token


def _images(count: int, **fields: object) -> list[Image]:
    return [
        make_image(id=str(uuid.uuid4()), seq=index + 1, display_name=f"image {index}", **fields)
        for index in range(count)
    ]


async def test_a_page_is_the_images_in_order_and_the_token() -> None:
    catalog = _catalog()
    rendered = RenderedImages(catalog)
    images = _images(3, owner_project="alpha")
    fetch = Fetches(images, token="next")
    answer = image_pb2.ListImagesResponse.FromString(await rendered.page(ALPHA, fetch))
    assert [i.name for i in answer.images] == [f"images/{i.id}" for i in images]
    assert answer.next_page_token == "next"
    flavors = catalog.supported_flavors(images[0])
    expected = image_to_proto(images[0], ImageType.PRIVATE, flavors)
    assert answer.images[0] == expected


async def test_kept_images_are_not_read_again_and_viewers_are_kept_apart() -> None:
    rendered = RenderedImages(_catalog())
    images = _images(2, owner_project="alpha", visibility=Visibility.PRIVATE)
    first = Fetches(images)
    await rendered.page(ALPHA, first)
    again = Fetches(images)
    read_again: list[int] = []

    async def counting(known: Known) -> tuple[list[ListedImage], list[Image], str]:
        listed, read, token = await again(known)
        read_again.append(len(read))
        return listed, read, token

    mine = image_pb2.ListImagesResponse.FromString(await rendered.page(ALPHA, counting))
    assert read_again == [0], "the owner's renderings were kept"
    theirs = image_pb2.ListImagesResponse.FromString(await rendered.page(BETA, Fetches(images)))
    assert {i.type for i in mine.images} == {image_pb2.IMAGE_TYPE_PRIVATE}
    assert {i.type for i in theirs.images} == {image_pb2.IMAGE_TYPE_SHARED}


async def test_a_new_revision_is_rendered_anew() -> None:
    rendered = RenderedImages(_catalog())
    [image] = _images(1, owner_project="alpha")
    await rendered.page(ALPHA, Fetches([image]))
    image.revision, image.display_name = image.revision + 1, "renamed"
    answer = image_pb2.ListImagesResponse.FromString(await rendered.page(ALPHA, Fetches([image])))
    assert answer.images[0].display_name == "renamed"


async def test_an_entry_evicted_between_the_listing_and_the_page_is_read_again() -> None:
    rendered = RenderedImages(_catalog())
    images = _images(2, owner_project="alpha")
    await rendered.page(ALPHA, Fetches(images))
    fetch = Fetches(images)

    async def evicting(known: Known) -> tuple[list[ListedImage], list[Image], str]:
        answer = await fetch(known)
        rendered._kept.clear()  # other calls rendered meanwhile and evicted them
        return answer

    answer = image_pb2.ListImagesResponse.FromString(await rendered.page(ALPHA, evicting))
    assert fetch.calls == [True, False], "the second fetch reads every image"
    assert len(answer.images) == 2


async def test_the_memory_stays_within_its_limit() -> None:
    rendered = RenderedImages(_catalog(), limit_bytes=8 * 1024)
    images = _images(200, owner_project="alpha")
    for start in range(0, 200, 20):
        await rendered.page(ALPHA, Fetches(images[start : start + 20]))
    assert 0 < len(rendered) < 200
    assert rendered.kept_bytes <= 8 * 1024
