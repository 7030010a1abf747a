"""The flavor catalog: static hardware offerings, loaded once and held in memory."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from bms_image.common.errors import NotFound
from bms_image.common.model import Flavor
from bms_image.common.paging import PageTokens, page_size_or_default


class FlavorRepository(Protocol):
    """Where the flavors are kept, with the public images published for each."""

    async def list_flavors(self) -> list[Flavor]:
        """Every flavor, by name."""


class FlavorCatalog:
    def __init__(self, flavors: Iterable[Flavor]) -> None:
        self._by_name = {flavor.name: flavor for flavor in sorted(flavors, key=lambda f: f.name)}
        self._models = sorted({flavor.hardware_model for flavor in self._by_name.values()})

    def all(self) -> list[Flavor]:
        return list(self._by_name.values())

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
    published for them (read fresh, since admins publish and delete images)."""

    def __init__(self, repository: FlavorRepository, page_tokens: PageTokens) -> None:
        self._repository = repository
        self._tokens = page_tokens

    async def list(self, page_size: int, page_token: str) -> tuple[list[Flavor], str]:
        limit = page_size_or_default(page_size)
        start = self._tokens.decode(page_token, "flavors")
        flavors = await self._repository.list_flavors()
        page = flavors[start : start + limit]
        more = start + limit < len(flavors)
        return page, self._tokens.encode(start + limit, "flavors") if more else ""

    async def get(self, name: str) -> Flavor:
        for flavor in await self._repository.list_flavors():
            if flavor.name == name:
                return flavor
        raise NotFound("FLAVOR_NOT_FOUND", f"flavor flavors/{name} not found")
