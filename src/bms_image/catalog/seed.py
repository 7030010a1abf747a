"""Loads catalog/public.toml and adds what is missing to the database."""

from __future__ import annotations

import tomllib
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select

from ..domain.model import Architecture, Image, ImageStatus, OsType, Plugin, PluginKind, Visibility
from ..store.db import Database
from ..store.repository import to_row
from ..store.tables import FlavorRow, ImageRow

CATALOG_FILE = Path(__file__).with_name("public.toml")
_NAMESPACE = uuid.UUID("6f1c2a52-3b0e-4f4e-9f39-5d8f0b1f6a10")


def public_image_id(slug: str) -> str:
    """Stable ids, so every installation names the same public image alike."""
    return str(uuid.uuid5(_NAMESPACE, slug))


@dataclass(frozen=True)
class Catalog:
    flavors: list[dict[str, Any]]
    images: list[Image]


def load_catalog(path: Path = CATALOG_FILE) -> Catalog:
    data = tomllib.loads(path.read_text())
    images = [
        Image(
            id=public_image_id(entry["slug"]),
            display_name=entry["display_name"],
            description=entry.get("description", ""),
            visibility=Visibility.PUBLIC,
            owner_project=None,
            os_type=OsType(entry["os_type"]),
            os_distro=entry["os_distro"],
            os_version=entry["os_version"],
            architecture=Architecture(entry["architecture"]),
            min_disk_gb=entry.get("min_disk_gb", 40),
            status=ImageStatus.ACTIVE,
            supported_flavors=sorted(entry["flavors"]),
            plugins=[Plugin(PluginKind(kind), ver) for kind, ver in entry["plugins"].items()],
            tags=list(entry.get("tags", [])),
        )
        for entry in data["images"]
    ]
    return Catalog(flavors=list(data["flavors"]), images=images)


async def seed(database: Database, catalog: Catalog | None = None) -> int:
    """Inserts the flavors and public images that are not stored yet; returns
    how many rows were added."""
    catalog = catalog or load_catalog()
    added = 0
    now = datetime.now(UTC)
    async with database.write() as session:
        known_flavors = set((await session.scalars(select(FlavorRow.name))).all())
        for flavor in catalog.flavors:
            if flavor["name"] not in known_flavors:
                session.add(FlavorRow(**flavor))
                added += 1
        await session.flush()
        known_images = set((await session.scalars(select(ImageRow.id))).all())
        for image in catalog.images:
            if image.id not in known_images:
                image.create_time = image.update_time = now
                session.add(to_row(image))
                added += 1
    return added
