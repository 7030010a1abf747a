"""The flavors as ProvisioningService offers them (ListFlavors, GetFlavor):
the shared catalog's hardware, with the public images the image service
publishes for each."""

from __future__ import annotations

from dataclasses import replace

from bms_image.common.errors import NotFound
from bms_image.common.flavors import FlavorRepository
from bms_image.common.model import Flavor
from bms_image.common.paging import PageTokens, page_size_or_default
from bms_image.fleet.domain.ports import PublicImages


class FlavorDirectory:
    """ListFlavors / GetFlavor: the flavors, with the public images currently
    published for them (asked fresh on every call, since admins publish and
    delete images)."""

    def __init__(
        self,
        repository: FlavorRepository,
        page_tokens: PageTokens,
        public_images: PublicImages,
    ) -> None:
        self._repository = repository
        self._tokens = page_tokens
        self._public_images = public_images

    async def list(self, page_size: int, page_token: str, token: str) -> tuple[list[Flavor], str]:
        limit = page_size_or_default(page_size)
        start = self._tokens.decode(page_token, "flavors")
        flavors = await self._repository.list_flavors()
        page = await _with_images(flavors[start : start + limit], self._public_images, token)
        more = start + limit < len(flavors)
        return page, self._tokens.encode(start + limit, "flavors") if more else ""

    async def get(self, name: str, token: str) -> Flavor:
        for flavor in await self._repository.list_flavors():
            if flavor.name == name:
                return (await _with_images([flavor], self._public_images, token))[0]
        raise NotFound("FLAVOR_NOT_FOUND", f"flavor flavors/{name} not found")


async def _with_images(
    flavors: list[Flavor], public_images: PublicImages, token: str
) -> list[Flavor]:
    """The flavors with the public images `public_images` says they offer now."""
    if not flavors:
        return flavors
    published = await public_images.by_flavor(token)
    return [
        replace(flavor, public_image_ids=tuple(published.get(flavor.name, ())))
        for flavor in flavors
    ]
