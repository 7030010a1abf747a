"""Simulated system disks whose content decides what they are.

Format (simple and inspectable with `head -c 4096` and `tar`):
  bytes 0..4095   header: b"BMSDISK1\\n" then a JSON object, zero padded:
                  {"version": 1, "partitions": [{"name", "mount", "offset", "size"}]}
  each partition  a POSIX tar archive at its offset, padded to 4 KiB.
The root partition holds /etc/os-release, the plug-in files and bulk data
that gives the disk a realistic size. Later partitions overlay earlier ones:
first boot appends a `cloud-init` partition (host name, SSH key, user data).

An EVS volume (quick provisioning) is a small file, b"BMSEVS1\\n" + JSON
{"base": <path of the image in the EVS pool>, "overlay": <a BMSDISK file>}:
a copy-on-write clone whose writes go to the overlay, never to the base."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from .domain.model import Plugin, PluginKind

MAGIC = b"BMSDISK1\n"
EVS_MAGIC = b"BMSEVS1\n"
HEADER_BYTES = 4096
ALIGN = 4096

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
    """The bytes do not start with a BMSDISK1 partition table: nothing boots."""


def _header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as handle:
        raw = handle.read(HEADER_BYTES)
    if not raw.startswith(MAGIC):
        raise NotASystemDisk(f"{path.name} is not a BMSDISK1 disk")
    try:
        return dict(json.loads(raw[len(MAGIC) :].rstrip(b"\0")))
    except ValueError:
        raise NotASystemDisk(f"{path.name} has a damaged partition table") from None


def _write_tar(handle: BinaryIO, files: Mapping[str, bytes]) -> None:
    with tarfile.open(fileobj=handle, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, content in sorted(files.items()):
            _add(archive, name, io.BytesIO(content), len(content))


def append_partition(path: Path, name: str, mount: str, files: Mapping[str, bytes]) -> None:
    """Adds a tar partition at the end of a disk and records it in the header.
    Blocking."""
    archive = io.BytesIO()
    _write_tar(archive, files)
    _append_raw(path, name, mount, archive.getvalue())


def _append_raw(path: Path, name: str, mount: str, partition: bytes) -> None:
    header = _header(path)
    with open(path, "r+b") as handle:
        handle.seek(0, os.SEEK_END)
        start = handle.tell()
        handle.write(partition)
        end = handle.tell()
        handle.write(b"\0" * (-(-end // ALIGN) * ALIGN - end))
        header["partitions"].append(
            {"name": name, "mount": mount, "offset": start, "size": end - start}
        )
        encoded = MAGIC + json.dumps(header, sort_keys=True).encode()
        if len(encoded) > HEADER_BYTES:
            raise ValueError("the partition table is full")
        handle.seek(0)
        handle.write(encoded.ljust(HEADER_BYTES, b"\0"))


def flatten(disk: Path, target: Path) -> None:
    """One plain disk file with everything the server sees: for an EVS clone,
    its base followed by the overlay's partitions. Blocking."""
    layers = _layers(disk)
    shutil.copyfile(layers[0], target)
    for layer in layers[1:]:
        for partition in _header(layer)["partitions"]:
            with open(layer, "rb") as handle:
                handle.seek(partition["offset"])
                data = handle.read(partition["size"])
            _append_raw(target, partition["name"], partition["mount"], data)


def os_release(disk: Path) -> dict[str, str]:
    """The disk's /etc/os-release as a dict (empty if there is none). Blocking."""
    content = read_file(disk, "etc/os-release") or b""
    release: dict[str, str] = {}
    for line in content.decode(errors="replace").splitlines():
        key, separator, value = line.partition("=")
        if separator:
            release[key.strip()] = value.strip().strip('"')
    return release


def new_overlay(path: Path) -> None:
    """An empty BMSDISK file: the writable part of an EVS clone."""
    with open(path, "wb") as handle:
        header = {"version": 1, "partitions": []}
        handle.write((MAGIC + json.dumps(header).encode()).ljust(HEADER_BYTES, b"\0"))


def write_evs_volume(path: Path, base: Path, overlay: Path) -> None:
    """A copy-on-write clone of base: constant time whatever its size."""
    new_overlay(overlay)
    path.write_bytes(EVS_MAGIC + json.dumps({"base": str(base), "overlay": str(overlay)}).encode())


def _layers(path: Path) -> list[Path]:
    with open(path, "rb") as handle:
        start = handle.read(len(EVS_MAGIC))
    if start == EVS_MAGIC:
        volume = json.loads(path.read_bytes()[len(EVS_MAGIC) :])
        return [Path(volume["base"]), Path(volume["overlay"])]
    return [path]


def writable_layer(path: Path) -> Path:
    """Where writes to a disk go: the disk itself, or an EVS clone's overlay."""
    return _layers(path)[-1]


def disk_size(path: Path) -> int:
    return sum(layer.stat().st_size for layer in _layers(path))


def _partitions(path: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    for layer in _layers(path):
        for partition in _header(layer)["partitions"]:
            yield layer, partition


def _archive_members(layer: Path, offset: int) -> list[tarfile.TarInfo]:
    with open(layer, "rb") as handle:
        handle.seek(offset)  # tarfile starts reading where the handle is
        with tarfile.open(fileobj=handle, mode="r:") as archive:
            return archive.getmembers()


def partition_layout(path: Path) -> list[tuple[str, str, int]]:
    """(name, mount, size) of every partition, in disk order. Blocking."""
    return [(p["name"], p["mount"], p["size"]) for _, p in _partitions(path)]


def list_files(path: Path) -> dict[str, int]:
    """Every file on the disk and its size; later partitions win. Blocking."""
    files: dict[str, int] = {}
    for layer, partition in _partitions(path):
        for member in _archive_members(layer, partition["offset"]):
            files[member.name] = member.size
    return files


def read_file(path: Path, name: str) -> bytes | None:
    """A file's content as the running server sees it (later partitions win),
    or None. Blocking."""
    found: bytes | None = None
    for layer, partition in _partitions(path):
        with open(layer, "rb") as handle:
            handle.seek(partition["offset"])
            with tarfile.open(fileobj=handle, mode="r:") as archive:
                try:
                    member = archive.getmember(name)
                except KeyError:
                    continue
                extracted = archive.extractfile(member)
                if extracted is not None:
                    found = extracted.read()
    return found
