"""Where the chunks' bytes live: a ChunkObjects backend (local files here,
S3 objects in chunks.s3). The database says which chunks exist; a backend
only keeps bytes under names it is given (chunking.object_name)."""

from __future__ import annotations

import asyncio
import collections
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from bms_image.common.errors import is_storage_full, storage_full
from bms_image.common.staging import fsync_directory


class ChunkMissing(Exception):
    """The backend has no object under this name."""


class ChunkObjects(Protocol):
    """Immutable objects under names of hex digits and one dot."""

    name: str
    #: Requests made so far by kind (PUT, GET, DELETE, LIST): one an object
    #: (or, for DELETE and LIST, a request of up to 1,000), as S3 counts them.
    requests: collections.Counter[str]

    async def put(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Stores every object (replacing one of the same name) and returns
        once all are durable; each appears whole or not at all."""

    async def get(self, name: str) -> bytes:
        """The object's bytes; ChunkMissing if there is none."""

    async def exists(self, name: str) -> bool:
        """Whether there is an object under this name (its bytes unread)."""

    async def delete(self, names: Sequence[str]) -> None:
        """Removes the objects; names with no object are ignored."""

    async def names(self) -> list[str]:
        """Every object's name (for the sweep of orphans)."""

    async def ping(self) -> None:
        """Raises if the backend cannot be reached."""


_TEMP_PREFIX = ".tmp-"
#: A temporary file older than this belongs to no put in progress.
_TEMP_MAX_AGE_SECONDS = 3600.0


class LocalChunkObjects:
    """Objects as files under root/<first two hex digits>/<name>: a batch is
    written to temporary files, each fsynced, renamed into place, and every
    directory touched fsynced once."""

    name = "local"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: collections.Counter[str] = collections.Counter()
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"invalid chunk object name {name!r}")
        return self.root / name[:2] / name

    def _put(self, items: Sequence[tuple[str, bytes]]) -> None:
        directories: set[Path] = set()
        temps: list[tuple[Path, Path]] = []
        try:
            for name, data in items:
                target = self._path(name)
                target.parent.mkdir(exist_ok=True)
                temp = target.parent / f"{_TEMP_PREFIX}{uuid.uuid4().hex}"
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                temps.append((temp, target))
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                    os.fsync(fd)
                finally:
                    os.close(fd)
            for temp, target in temps:
                os.replace(temp, target)
                directories.add(target.parent)
            for directory in directories:
                fsync_directory(directory)
        except OSError as error:
            for temp, _ in temps:
                temp.unlink(missing_ok=True)
            if is_storage_full(error):
                raise storage_full("image store") from None
            raise

    async def put(self, items: Sequence[tuple[str, bytes]]) -> None:
        if items:
            self.requests["PUT"] += len(items)
            await asyncio.to_thread(self._put, items)

    def _get(self, name: str) -> bytes:
        try:
            return self._path(name).read_bytes()
        except FileNotFoundError:
            raise ChunkMissing(name) from None

    async def get(self, name: str) -> bytes:
        self.requests["GET"] += 1
        return await asyncio.to_thread(self._get, name)

    async def exists(self, name: str) -> bool:
        self.requests["HEAD"] += 1
        return await asyncio.to_thread(self._path(name).is_file)

    def _delete(self, names: Sequence[str]) -> None:
        for name in names:
            self._path(name).unlink(missing_ok=True)

    async def delete(self, names: Sequence[str]) -> None:
        if names:
            self.requests["DELETE"] += -(-len(names) // 1000)
            await asyncio.to_thread(self._delete, names)

    def _names(self) -> list[str]:
        found: list[str] = []
        for directory in self.root.iterdir():
            if directory.is_dir() and len(directory.name) == 2:
                for path in directory.iterdir():
                    if not path.name.startswith(_TEMP_PREFIX):
                        found.append(path.name)
                    elif time.time() - path.stat().st_mtime > _TEMP_MAX_AGE_SECONDS:
                        # A crash mid-put left it (a put in progress is younger).
                        path.unlink(missing_ok=True)
        return sorted(found)

    async def names(self) -> list[str]:
        found = await asyncio.to_thread(self._names)
        self.requests["LIST"] += max(1, -(-len(found) // 1000))
        return found

    async def ping(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise OSError(f"chunk directory {self.root} is not writable")
