"""Which public images each flavor offers, as ImageService tells the caller:
ListFlavors and GetFlavor answer with them, and they are the image service's
data (the fleet never reads its tables)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from itertools import chain

import grpc

from bms.image.v1 import image_pb2, image_pb2_grpc
from bms_image.common.paging import MAX_PAGE_SIZE
from bms_image.common.remote import bearer, domain_error

#: Public images, deprecated ones apart (a listing without a `deprecated`
#: condition leaves them out, and ListFlavors has always offered them).
_LISTINGS = ("type = public AND deprecated = false", "type = public AND deprecated = true")
#: Each ListImages call may take this long (gRPC does not pass the caller's
#: deadline on): a stuck image service fails ListFlavors, it does not hold it.
CALL_TIMEOUT_SECONDS = 30.0
_FLAVOR_PREFIX = "flavors/"
_IMAGE_PREFIX = "images/"


def _created(image: image_pb2.Image) -> tuple[int, int]:
    return (image.create_time.seconds, image.create_time.nanos)


class PublishedImages:
    """fleet.domain.ports.PublicImages over ImageService.ListImages, called with
    the caller's own token (public images are every caller's to see)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = image_pb2_grpc.ImageServiceStub(channel)

    async def by_flavor(self, token: str) -> Mapping[str, Sequence[str]]:
        listings = await asyncio.gather(*(self._list(listing, token) for listing in _LISTINGS))
        by_flavor: dict[str, list[str]] = {}
        # Oldest first; sorted() is stable, so equal times keep the listed order.
        for image in sorted(chain(*listings), key=_created):
            image_id = image.name.removeprefix(_IMAGE_PREFIX)
            for flavor in image.supported_flavors:
                by_flavor.setdefault(flavor.removeprefix(_FLAVOR_PREFIX), []).append(image_id)
        return by_flavor

    async def _list(self, listing: str, token: str) -> list[image_pb2.Image]:
        images: list[image_pb2.Image] = []
        request = image_pb2.ListImagesRequest(page_size=MAX_PAGE_SIZE, filter=listing)
        while True:
            try:
                page = await self._stub.ListImages(
                    request, metadata=(bearer(token),), timeout=CALL_TIMEOUT_SECONDS
                )
            except grpc.aio.AioRpcError as error:
                raise domain_error(error) from None
            images.extend(page.images)
            if not page.next_page_token:
                return images
            request.page_token = page.next_page_token
