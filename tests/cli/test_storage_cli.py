"""`bms-image storage`: the operator's view of the chunk store, read from
the database: two images of the same bytes are twice the logical bytes and
once the stored ones."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from typer.testing import CliRunner

from bms_image.cli import app
from bms_image.images.adapters.blobs.local import LocalBlobStore
from bms_image.images.adapters.chunks.objects import LocalChunkObjects
from bms_image.images.adapters.chunks.store import ChunkStore
from bms_image.store.db import IMAGES, Database

MiB = 1024 * 1024


async def _store_twice(data_dir: Path, data: bytes) -> None:
    database = Database(f"sqlite:///{data_dir / 'bms-image.db'}")
    try:
        await database.migrate(IMAGES)
        blobs = data_dir / "blobs"
        store = ChunkStore(database, LocalChunkObjects(blobs / "chunks"), LocalBlobStore(blobs))
        for key in ("one", "two"):
            source = data_dir / f"{key}.raw"
            source.write_bytes(data)
            await store.put_file(key, source)
    finally:
        await database.close()


def _figures(output: str) -> dict[str, str]:
    figures = {}
    for line in output.splitlines():
        label, _, rest = line.partition("  ")
        figures[label.strip()] = rest.split()[0]
    return figures


def test_storage_shows_logical_against_stored_bytes(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    asyncio.run(_store_twice(data_dir, os.urandom(3 * MiB)))
    result = CliRunner().invoke(app, ["storage", "--data-dir", str(data_dir)])
    assert result.exit_code == 0, result.output
    figures = _figures(result.output)
    assert figures["logical bytes"] == f"{6 * MiB:,}"
    stored = int(figures["stored bytes"].replace(",", ""))
    assert 3 * MiB <= stored < 3 * MiB + 4096, "each chunk once, plus its records"
    assert figures["manifests"] == "2"
    assert figures["chunks"] == "3"
    assert float(figures["dedup ratio"]) > 1.99
