"""Simulated disks as tests see them: where the fleet keeps a server's disk
and the image cache, the disk a provisioner recorded, disk files to upload,
and a small real file system for ENOSPC."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
from sqlalchemy import make_url

from bms.image.v1 import image_pb2
from bms_image.common import disk_format as disks
from bms_image.common.disk_format import DiskSpec
from bms_image.common.model import PluginKind
from bms_image.fleet.adapters.image_source import cache_entry
from bms_image.fleet.domain.system_disks import LOCAL_DISK_FILE, DiskKind, SystemDisk

#: The proto enum of each plug-in kind.
PLUGIN_PROTO = {
    PluginKind.CLOUD_INIT: image_pb2.PLUGIN_KIND_CLOUD_INIT,
    PluginKind.CLOUDBASE_INIT: image_pb2.PLUGIN_KIND_CLOUDBASE_INIT,
    PluginKind.BMS_NETWORK_CONFIG: image_pb2.PLUGIN_KIND_BMS_NETWORK_CONFIG,
    PluginKind.SDI_INIC_DRIVER: image_pb2.PLUGIN_KIND_SDI_INIC_DRIVER,
}


def server_dir(data_dir: Path, server: str) -> Path:
    """Where the fleet keeps `servers/<id>`'s files."""
    return data_dir / "fleet" / "servers" / server.removeprefix("servers/")


def cache_dir(data_dir: Path) -> Path:
    """The fleet's image cache."""
    return data_dir / "fleet" / "image-cache"


def system_disk(data_dir: Path, server: str, database_url: str = "") -> disks.Layers:
    """A server's system disk as the fleet recorded it: an EVS clone (base
    and overlay) or the local disk."""
    return recorded_disk(data_dir, server, database_url)


def write_disk_file(path: Path, spec: DiskSpec) -> Path:
    """A simulated disk made from `spec` at `path`."""
    disks.write_disk(path, spec)
    return path


def recorded_disk(data_dir: Path, server: str, database_url: str = "") -> disks.Layers:
    """A server's system disk as its provisioner recorded it in its database
    (SQLite: `database_url`, or the file in data_dir): the fleet never reads
    what a disk is made of from the disk itself, and neither do tests. A
    server with no record yet gets where its local disk would be."""
    server_id = server.removeprefix("servers/")
    path = make_url(database_url).database if database_url else str(data_dir / "bms-image.db")
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as connection:
        row = connection.execute(
            "SELECT disk_kind, disk_top, disk_base_image, disk_base_sha256 FROM servers "
            "WHERE id = ?",
            (server_id,),
        ).fetchone()
    directory = data_dir / "fleet" / "servers" / server_id
    if row is None or not row[0]:
        return disks.Layers(directory / LOCAL_DISK_FILE)
    record = SystemDisk(DiskKind(row[0]), row[1], row[2], row[3])
    if record.kind is DiskKind.LOCAL:
        return disks.Layers(directory / record.top)
    base = cache_entry(data_dir / "fleet" / "image-cache", record.base_sha256)
    return disks.Layers(directory / record.top, base)


# -- a small file system -------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size_bytes: int) -> Iterator[Path]:
    """A tmpfs of `size_bytes` mounted on `path` (created if missing), for
    real ENOSPC; skips the test where mounting is not allowed (not root).
    `remount(path, size)` grows or shrinks it while mounted."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def remount(path: Path, size_bytes: int) -> None:
    subprocess.run(
        ["mount", "-o", f"remount,size={size_bytes}", str(path)], check=True, capture_output=True
    )
