"""Blobs as files in a directory. Writes are atomic: a temporary file is
written and fsynced, then renamed over the final name, and the directory is
fsynced, so a crash never leaves a partial blob under a final name."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from bms_image.common.staging import fsync_directory
from bms_image.images.adapters.blobs.store import (
    DEFAULT_CHUNK_BYTES,
    DEPLOYMENT_MARKER,
    BlobNotFound,
    PrefixOwned,
    is_storage_full,
    storage_full,
)

_SUFFIX = ".blob"
_TEMP_PREFIX = ".tmp-"


class LocalBlobStore:
    name = "local"

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.glob(_TEMP_PREFIX + "*"):
            leftover.unlink(missing_ok=True)  # a crash mid-copy left it; never a final name

    def _path(self, key: str) -> Path:
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"invalid blob key {key!r}")
        return self.root / (key + _SUFFIX)

    def _install(self, key: str, path: Path) -> None:
        """Moves (links, or copies across file systems) the file in under
        key. A failure leaves no temporary copy behind to hold space, and a
        full file system is STORAGE_FULL."""
        target = self._path(key)
        temp = self.root / f"{_TEMP_PREFIX}{uuid.uuid4().hex}"
        try:
            try:
                os.link(path, temp)  # same file system: no copy
            except OSError as error:
                if is_storage_full(error):
                    raise
                shutil.copyfile(path, temp)
            fd = os.open(temp, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, target)
            fsync_directory(self.root)
        except OSError as error:
            temp.unlink(missing_ok=True)
            if is_storage_full(error):
                raise storage_full("image store") from None
            raise
        path.unlink(missing_ok=True)

    async def put_file(self, key: str, path: Path) -> None:
        await asyncio.to_thread(self._install, key, path)

    async def read(
        self, key: str, offset: int = 0, chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ) -> AsyncIterator[bytes]:
        try:
            handle = await asyncio.to_thread(open, self._path(key), "rb")
        except FileNotFoundError:
            raise BlobNotFound(key) from None
        try:
            handle.seek(offset)
            while chunk := await asyncio.to_thread(handle.read, chunk_bytes):
                yield chunk
        finally:
            handle.close()

    async def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise BlobNotFound(key) from None

    async def intact(self, key: str) -> bool:
        return self._path(key).is_file()

    def _copy(self, source_key: str, target_key: str) -> None:
        source = self._path(source_key)
        if not source.exists():
            raise BlobNotFound(source_key)
        temp = self.root / f"{_TEMP_PREFIX}{uuid.uuid4().hex}"
        try:
            os.link(source, temp)  # blobs are immutable, so sharing the inode is safe
        except OSError:
            shutil.copyfile(source, temp)
        self._install(target_key, temp)

    async def copy(self, source_key: str, target_key: str) -> None:
        await asyncio.to_thread(self._copy, source_key, target_key)

    async def delete(self, key: str) -> None:
        path = self._path(key)
        # One lstat on the loop (a local directory, microseconds) spares most
        # deletes, images that never had bytes, a hand-over to a thread.
        if not os.path.lexists(path):  # noqa: ASYNC240
            return
        # Off the event loop: freeing the extents of a large file takes a while.
        await asyncio.to_thread(path.unlink, missing_ok=True)

    async def keys(self) -> list[str]:
        names = await asyncio.to_thread(lambda: list(self.root.glob("*" + _SUFFIX)))
        return sorted(p.name.removesuffix(_SUFFIX) for p in names)

    async def ping(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise OSError(f"blob directory {self.root} is not writable")

    def _claim(self, deployment: str) -> None:
        """The marker appears whole or not at all (written aside, then
        linked into place, which fails if another start linked first), so a
        crash mid-claim never leaves an empty marker that would refuse every
        later start."""
        marker = self.root / DEPLOYMENT_MARKER
        if not marker.exists():
            temp = self.root / f"{_TEMP_PREFIX}{uuid.uuid4().hex}"
            try:
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                try:
                    os.write(fd, deployment.encode())
                    os.fsync(fd)
                finally:
                    os.close(fd)
                with contextlib.suppress(FileExistsError):  # another start came first
                    os.link(temp, marker)
            finally:
                temp.unlink(missing_ok=True)
            fsync_directory(self.root)
        owner = marker.read_text().strip()
        if owner != deployment:
            raise PrefixOwned(owner)

    async def claim(self, deployment: str) -> None:
        await asyncio.to_thread(self._claim, deployment)
