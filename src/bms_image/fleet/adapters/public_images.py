"""Which public images each flavor offers, as ImageService tells the caller:
ListFlavors and GetFlavor answer with them, and they are the image service's
data (the fleet never reads its tables)."""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence

import grpc

from bms.image.v1 import image_pb2, image_pb2_grpc
from bms_image.common.remote import domain_error

#: Public images, deprecated ones apart (a listing without a `deprecated`
#: condition leaves them out, and ListFlavors has always offered them).
_LISTINGS = ("type = public AND deprecated = false", "type = public AND deprecated = true")
_PAGE_SIZE = 1000
_FLAVOR_PREFIX = "flavors/"
_IMAGE_PREFIX = "images/"


def _metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _created(image: image_pb2.Image) -> tuple[int, int]:
    return (image.create_time.seconds, image.create_time.nanos)


class PublishedImages:
    """common.flavors.PublicImages over ImageService.ListImages, called with
    the caller's own token (public images are every caller's to see)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = image_pb2_grpc.ImageServiceStub(channel)

    async def by_flavor(self, token: str) -> Mapping[str, Sequence[str]]:
        listings = [await self._list(listing, token) for listing in _LISTINGS]
        by_flavor: dict[str, list[str]] = {}
        for image in heapq.merge(*listings, key=_created):  # oldest first, as listed
            image_id = image.name.removeprefix(_IMAGE_PREFIX)
            for flavor in image.supported_flavors:
                by_flavor.setdefault(flavor.removeprefix(_FLAVOR_PREFIX), []).append(image_id)
        return by_flavor

    async def _list(self, listing: str, token: str) -> list[image_pb2.Image]:
        images: list[image_pb2.Image] = []
        request = image_pb2.ListImagesRequest(page_size=_PAGE_SIZE, filter=listing)
        while True:
            try:
                page = await self._stub.ListImages(request, metadata=_metadata(token))
            except grpc.aio.AioRpcError as error:
                raise domain_error(error) from None
            images.extend(page.images)
            if not page.next_page_token:
                return images
            request.page_token = page.next_page_token
