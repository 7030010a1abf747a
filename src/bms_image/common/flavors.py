"""The flavor catalog: static hardware offerings, loaded once and held in memory.

Both processes load the flavors from the shared catalog file (catalog.toml,
`load_flavors`); the image service also keeps them in its `flavors` table
(what image_flavors refers to). Which public images a flavor offers is image
data: the fleet asks ImageService for it (`PublicImages`), with the caller's
token, and never reads the image service's tables."""

from __future__ import annotations

import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from bms_image.common.errors import NotFound
from bms_image.common.model import Flavor

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


class FlavorCatalog:
    def __init__(self, flavors: Iterable[Flavor]) -> None:
        self._by_name = {flavor.name: flavor for flavor in sorted(flavors, key=lambda f: f.name)}
        self._models = sorted({flavor.hardware_model for flavor in self._by_name.values()})
        #: Tells catalogs apart for what images show of them (which flavors
        #: run each hardware model): part of the key of a rendered image.
        self.fingerprint = hash(tuple((f.name, f.hardware_model) for f in self._by_name.values()))

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
