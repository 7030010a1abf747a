"""Simulated system disks whose content decides what they are.

Format (simple and inspectable with `head -c 4096` and `tar`):
  bytes 0..4095   header: b"BMSDISK1\\n" then a JSON object, zero padded:
                  {"version": 1, "partitions": [{"name", "mount", "offset", "size"}]}
  each partition  a POSIX tar archive at its offset, padded to 4 KiB.
The root partition holds /etc/os-release, the plug-in files and bulk data
that gives the disk a realistic size. Later partitions overlay earlier ones:
first boot appends a `cloud-init` partition (host name, SSH key, user data).

An EVS volume (quick provisioning) is a copy-on-write clone: a read-only
base (the image's file in the provisioner's cache) under an overlay, a
BMSDISK file of its own that takes every write. What the layers of a disk
are is never read from a disk's bytes (those may be a tenant's): the caller
names them, from its own record, as a `Layers`.

Every disk read here may hold a tenant's bytes, so every read is bounded:
the header is 4 KiB, a header names at most MAX_PARTITIONS partitions, each
inside its file; a disk holds at most MAX_MEMBERS tar members, each
partition read only within its extent, with tar headers of at most MAX_TAR_HEADER_BYTES;
and read_file returns at most `limit` bytes of a file. Tar members are only
ever read, never extracted, so no member name reaches a host path."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import tarfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from bms_image.common.model import Plugin, PluginKind

MAGIC = b"BMSDISK1\n"
HEADER_BYTES = 4096
ALIGN = 4096
#: Partitions one header may name (a 4 KiB table holds about 60).
MAX_PARTITIONS = 64
#: Tar members read from one disk (all its partitions and layers together)
#: before it counts as damaged.
MAX_MEMBERS = 100_000
#: The largest tar header block tarfile may read at once (PAX and GNU long
#: names are read whole): a longer one makes the partition count as damaged.
MAX_TAR_HEADER_BYTES = 64 * 1024
#: What read_file returns of a file at most unless told: plug-in files are
#: about 4 KiB, os-release less.
MAX_READ_BYTES = 1024 * 1024
_COPY_BYTES = 1024 * 1024

#: Where each plug-in lives on a disk.
PLUGIN_PATHS: dict[PluginKind, str] = {
    PluginKind.CLOUD_INIT: "usr/bin/cloud-init",
    PluginKind.CLOUDBASE_INIT: "Program Files/Cloudbase-Init/cloudbase-init.exe",
    PluginKind.BMS_NETWORK_CONFIG: "opt/huawei/network_config/bms-network-config",
    PluginKind.SDI_INIC_DRIVER: "lib/modules/sdi/hinic_sdi.ko",
}


def plugin_content(plugin: Plugin) -> bytes:
    """The known-good bytes of a plug-in release."""
    seed = f"{plugin.kind.value}-{plugin.version}".encode()
    body = hashlib.shake_256(seed).digest(4096)
    return f"#!bms-plugin {plugin.kind.value} {plugin.version}\n".encode() + body


class _PseudoRandom(io.RawIOBase):
    """Deterministic incompressible bytes, produced as they are read."""

    def __init__(self, seed: str, size: int) -> None:
        self._random = random.Random(seed)
        self._left = size

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        size = self._left if size is None or size < 0 else min(size, self._left)
        self._left -= size
        return self._random.randbytes(size)


@dataclass(frozen=True)
class DiskSpec:
    """Everything a root partition holds."""

    os_release: Mapping[str, str]
    plugins: tuple[Plugin, ...]
    bulk_bytes: int
    seed: str
    files: Mapping[str, bytes] | None = None


def _add(archive: tarfile.TarFile, name: str, data: BinaryIO, size: int) -> None:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 1_700_000_000
    info.mode = 0o644
    archive.addfile(info, data)


def write_disk(path: Path, spec: DiskSpec) -> None:
    """Writes a disk image file. Blocking: run it off the event loop."""
    with open(path, "wb") as handle:
        handle.write(b"\0" * HEADER_BYTES)
        start = handle.tell()
        with tarfile.open(fileobj=handle, mode="w", format=tarfile.PAX_FORMAT) as archive:
            release = "".join(f'{key}="{value}"\n' for key, value in spec.os_release.items())
            _add(archive, "etc/os-release", io.BytesIO(release.encode()), len(release.encode()))
            for plugin in spec.plugins:
                content = plugin_content(plugin)
                _add(archive, PLUGIN_PATHS[plugin.kind], io.BytesIO(content), len(content))
            for name, content in sorted((spec.files or {}).items()):
                _add(archive, name, io.BytesIO(content), len(content))
            if spec.bulk_bytes:
                bulk = _PseudoRandom(spec.seed, spec.bulk_bytes)
                _add(archive, "var/lib/bulk/data.bin", bulk, spec.bulk_bytes)  # type: ignore[arg-type]
        end = handle.tell()
        padded = -(-end // ALIGN) * ALIGN
        handle.write(b"\0" * (padded - end))
        header = {
            "version": 1,
            "partitions": [{"name": "root", "mount": "/", "offset": start, "size": end - start}],
        }
        handle.seek(0)
        handle.write(MAGIC + json.dumps(header, sort_keys=True).encode())


class NotASystemDisk(ValueError):
    """The bytes are no BMSDISK1 disk, or its partition table or a tar
    partition is damaged or beyond the bounds above: nothing boots."""


@dataclass(frozen=True)
class Layers:
    """What makes up a system disk, as its owner recorded it (never as a
    disk's bytes say): the writable top (a local disk, or an EVS clone's
    overlay) over an optional read-only base (an EVS clone's image). Nothing
    here writes to the base."""

    top: Path
    base: Path | None = None

    @property
    def files(self) -> tuple[Path, ...]:
        return (self.top,) if self.base is None else (self.base, self.top)


#: A disk: its layers, or one plain disk file (a disk of one layer).
Disk = Layers | Path


def _files(disk: Disk) -> tuple[Path, ...]:
    return (disk,) if isinstance(disk, Path) else disk.files


@dataclass(frozen=True)
class _Partition:
    name: str
    mount: str
    offset: int
    size: int


def _damaged(label: str, what: str) -> NotASystemDisk:
    return NotASystemDisk(f"{label} has a damaged partition table ({what})")


def _table(handle: BinaryIO, label: str) -> list[_Partition]:
    """The partition table of an open disk file, every entry checked: at
    most MAX_PARTITIONS, each inside the file."""
    handle.seek(0)
    raw = handle.read(HEADER_BYTES)
    if not raw.startswith(MAGIC):
        raise NotASystemDisk(f"{label} is not a BMSDISK1 disk")
    try:
        header = json.loads(raw[len(MAGIC) :].rstrip(b"\0"))
    except (ValueError, RecursionError):
        raise _damaged(label, "not JSON") from None
    entries = header.get("partitions") if isinstance(header, dict) else None
    if not isinstance(entries, list):
        raise _damaged(label, "no partition list")
    if len(entries) > MAX_PARTITIONS:
        raise _damaged(label, f"more than {MAX_PARTITIONS} partitions")
    file_size = os.fstat(handle.fileno()).st_size
    partitions: list[_Partition] = []
    for entry in entries:
        fields = entry if isinstance(entry, dict) else {}
        name, mount = fields.get("name"), fields.get("mount")
        offset, size = fields.get("offset"), fields.get("size")
        if not (
            isinstance(name, str)
            and isinstance(mount, str)
            and type(offset) is int
            and type(size) is int
            and HEADER_BYTES <= offset
            and 0 < size
            and offset + size <= file_size
        ):
            raise _damaged(label, "a partition outside the disk")
        partitions.append(_Partition(name, mount, offset, size))
    return partitions


class _Extent(io.RawIOBase):
    """One partition of an open disk file as tarfile reads it: a file of its
    own (position 0 is the partition's start, its end the end of the data),
    and no single read (a tar header block: PAX and GNU long names are read
    whole) larger than MAX_TAR_HEADER_BYTES."""

    def __init__(self, handle: BinaryIO, start: int, size: int) -> None:
        self._handle = handle
        self._start = start
        self._size = size
        handle.seek(start)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._handle.tell() - self._start

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_CUR:
            offset += self.tell()
        elif whence == os.SEEK_END:
            offset += self._size
        self._handle.seek(self._start + min(max(offset, 0), self._size))
        return self.tell()

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0 or size > MAX_TAR_HEADER_BYTES:
            raise NotASystemDisk(f"a tar header is larger than {MAX_TAR_HEADER_BYTES} bytes")
        return self._handle.read(min(size, max(self._size - self.tell(), 0)))


class _Budget:
    """Tar members one disk may have, all its partitions together."""

    def __init__(self) -> None:
        self.left = MAX_MEMBERS

    def spend(self, label: str) -> None:
        self.left -= 1
        if self.left < 0:
            raise NotASystemDisk(f"{label} has more than {MAX_MEMBERS} files")


def _members(
    handle: BinaryIO, partition: _Partition, label: str, budget: _Budget
) -> Iterator[tarfile.TarInfo]:
    """The tar members of one partition, read within its extent and the
    bounds; only one is held at a time. Their offsets are within the
    partition. The handle is free between them."""
    extent = _Extent(handle, partition.offset, partition.size)
    try:
        with tarfile.open(fileobj=extent, mode="r:") as archive:
            while (member := archive.next()) is not None:
                # TarFile keeps every member it has read (getmembers() returns
                # that list): only the one at hand is held here.
                archive.members.clear()  # type: ignore[attr-defined]
                budget.spend(label)
                if member.offset_data + member.size > partition.size:
                    raise NotASystemDisk(f"{label}: a file of {partition.name!r} runs past it")
                yield member
    except tarfile.TarError:
        raise NotASystemDisk(
            f"{label}: partition {partition.name!r} is no readable tar archive"
        ) from None


def _each_member(disk: Disk) -> Iterator[tuple[BinaryIO, int, tarfile.TarInfo]]:
    """Every member of every partition, in disk order (later ones win), with
    the handle of its layer and where its data starts there."""
    budget = _Budget()
    for layer in _files(disk):
        with open(layer, "rb") as handle:
            for partition in _table(handle, layer.name):
                for member in _members(handle, partition, layer.name, budget):
                    yield handle, partition.offset + member.offset_data, member


def partition_layout(disk: Disk) -> list[tuple[str, str, int]]:
    """(name, mount, size) of every partition, in disk order. Blocking."""
    layout: list[tuple[str, str, int]] = []
    for layer in _files(disk):
        with open(layer, "rb") as handle:
            layout += [(p.name, p.mount, p.size) for p in _table(handle, layer.name)]
    return layout


def list_files(disk: Disk) -> dict[str, int]:
    """Every file on the disk and its size; later partitions win. Blocking."""
    return {member.name: member.size for _, _, member in _each_member(disk)}


def read_file(disk: Disk, name: str, limit: int = MAX_READ_BYTES) -> bytes | None:
    """A file's content as the running server sees it (later partitions win),
    or None. At most `limit` bytes are read: a longer file comes back as its
    first limit + 1 bytes, so it never equals any content of `limit` bytes
    or fewer. A member of that name that is no regular file (a link, a
    directory) hides the file. Blocking."""
    found: bytes | None = None
    for handle, data_offset, member in _each_member(disk):
        if member.name != name:
            continue
        if not member.isreg():
            found = None
            continue
        position = handle.tell()
        handle.seek(data_offset)
        found = handle.read(min(member.size, limit + 1))
        handle.seek(position)
    return found


def os_release(disk: Disk) -> dict[str, str]:
    """The disk's /etc/os-release as a dict (empty if there is none). Blocking."""
    content = read_file(disk, "etc/os-release") or b""
    release: dict[str, str] = {}
    for line in content.decode(errors="replace").splitlines():
        key, separator, value = line.partition("=")
        if separator:
            release[key.strip()] = value.strip().strip('"')
    return release


def disk_size(disk: Disk) -> int:
    return sum(layer.stat().st_size for layer in _files(disk))


def new_overlay(path: Path) -> None:
    """An empty BMSDISK file: the writable part of an EVS clone. Blocking."""
    with open(path, "xb") as handle:
        header = {"version": 1, "partitions": []}
        handle.write((MAGIC + json.dumps(header).encode()).ljust(HEADER_BYTES, b"\0"))


def _write_tar(handle: BinaryIO, files: Mapping[str, bytes]) -> None:
    with tarfile.open(fileobj=handle, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, content in sorted(files.items()):
            _add(archive, name, io.BytesIO(content), len(content))


def _append(path: Path, name: str, mount: str, write: Callable[[BinaryIO], None]) -> None:
    """Writes a partition at the end of the disk file `path` and records it
    in its header; the file is left as it was if the table has no room."""
    with open(path, "r+b") as handle:
        partitions = _table(handle, path.name)
        handle.seek(0, os.SEEK_END)
        start = handle.tell()
        write(handle)
        end = handle.tell()
        entries: list[dict[str, Any]] = [
            {"name": p.name, "mount": p.mount, "offset": p.offset, "size": p.size}
            for p in partitions
        ]
        entries.append({"name": name, "mount": mount, "offset": start, "size": end - start})
        encoded = MAGIC + json.dumps({"version": 1, "partitions": entries}, sort_keys=True).encode()
        if len(entries) > MAX_PARTITIONS or len(encoded) > HEADER_BYTES:
            handle.truncate(start)
            raise NotASystemDisk(f"{path.name}: the partition table is full")
        handle.write(b"\0" * (-(-end // ALIGN) * ALIGN - end))
        handle.seek(0)
        handle.write(encoded.ljust(HEADER_BYTES, b"\0"))


def append_partition(top: Path, name: str, mount: str, files: Mapping[str, bytes]) -> None:
    """Adds a tar partition at the end of a disk's writable top (a local
    disk, an EVS overlay) and records it in its header. Blocking."""
    archive = io.BytesIO()
    _write_tar(archive, files)

    def write(handle: BinaryIO) -> None:
        handle.write(archive.getvalue())

    _append(top, name, mount, write)


def _copy_range(source: BinaryIO, offset: int, size: int, target: BinaryIO) -> None:
    source.seek(offset)
    while size > 0:
        chunk = source.read(min(size, _COPY_BYTES))
        if not chunk:
            raise NotASystemDisk("a partition ends before its recorded size")
        target.write(chunk)
        size -= len(chunk)


def flatten(disk: Disk, target: Path) -> None:
    """One plain disk file with everything the server sees: an EVS clone's
    base followed by its overlay's partitions, or a copy of a local disk.
    Blocking."""
    layers = disk if isinstance(disk, Layers) else Layers(disk)
    shutil.copyfile(layers.base or layers.top, target)
    os.chmod(target, 0o600)
    if layers.base is None:
        return
    with open(layers.top, "rb") as overlay:
        for partition in _table(overlay, layers.top.name):

            def copy(handle: BinaryIO, partition: _Partition = partition) -> None:
                _copy_range(overlay, partition.offset, partition.size, handle)

            _append(target, partition.name, partition.mount, copy)
