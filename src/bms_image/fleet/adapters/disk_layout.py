"""The servers' disks on the hosts, the fleet's ServerDisks port: one
directory per server under `<root>/servers`, named by its uuid, holding its
data disks (`data-N.disk`) and the system disk its record names (a local
disk, or an EVS clone's overlay over the read-only cache entry of its
image). Every path is derived from our record alone, never from a disk's
bytes. All blocking work runs off the event loop."""

from __future__ import annotations

import asyncio
import re
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from bms_image.common import disk_format as disks
from bms_image.common.model import Partition
from bms_image.common.staging import copy_written_back
from bms_image.fleet.adapters.firstboot import plugin_states
from bms_image.fleet.domain.ports import PluginStates, UnreadableDisk
from bms_image.fleet.domain.servers import Server
from bms_image.fleet.domain.system_disks import DiskKind, SystemDisk

#: The files of a server's directory that are no system disk.
_DATA_DISK = re.compile(r"^data-[0-9]+\.disk\Z")


class ImageCache(Protocol):
    """Where the image cache keeps the bytes of an image (the image source)."""

    def entry(self, sha256: str) -> Path: ...

    def partial_downloads(self) -> list[Path]: ...


class DiskLayout:
    def __init__(self, root: Path, cache: ImageCache) -> None:
        self._root = root
        self._disks = root / "servers"
        self._disks.mkdir(parents=True, exist_ok=True)
        self._cache = cache

    def layers(self, server_id: str, record: SystemDisk) -> disks.Layers:
        """The files of a system disk, derived from our record alone: the
        server's directory (named by our uuid), the top file name we
        generated, the cache entry named by a checked SHA-256."""
        top = self._disks / str(uuid.UUID(server_id)) / record.top
        if record.kind is DiskKind.LOCAL:
            return disks.Layers(top)
        return disks.Layers(top, self._cache.entry(record.base_sha256))

    def _staged(self, server_id: str, record: SystemDisk) -> disks.Layers:
        """A new disk before it is installed: an EVS overlay is in place
        already, a local disk waits beside the one in use."""
        if record.kind is DiskKind.EVS:
            return self.layers(server_id, record)
        return disks.Layers(self._disks / server_id / f"{record.top}.new")

    async def write(self, server_id: str, record: SystemDisk, cached: Path) -> None:
        directory = self._disks / server_id
        await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
        staged = self._staged(server_id, record)
        if record.kind is DiskKind.EVS:
            await asyncio.to_thread(disks.new_overlay, staged.top)
        else:
            await asyncio.to_thread(copy_written_back, cached, staged.top)

    async def plugin_states(
        self, server_id: str, record: SystemDisk, staged: bool = False
    ) -> PluginStates:
        disk = self._staged(server_id, record) if staged else self.layers(server_id, record)
        try:
            return await asyncio.to_thread(plugin_states, disk)
        except disks.NotASystemDisk as error:
            raise UnreadableDisk(str(error)) from None

    async def append_first_boot(
        self, server_id: str, record: SystemDisk, files: Mapping[str, bytes]
    ) -> None:
        # Only the server's own file is written: its local disk, or its EVS
        # clone's overlay.
        top = self._staged(server_id, record).top
        try:
            await asyncio.to_thread(disks.append_partition, top, "cloud-init", "/", files)
        except disks.NotASystemDisk as error:
            raise UnreadableDisk(str(error)) from None

    async def install(self, server: Server, record: SystemDisk) -> None:
        await asyncio.to_thread(self._install, server, self._staged(server.id, record))

    def _install(self, server: Server, staged: disks.Layers) -> None:
        """Creates missing data disks (never touching others) and renames a
        new local disk into place; a new EVS overlay is already in place,
        named in the record that the caller writes next. Blocking."""
        directory = self._disks / server.id
        for index, size_gb in enumerate(server.data_disks_gb, start=1):
            data_disk = directory / f"data-{index}.disk"
            if not data_disk.exists():
                with open(data_disk, "wb") as handle:
                    handle.truncate(size_gb * 1024**3)  # sparse
        if staged.base is None:
            staged.top.replace(directory / SystemDisk.local().top)

    async def size(self, server_id: str, record: SystemDisk) -> int:
        return await asyncio.to_thread(disks.disk_size, self.layers(server_id, record))

    async def keep_only(self, server_id: str, record: SystemDisk | None) -> None:
        await asyncio.to_thread(_keep_only, self._disks / server_id, record)

    async def remove(self, server_id: str) -> None:
        await asyncio.to_thread(shutil.rmtree, self._disks / server_id, True)

    async def os_release(self, server_id: str, record: SystemDisk) -> dict[str, str]:
        return await asyncio.to_thread(disks.os_release, self.layers(server_id, record))

    async def partition_layout(self, server_id: str, record: SystemDisk) -> list[Partition]:
        layout = await asyncio.to_thread(disks.partition_layout, self.layers(server_id, record))
        return [Partition(name, mount, size) for name, mount, size in layout]

    def _flat(self, image_id: str) -> Path:
        return self._root / f".capture-{image_id}.disk"

    async def flatten(self, server_id: str, record: SystemDisk, image_id: str) -> Path:
        flat = self._flat(image_id)
        await asyncio.to_thread(disks.flatten, self.layers(server_id, record), flat)
        return flat

    async def discard_flat(self, image_id: str) -> None:
        await asyncio.to_thread(self._flat(image_id).unlink, missing_ok=True)

    async def remove_scratch(self) -> None:
        await asyncio.to_thread(self._remove_scratch)

    def _remove_scratch(self) -> None:
        """Flattened disks of captures and partial image downloads that a
        crash left behind (their work was failed). Blocking."""
        for leftover in (
            *self._root.glob(".capture-*.disk"),
            *self._cache.partial_downloads(),
        ):
            leftover.unlink(missing_ok=True)


def _keep_only(directory: Path, record: SystemDisk | None) -> None:
    """Removes from a server's directory every file but its data disks and
    the system disk its record names (none without a record): a new disk
    that never became the one in use, or the one it replaced. Blocking."""
    if not directory.is_dir():
        return
    for path in directory.iterdir():
        if _DATA_DISK.match(path.name) or (record is not None and path.name == record.top):
            continue
        path.unlink(missing_ok=True)
