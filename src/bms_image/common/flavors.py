"""The flavor catalog: static hardware offerings, loaded once and held in memory.

Both processes load the flavors from the shared catalog file (catalog.toml,
`load_flavors`); the image service also keeps them in its `flavors` table
(what image_flavors refers to). Which public images a flavor offers is image
data: the fleet asks ImageService for it (`PublicImages`), with the caller's
token, and never reads the image service's tables."""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from bms_image.common.errors import NotFound
from bms_image.common.model import Flavor
from bms_image.common.paging import PageTokens, page_size_or_default

#: The platform's flavors and public images, shipped with both processes.
CATALOG_FILE = Path(__file__).parent / "catalog.toml"


def load_flavors(path: Path = CATALOG_FILE) -> list[Flavor]:
    """The flavors of the catalog file, by name."""
    entries = tomllib.loads(path.read_text())["flavors"]
    return sorted((Flavor(**entry) for entry in entries), key=lambda flavor: flavor.name)


class FlavorRepository(Protocol):
    """Where the flavors are kept."""

    async def list_flavors(self) -> list[Flavor]:
        """Every flavor, by name."""


class PublicImages(Protocol):
    """The public images published for each flavor, as the caller sees them."""

    async def by_flavor(self, token: str) -> Mapping[str, Sequence[str]]:
        """Flavor name -> ids of the public images deployable on it (not
        deleted; deprecated ones too), oldest first."""


class FlavorCatalog:
    def __init__(self, flavors: Iterable[Flavor]) -> None:
        self._by_name = {flavor.name: flavor for flavor in sorted(flavors, key=lambda f: f.name)}
        self._models = sorted({flavor.hardware_model for flavor in self._by_name.values()})

    def all(self) -> list[Flavor]:
        return list(self._by_name.values())

    async def list_flavors(self) -> list[Flavor]:
        """The catalog as a FlavorRepository (the fleet's flavors)."""
        return self.all()

    def find(self, name: str) -> Flavor | None:
        return self._by_name.get(name)

    def get(self, name: str) -> Flavor:
        flavor = self._by_name.get(name)
        if flavor is None:
            raise NotFound(
                "FLAVOR_NOT_FOUND",
                f"flavor flavors/{name} not found; known flavors: {', '.join(self._by_name)}",
            )
        return flavor

    def hardware_models(self) -> list[str]:
        return list(self._models)

    def names_for_model(self, hardware_model: str) -> list[str]:
        return [f.name for f in self._by_name.values() if f.hardware_model == hardware_model]


class FlavorDirectory:
    """ListFlavors / GetFlavor: flavors with the public images currently
    published for them (read fresh, since admins publish and delete images:
    from `public_images` when given, else as the repository has them)."""

    def __init__(
        self,
        repository: FlavorRepository,
        page_tokens: PageTokens,
        public_images: PublicImages | None = None,
    ) -> None:
        self._repository = repository
        self._tokens = page_tokens
        self._public_images = public_images

    async def list(
        self, page_size: int, page_token: str, token: str = ""
    ) -> tuple[list[Flavor], str]:
        limit = page_size_or_default(page_size)
        start = self._tokens.decode(page_token, "flavors")
        flavors = await self._repository.list_flavors()
        page = await _with_images(flavors[start : start + limit], self._public_images, token)
        more = start + limit < len(flavors)
        return page, self._tokens.encode(start + limit, "flavors") if more else ""

    async def get(self, name: str, token: str = "") -> Flavor:
        for flavor in await self._repository.list_flavors():
            if flavor.name == name:
                return (await _with_images([flavor], self._public_images, token))[0]
        raise NotFound("FLAVOR_NOT_FOUND", f"flavor flavors/{name} not found")


async def _with_images(
    flavors: list[Flavor], public_images: PublicImages | None, token: str
) -> list[Flavor]:
    """The flavors with the public images `public_images` says they offer now."""
    if public_images is None or not flavors:
        return flavors
    published = await public_images.by_flavor(token)
    return [
        replace(flavor, public_image_ids=tuple(published.get(flavor.name, ())))
        for flavor in flavors
    ]
