"""Loads the shared catalog file (common/catalog.toml) and adds what is
missing to the image service's tables. The fleet reads the same file's
flavors itself (common.flavors.load_flavors) and never these tables."""

from __future__ import annotations

import asyncio
import tomllib
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, insert, select, update

from bms_image.common.disk_format import DiskSpec, write_disk
from bms_image.common.flavors import CATALOG_FILE
from bms_image.common.model import (
    Architecture,
    Image,
    ImageStatus,
    OsType,
    Plugin,
    PluginKind,
    Visibility,
)
from bms_image.common.staging import Staging, sha256_of_file
from bms_image.images.adapters.blobs.store import BlobStore
from bms_image.images.adapters.repository import FLAVOR_ROWS
from bms_image.images.adapters.rows import IMAGES, insert_image
from bms_image.store.db import SEED_LOCK, Database, serialize

#: Bulk data per public image: "tens of MiB" makes streaming realistic.
DEFAULT_BULK_BYTES = 32 * 1024 * 1024
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


async def seed_flavors(database: Database, catalog: Catalog | None = None) -> int:
    """Makes the image service's `flavors` table (what image_flavors refers
    to) say what the catalog file says: adds the flavors it lacks and brings
    back any whose hardware differs, since the fleet reads the file itself and
    both must agree on which hardware model a flavor is. Returns how many
    rows it added or changed."""
    catalog = catalog or load_catalog()

    def work(connection: Connection) -> int:
        serialize(connection, SEED_LOCK)
        stored = {row.name: dict(row._mapping) for row in connection.execute(select(FLAVOR_ROWS))}
        missing = [flavor for flavor in catalog.flavors if flavor["name"] not in stored]
        if missing:
            connection.execute(insert(FLAVOR_ROWS), missing)
        changed = [
            flavor
            for flavor in catalog.flavors
            if flavor["name"] in stored
            and any(stored[flavor["name"]].get(key) != value for key, value in flavor.items())
        ]
        for flavor in changed:
            connection.execute(
                update(FLAVOR_ROWS).where(FLAVOR_ROWS.c.name == flavor["name"]).values(**flavor)
            )
        return len(missing) + len(changed)

    return await database.run(work, write=True)


def disk_spec(image: Image, bulk_bytes: int) -> DiskSpec:
    """The system disk of a public catalog image: deterministic, so a lost
    blob is rebuilt byte for byte."""
    return DiskSpec(
        os_release={
            "NAME": image.os_distro,
            "ID": image.os_distro,
            "VERSION_ID": image.os_version,
            "PRETTY_NAME": image.display_name,
            "BMS_OS_TYPE": image.os_type.value,
            "BMS_ARCHITECTURE": image.architecture.value,
        },
        plugins=tuple(image.plugins),
        bulk_bytes=bulk_bytes,
        seed=image.id,
    )


async def _build_bytes(image: Image, blobs: BlobStore, staging: Staging, bulk_bytes: int) -> None:
    """Writes the image's disk into the blob store; sets its size and sha256."""
    path = staging.scratch(image.id, "seed")
    await asyncio.to_thread(write_disk, path, disk_spec(image, bulk_bytes))
    image.sha256, image.size_bytes = await asyncio.to_thread(sha256_of_file, path)
    await blobs.put_file(image.id, path)


async def seed(
    database: Database,
    blobs: BlobStore,
    staging: Staging,
    bulk_bytes: int = DEFAULT_BULK_BYTES,
    catalog: Catalog | None = None,
) -> int:
    """Inserts the flavors and public images that are not stored yet, each
    image with its bytes (a public image is never active without them), and
    rebuilds the bytes of active catalog images whose bytes are not all
    there (a lost blob, manifest or chunk: BlobStore.intact). Returns how
    many entries were added or repaired."""
    catalog = catalog or load_catalog()
    added = await seed_flavors(database, catalog)
    statuses = select(IMAGES.c.id, IMAGES.c.status).where(
        IMAGES.c.id.in_([i.id for i in catalog.images])
    )
    stored: dict[str, str] = dict(
        await database.run(lambda connection: connection.execute(statuses).all())
    )
    for image in catalog.images:
        status = stored.get(image.id)
        if status is not None and (
            status != ImageStatus.ACTIVE.value or await blobs.intact(image.id)
        ):
            continue
        await _build_bytes(image, blobs, staging, bulk_bytes)
        if await database.run(partial(_store_seeded, image, status is None), write=True):
            added += 1
    return added


def _store_seeded(image: Image, new: bool, connection: Connection) -> bool:
    """Inserts a catalog image, or repairs the size and digest of one whose
    bytes were rebuilt; False if another replica seeded it meanwhile."""
    serialize(connection, SEED_LOCK)
    if not new:
        connection.execute(
            update(IMAGES)
            .where(IMAGES.c.id == image.id)
            # A new revision: whatever rendered the image before (any replica's
            # memory of it) must not answer with the old size and digest.
            .values(
                size_bytes=image.size_bytes, sha256=image.sha256, revision=IMAGES.c.revision + 1
            )
        )
        return True
    if connection.execute(select(IMAGES.c.id).where(IMAGES.c.id == image.id)).first():
        return False
    now = datetime.now(UTC)
    insert_image(connection, replace(image, create_time=now, update_time=now))
    return True
