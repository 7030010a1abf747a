"""Helpers of the data-plane tests (uploads, downloads, formats, crashes):
request builders, a verifying downloader, the data directory's files, qemu-img
wrappers and a service of a test's own. Plain functions and classes; the
tests use them as `import dataplane_support as dp`, `dp.upload(...)`, and
take what is not the data plane's own (random bytes, projects, tokens,
processes, rich errors) from `support.*` itself. The shared service is a
fixture of conftest.py."""

from __future__ import annotations

import asyncio
import functools
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from bms.image.v1 import image_pb2, image_pb2_grpc
from support import builders, chunk_store, errors, services
from support.builders import sha256_hex
from support.errors import RichError
from support.services import Serving, make_settings, serving
from support.tokens import Metadata

Stub = image_pb2_grpc.ImageServiceStub
#: A FAILED_PRECONDITION of the data plane names its condition or carries metadata.
expect_error = functools.partial(errors.expect_error, precondition="detail")

MiB = 1024 * 1024
#: The largest chunk an upload message may carry (the service's rule).
MAX_UPLOAD_CHUNK = 4 * MiB
ERROR_DOMAIN = "image.bms.cloud"
#: Upload chunk sizes that line up with nothing: cycled through by `upload`.
ODD_CHUNKS = (1, 4093, 65_537, MiB + 3, 3 * MiB - 1, 7)


QUEUED = image_pb2.IMAGE_STATUS_QUEUED
SAVING = image_pb2.IMAGE_STATUS_SAVING
ACTIVE = image_pb2.IMAGE_STATUS_ACTIVE
KILLED = image_pb2.IMAGE_STATUS_KILLED


def status_name(status: int) -> str:
    return str(image_pb2.ImageStatus.Name(status))


# -- image records ------------------------------------------------------------


def private_image(**overrides: Any) -> image_pb2.Image:
    """support.builders.private_image, named 'dataplane-test' unless told."""
    return builders.private_image(**{"display_name": "dataplane-test", **overrides})


async def create_image(images: Stub, metadata: Metadata, **overrides: Any) -> image_pb2.Image:
    created = await images.CreateImage(
        image_pb2.CreateImageRequest(image=private_image(**overrides)), metadata=metadata
    )
    assert created.status == QUEUED, status_name(created.status)
    assert created.uploaded_bytes == 0
    return created


async def get_image(images: Stub, metadata: Metadata, name: str) -> image_pb2.Image:
    return await images.GetImage(image_pb2.GetImageRequest(name=name), metadata=metadata)


async def wait_for_image(
    images: Stub,
    metadata: Metadata,
    name: str,
    status: int,
    within: float = 5.0,
) -> image_pb2.Image:
    """Polls GetImage until the image has `status` (an interrupted upload is
    put back to QUEUED by the server shortly after the stream breaks off)."""
    deadline = time.monotonic() + within
    while True:
        image = await get_image(images, metadata, name)
        if image.status == status:
            return image
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{name} is {status_name(image.status)} after {within}s, "
                f"expected {status_name(status)}: {image}"
            )
        await asyncio.sleep(0.02)


# -- uploads ------------------------------------------------------------------


def upload_metadata(
    name: str,
    *,
    offset: int = 0,
    size_bytes: int = 0,
    sha256: str = "",
    disk_format: int = image_pb2.DISK_FORMAT_UNSPECIFIED,
) -> image_pb2.UploadImageDataRequest:
    return image_pb2.UploadImageDataRequest(
        metadata=image_pb2.UploadImageDataMetadata(
            name=name,
            offset=offset,
            size_bytes=size_bytes,
            sha256=sha256,
            disk_format=disk_format,
        )
    )


def chunk_message(data: bytes) -> image_pb2.UploadImageDataRequest:
    return image_pb2.UploadImageDataRequest(chunk=data)


def split(data: bytes, sizes: Sequence[int] = ODD_CHUNKS) -> list[bytes]:
    """`data` cut into pieces whose sizes cycle through `sizes`."""
    pieces, position, index = [], 0, 0
    while position < len(data):
        size = sizes[index % len(sizes)]
        pieces.append(data[position : position + size])
        position += size
        index += 1
    assert b"".join(pieces) == data
    return pieces


async def request_stream(
    messages: Iterable[image_pb2.UploadImageDataRequest],
) -> AsyncIterator[image_pb2.UploadImageDataRequest]:
    for message in messages:
        yield message


async def upload(
    images: Stub,
    metadata: Metadata,
    name: str,
    data: bytes,
    *,
    offset: int = 0,
    size_bytes: int | None = None,
    sha256: str | None = None,
    disk_format: int = image_pb2.DISK_FORMAT_UNSPECIFIED,
    chunk_sizes: Sequence[int] = ODD_CHUNKS,
) -> image_pb2.Image:
    """Uploads `data` (the bytes from `offset` on). By default it declares the
    size and SHA-256 of `data` itself; pass 0 / "" to declare nothing."""
    first = upload_metadata(
        name,
        offset=offset,
        size_bytes=len(data) if size_bytes is None else size_bytes,
        sha256=sha256_hex(data) if sha256 is None else sha256,
        disk_format=disk_format,
    )
    messages = [first, *(chunk_message(piece) for piece in split(data, chunk_sizes))]
    result: image_pb2.Image = await images.UploadImageData(
        request_stream(messages), metadata=metadata
    )
    return result


async def resume_upload(
    images: Stub, metadata: Metadata, name: str, content: bytes, offset: int, **options: Any
) -> image_pb2.Image:
    """Uploads the rest of `content` from `offset`, declaring the size and
    SHA-256 of all of `content` (`options` as of `upload`)."""
    return await upload(
        images,
        metadata,
        name,
        content[offset:],
        offset=offset,
        size_bytes=len(content),
        sha256=sha256_hex(content),
        **options,
    )


def paced_requests(
    name: str,
    content: bytes,
    sent: int,
    more: asyncio.Event,
    counted: CountedRequests | None = None,
    piece: int = MiB,
) -> Callable[[], AsyncIterator[image_pb2.UploadImageDataRequest]]:
    """A request stream declaring all of `content`, sending its first `sent`
    bytes, then waiting for `more` before it sends the rest (`counted`
    counts what it sent before that)."""

    def count(message: image_pb2.UploadImageDataRequest) -> image_pb2.UploadImageDataRequest:
        return counted.count(message) if counted is not None else message

    async def requests() -> AsyncIterator[image_pb2.UploadImageDataRequest]:
        yield count(upload_metadata(name, size_bytes=len(content), sha256=sha256_hex(content)))
        for chunk in split(content[:sent], [piece]):
            yield count(chunk_message(chunk))
        if counted is not None:
            counted.paused.set()
        await more.wait()
        for chunk in split(content[sent:], [piece]):
            yield chunk_message(chunk)

    return requests


async def held_upload(
    images: Stub,
    metadata: Metadata,
    name: str,
    content: bytes,
    sent: int,
    data_dir: Path,
    more: asyncio.Event,
) -> grpc.aio.StreamUnaryCall:
    """An upload of `content` (see `paced_requests`) whose first `sent` bytes
    the server has taken in; the rest follows once `more` is set."""
    counted = CountedRequests(data_dir)
    call = images.UploadImageData(
        paced_requests(name, content, sent, more, counted)(), metadata=metadata
    )
    await counted.taken_in()
    return call


# -- downloads ----------------------------------------------------------------


@dataclass
class Download:
    data: bytes
    size_bytes: int
    sha256: str
    messages: int
    chunk_sizes: list[int] = field(default_factory=list)


async def download(
    images: Stub,
    metadata: Metadata,
    name: str,
    offset: int = 0,
    max_chunk: int | None = None,
) -> Download:
    """Downloads from `offset`, checking the stream's framing as it goes:
    every message's offset is where the previous one ended, every message
    carries the same total size, chunks are at most `max_chunk`, exactly the
    last message is marked last (and carries the SHA-256, no bytes)."""
    call = images.DownloadImageData(
        image_pb2.DownloadImageDataRequest(name=name, offset=offset), metadata=metadata
    )
    received: list[bytes] = []
    position = offset
    size: int | None = None
    final: image_pb2.DownloadImageDataResponse | None = None
    count = 0
    async for message in call:
        count += 1
        assert final is None, f"message after the last one: {message.offset}"
        assert message.offset == position, f"chunk at {message.offset}, expected {position}"
        if size is None:
            size = message.size_bytes
        assert message.size_bytes == size, "size_bytes changed within a stream"
        if message.last:
            assert message.chunk == b"", "the last message carries bytes"
            assert len(message.sha256) == 64
            final = message
            continue
        assert message.sha256 == "", "sha256 set before the last message"
        assert message.chunk, "an empty chunk before the last message"
        if max_chunk is not None:
            assert len(message.chunk) <= max_chunk
        received.append(message.chunk)
        position += len(message.chunk)
    assert final is not None, "the stream ended without a message marked last"
    assert size is not None
    assert position == size, f"stream ended at {position} of {size} bytes"
    return Download(
        data=b"".join(received),
        size_bytes=size,
        sha256=final.sha256,
        messages=count,
        chunk_sizes=[len(c) for c in received],
    )


async def download_verified(
    images: Stub, metadata: Metadata, name: str, max_chunk: int | None = None
) -> bytes:
    """The whole image, verified against the SHA-256 of the final message."""
    got = await download(images, metadata, name, 0, max_chunk)
    assert len(got.data) == got.size_bytes
    assert sha256_hex(got.data) == got.sha256, "downloaded bytes do not match the final sha256"
    return got.data


async def assert_stored(
    images: Stub, metadata: Metadata, image: image_pb2.Image, content: bytes
) -> None:
    """`image` (an upload's answer, or GetImage's) is ACTIVE with the size
    and SHA-256 of `content`, and downloads as exactly `content`."""
    assert image.status == ACTIVE, status_name(image.status)
    assert (image.size_bytes, image.sha256) == (len(content), sha256_hex(content))
    assert await download_verified(images, metadata, image.name) == content


# -- rich errors --------------------------------------------------------------


async def download_all(images: Stub, metadata: Metadata, name: str, offset: int = 0) -> None:
    """Drains a download (for expect_error on streams that fail)."""
    call = images.DownloadImageData(
        image_pb2.DownloadImageDataRequest(name=name, offset=offset), metadata=metadata
    )
    async for _ in call:
        pass


# -- the data directory -------------------------------------------------------


def image_id(name: str) -> str:
    return name.removeprefix("images/")


def files_of(data_dir: Path, name: str) -> list[Path]:
    """Every file the service keeps for one image: a whole blob of an
    earlier version, the files of the chunks its manifest and its staged
    upload name, and its scratch files (each once, sorted)."""
    key = image_id(name)
    found: set[Path] = set(chunk_store.chunk_files(data_dir, name))
    found |= set(chunk_store.chunk_files(data_dir, f"upload-{key}"))
    for sub in ("blobs", "staging"):
        directory = data_dir / sub
        if directory.exists():
            found |= {p for p in directory.iterdir() if p.name.startswith(key)}
    return sorted(found)


def assert_only_stored(data_dir: Path, name: str) -> None:
    """The image's bytes are stored (a complete manifest) and live only
    there: every file kept for it is a chunk of its manifest, each present;
    nothing is staged."""
    assert chunk_store.stored(data_dir, name), f"{name} is not stored"
    assert staged(data_dir, name) is None, f"{name} still has staged bytes"
    chunks = sorted(set(chunk_store.chunk_files(data_dir, name)))
    assert files_of(data_dir, name) == chunks
    assert all(path.is_file() for path in chunks), "a chunk of the manifest has no file"


def legacy_staging_file(data_dir: Path, name: str) -> Path:
    """Where versions before the chunk store staged an upload whole."""
    return data_dir / "staging" / f"{image_id(name)}.part"


def staged(data_dir: Path, name: str) -> bytes | None:
    """The bytes of the image's upload staged durably (None: nothing staged)."""
    return chunk_store.staged_bytes(data_dir, name)


async def wait_for_staged(data_dir: Path, name: str, size: int, within: float = 10.0) -> None:
    """Waits until at least `size` bytes of the image's upload are staged
    durably (they are, a batch of chunks at a time and at the stream's end)."""
    deadline = time.monotonic() + within
    while (chunk_store.staged_size(data_dir, name) or 0) < size:
        if time.monotonic() > deadline:
            found = chunk_store.staged_size(data_dir, name)
            raise AssertionError(f"{name} has {found} bytes staged after {within}s, not {size}")
        await asyncio.sleep(0.02)


class CountedRequests:
    """A request stream that counts the bytes of the messages it has sent
    and says when it has sent every one before its pause (`paused`), so that
    a test can wait until the service has taken them all in (`taken_in`)."""

    def __init__(self, where: Path | services.RunningService) -> None:
        """`where`: the in-process service, or its data directory."""
        self._service = services.running_at(where) if isinstance(where, Path) else where
        self._start = services.received_upload_bytes(self._service)
        self.sent = 0
        self.paused = asyncio.Event()

    def count(self, message: image_pb2.UploadImageDataRequest) -> image_pb2.UploadImageDataRequest:
        self.sent += message.ByteSize()
        return message

    async def taken_in(self, within: float = 10.0) -> None:
        """Waits until the stream paused and the service took in its messages."""
        await asyncio.wait_for(self.paused.wait(), within)
        deadline = time.monotonic() + within
        while (taken := services.received_upload_bytes(self._service)) < self._start + self.sent:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the service took in {taken - self._start} bytes after {within}s, "
                    f"not {self.sent}"
                )
            await asyncio.sleep(0.01)


def temp_blobs(data_dir: Path) -> list[Path]:
    """Temporary files of writes to the blob store: of whole blobs, and of
    chunks."""
    return sorted((data_dir / "blobs").glob(".tmp-*")) + chunk_store.temp_chunk_files(data_dir)


def file_size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


async def wait_for_file_size(path: Path, size: int, within: float = 5.0) -> None:
    """Waits until the server has written `size` bytes to `path` (writes of
    a few KiB may sit in the server's file buffer until the stream ends)."""
    deadline = time.monotonic() + within
    while (file_size(path) or 0) < size:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{path} has {file_size(path)} bytes after {within}s, expected {size}"
            )
        await asyncio.sleep(0.01)


# -- refused uploads ----------------------------------------------------------


async def assert_killed_and_clean(
    images: Stub, metadata: Metadata, name: str, data_dir: Path
) -> image_pb2.Image:
    """KILLED with a reason, no upload pending, and no byte of it left on disk."""
    image = await get_image(images, metadata, name)
    assert image.status == KILLED, status_name(image.status)
    assert image.status_reason
    assert image.uploaded_bytes == 0
    assert image.sha256 == ""
    assert image.size_bytes == 0
    assert files_of(data_dir, name) == []
    assert not chunk_store.stored(data_dir, name)
    assert temp_blobs(data_dir) == []
    return image


async def assert_untouched(images: Stub, metadata: Metadata, name: str, data_dir: Path) -> None:
    """Still QUEUED with no byte taken, and nothing of it on disk."""
    image = await get_image(images, metadata, name)
    assert (image.status, image.uploaded_bytes) == (QUEUED, 0), status_name(image.status)
    assert files_of(data_dir, name) == []
    assert not chunk_store.stored(data_dir, name)


@dataclass
class Killed:
    """An upload the service refused and the image it killed."""

    image: image_pb2.Image
    error: RichError


async def killed_upload(
    images: Stub,
    metadata: Metadata,
    data_dir: Path,
    content: bytes,
    code: grpc.StatusCode,
    reason: str | None = None,
    *,
    within: float | None = None,
    **options: Any,
) -> Killed:
    """A new image and an upload of `content` to it (`options` as of
    `upload`, at most `within` seconds) that fails with `code` (and `reason`)
    and leaves the image KILLED and clean (`assert_killed_and_clean`)."""
    created = await create_image(images, metadata)
    error = await expect_error(
        asyncio.wait_for(upload(images, metadata, created.name, content, **options), within),
        code,
        reason,
    )
    image = await assert_killed_and_clean(images, metadata, created.name, data_dir)
    return Killed(image, error)


# -- qemu-img -----------------------------------------------------------------

QEMU_IMG = shutil.which("qemu-img")
needs_qemu_img = pytest.mark.skipif(
    QEMU_IMG is None, reason="qemu-img is not installed (Debian package qemu-utils)"
)


def qemu_img(*args: str) -> str:
    assert QEMU_IMG is not None
    done = subprocess.run(
        [QEMU_IMG, *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"qemu-img {' '.join(args)} failed: {done.stderr}"
    return done.stdout


# -- a service of one's own ---------------------------------------------------


OwnService = Serving


def shared_service_fixtures() -> tuple[Any, Any]:
    """support.services.shared_service_fixtures: starting a service costs
    more than most data-plane tests, and these tests never see each other's
    images as each works in a project of its own (`fresh_project`)."""
    return services.shared_service_fixtures("dataplane-service")


def own_service(data_dir: Path, **overrides: Any) -> AbstractAsyncContextManager[Serving]:
    """A service with its own settings (support.services.serving)."""
    return serving(make_settings(data_dir, **overrides))
