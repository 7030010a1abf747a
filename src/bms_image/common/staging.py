"""Local files written as they arrive: StagedUpload (appended, hashed as it
goes, fsynced) and PipelinedWriter (its writes off the event loop) serve the
fleet's image cache; Staging is the image service's local scratch directory
(conversions, the catalog's seed), whose legacy `<key>.part` files are the
uploads earlier versions staged whole there (the chunk store stages them now:
images.adapters.chunks.uploads)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bms_image.common.errors import StagedBytesMissing, is_storage_full, storage_full

__all__ = [
    "WRITEBACK_WINDOW_BYTES",
    "PipelinedWriter",
    "StagedBytesMissing",
    "StagedUpload",
    "Staging",
    "copy_written_back",
    "fsync_directory",
    "sha256_of_file",
]

log = logging.getLogger(__name__)

_READ_BLOCK = 4 * 1024 * 1024
#: Uploads are written back to disk in windows of this size as they arrive.
WRITEBACK_WINDOW_BYTES = 16 * 1024 * 1024


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StagedUpload:
    """An open staging file being appended to, hashing as it goes.
    Blocking methods: call them off the event loop.

    Writes go straight to the file descriptor (no user-space buffer), so
    `size` counts exactly the bytes the kernel accepted in whole chunks. A
    write that fails (ENOSPC...) breaks the upload: later writes are refused,
    and `close` cuts the file back to `size` (dropping a partial chunk), or,
    if even its fsync fails, to the bytes known durable when it was opened.
    After `close`, `size` is the number of durable bytes: what a resume may
    continue from."""

    def __init__(self, path: Path, offset: int, storage: str = "staging area") -> None:
        self.path = path
        self.sha256 = hashlib.sha256()
        self._storage = storage
        #: The write error that broke the upload (later writes are refused).
        self._broken: OSError | None = None
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as error:
            raise self._translated(error) from None
        try:
            self._resume(offset)
        except BaseException:
            os.close(self._fd)
            raise
        self.size = offset
        #: Bytes known durable: they were there when the upload resumed.
        self._durable = offset
        self._window_start = offset
        self._previous_window: tuple[int, int] | None = None
        self._closing = threading.Lock()
        self._closed = False

    def _resume(self, offset: int) -> None:
        """Hashes the first `offset` bytes (a resume continues the digest)
        and drops anything staged past them. Never pads: a file shorter than
        the offset raises StagedBytesMissing with what it really holds."""
        available = os.fstat(self._fd).st_size
        if available < offset:
            raise StagedBytesMissing(self.path.name, offset, available)
        if available > offset:
            os.ftruncate(self._fd, offset)
        position = 0
        while position < offset:
            block = os.pread(self._fd, min(offset - position, _READ_BLOCK), position)
            if not block:  # shrank under us
                raise StagedBytesMissing(self.path.name, offset, position)
            self.sha256.update(block)
            position += len(block)

    def _translated(self, error: OSError) -> Exception:
        """A new exception each time (one raised from several threads and
        futures would pile their tracebacks onto one object)."""
        if is_storage_full(error):
            return storage_full(self._storage)
        return OSError(error.errno, error.strerror)

    def write(self, chunk: bytes) -> None:
        if self._broken is not None:
            raise self._translated(self._broken)
        view = memoryview(chunk)
        position = self.size
        try:
            while view:
                written = os.pwrite(self._fd, view, position)
                view = view[written:]
                position += written
        except OSError as error:
            log.warning("writing to the %s failed: %s", self._storage, error)
            self._broken = error
            raise self._translated(error) from None
        self.sha256.update(chunk)
        self.size = position
        if self.size - self._window_start >= WRITEBACK_WINDOW_BYTES:
            self._write_back_window()

    def _write_back_window(self) -> None:
        """Starts writing the last window to disk and drops the window before
        it (clean by now) from the page cache. Without this a multi-GiB upload
        fills the page cache with dirty pages that the final fsync then writes
        all at once, and filling fresh cache pages is what costs most here."""
        length = self.size - self._window_start
        os.posix_fadvise(self._fd, self._window_start, length, os.POSIX_FADV_DONTNEED)
        if self._previous_window is not None:
            os.posix_fadvise(self._fd, *self._previous_window, os.POSIX_FADV_DONTNEED)
        self._previous_window = (self._window_start, length)
        self._window_start = self.size

    def close(self) -> None:
        """Makes what was written durable (for a later resume) and closes;
        the descriptor is closed whatever fails. Safe to call again and from
        two threads at once (a cancelled upload may close while its own close
        still runs in a thread): a second call returns once the first has
        made the bytes durable. Raises STORAGE_FULL if the bytes could not be
        made durable (`size` then counts only those that were)."""
        with self._closing:
            if self._closed:
                return
            self._closed = True
            try:
                if self._broken is not None:  # a partial chunk may follow `size`
                    os.ftruncate(self._fd, self.size)
                os.fsync(self._fd)
            except OSError as error:
                # Bytes whose write-back failed cannot be trusted: keep only
                # those that were durable before this upload wrote any.
                log.warning("making the %s durable failed: %s", self._storage, error)
                self.size = self._durable
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, self._durable)
                    os.fsync(self._fd)
                raise self._translated(error) from None
            finally:
                os.close(self._fd)


class PipelinedWriter:
    """Writes and hashes an upload's chunks in a worker thread of its own
    (hashlib and file writes release the GIL), so the event loop receives the
    next chunks meanwhile. At most `depth` chunks are in flight: memory stays
    bounded whatever the image size. One thread per upload keeps the order."""

    def __init__(self, staged: StagedUpload, depth: int = 4) -> None:
        self._staged = staged
        self._depth = depth
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="upload-writer")
        self._pending: deque[asyncio.Future[None]] = deque()

    async def write(self, chunk: bytes) -> None:
        loop = asyncio.get_running_loop()
        self._pending.append(loop.run_in_executor(self._executor, self._staged.write, chunk))
        if len(self._pending) >= self._depth:
            await self._pending.popleft()

    async def drain(self) -> None:
        """Waits for every chunk handed over; afterwards staged.size counts
        all bytes written. Call it on every path, failures included. Every
        write's outcome is collected; the first failure is raised."""
        first: BaseException | None = None
        try:
            while self._pending:
                try:
                    await self._pending.popleft()
                except Exception as error:
                    first = first or error
        finally:
            for left in self._pending:  # cancelled meanwhile: nobody awaits them
                left.add_done_callback(_retrieved)
            self._executor.shutdown(wait=False)
        if first is not None:
            raise first


def _retrieved(future: asyncio.Future[None]) -> None:
    """Marks a write's failure as seen (it was reported by an earlier one)."""
    if not future.cancelled():
        future.exception()


class Staging:
    """The image service's local scratch directory: a conversion's files
    (`<key>.<suffix>`), the catalog's seed, and the `<key>.part` files of
    uploads that earlier versions staged whole here."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def scratch(self, key: str, suffix: str) -> Path:
        """A scratch file of `key` (an image id: never a caller's text)."""
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"invalid staging key {key!r}")
        return self.root / f"{key}.{suffix}"

    def _files_of(self, key: str) -> list[Path]:
        """The files of a key (a prefix test, not a glob: the key would make
        a new pattern to compile on every call)."""
        prefix = key + "."
        with os.scandir(self.root) as entries:
            return [Path(e.path) for e in entries if e.name.startswith(prefix)]

    def discard(self, key: str) -> None:
        removed = False
        for path in self._files_of(key):
            path.unlink(missing_ok=True)
            removed = True
        if removed:  # nothing to make durable otherwise (most deletes)
            fsync_directory(self.root)

    def keys(self) -> list[str]:
        return sorted({p.name.split(".", 1)[0] for p in self.root.iterdir() if p.is_file()})

    def legacy_files(self, suffix: str) -> list[Path]:
        """The files named `<key><suffix>` (uploads staged by earlier versions)."""
        return sorted(p for p in self.root.iterdir() if p.is_file() and p.name.endswith(suffix))


def sha256_of_file(path: Path, block: int = 4 * 1024 * 1024) -> tuple[str, int]:
    """SHA-256 (hex) and size of a file. Blocking."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while data := handle.read(block):
            digest.update(data)
            size += len(data)
    return digest.hexdigest(), size


def copy_written_back(source: Path, target: Path) -> None:
    """Copies a file in the kernel (copy_file_range), writing the copy back
    to disk window by window instead of piling up dirty pages: on this kind
    of VM filling fresh page-cache pages is the dear part of a big copy.
    Blocking."""
    with open(source, "rb") as src, open(target, "wb") as dst:
        offset, previous = 0, None
        while copied := os.copy_file_range(src.fileno(), dst.fileno(), WRITEBACK_WINDOW_BYTES):
            os.posix_fadvise(dst.fileno(), offset, copied, os.POSIX_FADV_DONTNEED)
            if previous is not None:
                os.posix_fadvise(dst.fileno(), *previous, os.POSIX_FADV_DONTNEED)
            previous = (offset, copied)
            offset += copied
