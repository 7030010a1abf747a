"""Simulated system disks whose content decides what they are.

Format (simple and inspectable with `head -c 4096` and `tar`):
  bytes 0..4095   header: b"BMSDISK1\\n" then a JSON object, zero padded:
                  {"version": 1, "partitions": [{"name", "mount", "offset", "size"}]}
  each partition  a POSIX tar archive at its offset, padded to 4 KiB.
The root partition holds /etc/os-release, the plug-in files and bulk data
that gives the disk a realistic size."""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .domain.model import Plugin, PluginKind

MAGIC = b"BMSDISK1\n"
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


def known_good_sha256(plugin: Plugin) -> str:
    return hashlib.sha256(plugin_content(plugin)).hexdigest()


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
