"""Helpers of the data-plane tests (uploads, downloads, formats, crashes):
request builders, a verifying downloader, rich-status decoding, qemu-img
wrappers and a `bms-image serve` subprocess. Plain functions and classes, so
no second conftest.py; import them as `from dataplane_support import ...`."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from bms.image.v1 import image_pb2, image_pb2_grpc

Metadata = tuple[tuple[str, str], ...]
Stub = image_pb2_grpc.ImageServiceStub

MiB = 1024 * 1024
#: The largest chunk an upload message may carry (the service's rule).
MAX_UPLOAD_CHUNK = 4 * MiB
ERROR_DOMAIN = "image.bms.cloud"
#: Upload chunk sizes that line up with nothing: cycled through by `upload`.
ODD_CHUNKS = (1, 4093, 65_537, MiB + 3, 3 * MiB - 1, 7)

S4_MODEL = "s4-2288h-v5"

QUEUED = image_pb2.IMAGE_STATUS_QUEUED
SAVING = image_pb2.IMAGE_STATUS_SAVING
ACTIVE = image_pb2.IMAGE_STATUS_ACTIVE
KILLED = image_pb2.IMAGE_STATUS_KILLED


def random_bytes(size: int) -> bytes:
    """os.urandom content that is raw for certain: random bytes carry the
    MBR signature 55 AA at offset 510 once in 65536 draws, and the format
    inspector then reads them as a (broken, hence unsafe) partitioned disk."""
    data = bytearray(os.urandom(size))
    if size >= 512 and data[510:512] == b"\x55\xaa":
        data[511] = 0
    return bytes(data)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def status_name(status: int) -> str:
    return str(image_pb2.ImageStatus.Name(status))


# -- image records ------------------------------------------------------------


def private_image(**overrides: Any) -> image_pb2.Image:
    values: dict[str, Any] = {
        "display_name": "dataplane-test",
        "os_type": image_pb2.OS_TYPE_LINUX,
        "os_distro": "centos",
        "os_version": "7.6",
        "architecture": image_pb2.ARCHITECTURE_X86_64,
        "hardware_model": S4_MODEL,
    }
    values.update(overrides)
    return image_pb2.Image(**values)


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


# -- rich errors --------------------------------------------------------------


@dataclass
class RichError:
    error: grpc.aio.AioRpcError
    status: status_pb2.Status
    info: error_details_pb2.ErrorInfo
    bad_request: error_details_pb2.BadRequest | None = None
    precondition_failure: error_details_pb2.PreconditionFailure | None = None

    @property
    def fields(self) -> list[str]:
        assert self.bad_request is not None
        return [v.field for v in self.bad_request.field_violations]


def rich_error(error: grpc.aio.AioRpcError) -> RichError:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, f"{error.code().name} without rich status: {error.details()}"
    assert status.message == error.details()
    assert "Traceback" not in status.message
    infos = [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    assert len(infos) == 1, f"expected one ErrorInfo, got {status.details}"
    info = error_details_pb2.ErrorInfo()
    infos[0].Unpack(info)
    assert info.domain == ERROR_DOMAIN
    rich = RichError(error=error, status=status, info=info)
    for packed in status.details:
        if packed.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            rich.bad_request = error_details_pb2.BadRequest()
            packed.Unpack(rich.bad_request)
        if packed.Is(error_details_pb2.PreconditionFailure.DESCRIPTOR):
            rich.precondition_failure = error_details_pb2.PreconditionFailure()
            packed.Unpack(rich.precondition_failure)
    return rich


async def expect_code(call: Awaitable[Any], code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    """The call fails with `code` (no rich status required)."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    error = caught.value
    assert error.code() == code, f"expected {code.name}, got {error.code().name}: {error.details()}"
    assert "Traceback" not in (error.details() or "")
    return error


async def expect_error(
    call: Awaitable[Any], code: grpc.StatusCode, reason: str | None = None
) -> RichError:
    """The call fails with `code`, a google.rpc.Status with one ErrorInfo
    (with `reason`, if given) and the detail the code promises."""
    rich = rich_error(await expect_code(call, code))
    if reason is not None:
        assert rich.info.reason == reason, (
            f"expected reason {reason}, got {rich.info.reason}: {rich.status.message}"
        )
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert rich.bad_request is not None and rich.bad_request.field_violations
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        assert rich.precondition_failure is not None or rich.info.metadata
    return rich


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
    """Every file the service keeps for one image: its blob, staged upload
    and scratch files."""
    key = image_id(name)
    found: list[Path] = []
    for sub in ("blobs", "staging"):
        directory = data_dir / sub
        if directory.exists():
            found += [p for p in directory.iterdir() if p.name.startswith(key)]
    return sorted(found)


def blob_path(data_dir: Path, name: str) -> Path:
    return data_dir / "blobs" / f"{image_id(name)}.blob"


def staged_path(data_dir: Path, name: str) -> Path:
    return data_dir / "staging" / f"{image_id(name)}.part"


def temp_blobs(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "blobs").glob(".tmp-*"))


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


# -- a `bms-image serve` subprocess -------------------------------------------

BMS_IMAGE = Path(sys.executable).parent / "bms-image"
READY_LINE = "bms-image listening on "


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def clean_environ(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BMS_IMAGE_")}
    env.update(extra)
    return env


class ServeProcess:
    """`bms-image serve` on a data directory; restartable on the same one."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.process: subprocess.Popen[bytes] | None = None
        self.address = ""
        self.starts = 0

    def log_path(self, stream: str) -> Path:
        return self.data_dir / f"serve-{self.starts}.{stream}"

    def output(self) -> str:
        parts = []
        for stream in ("stdout", "stderr"):
            path = self.log_path(stream)
            text = path.read_text(errors="replace") if path.exists() else ""
            parts.append(f"--- {path.name} ---\n{text[-4000:]}")
        return "\n".join(parts)

    def start(self, timeout: float = 20.0) -> ServeProcess:
        assert BMS_IMAGE.exists(), f"no bms-image console script next to {sys.executable}"
        assert self.process is None or self.process.poll() is not None, "already running"
        self.starts += 1
        self.address = f"127.0.0.1:{free_port()}"
        env = clean_environ(
            BMS_IMAGE_LISTEN=self.address,
            BMS_IMAGE_DATA_DIR=str(self.data_dir),
            BMS_IMAGE_CATALOG_IMAGE_MIB="1",
            BMS_IMAGE_SHUTDOWN_GRACE_SECONDS="1",
        )
        with self.log_path("stdout").open("wb") as out, self.log_path("stderr").open("wb") as err:
            self.process = subprocess.Popen(
                [str(BMS_IMAGE), "serve"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )
        deadline = time.monotonic() + timeout
        while READY_LINE + self.address not in self.log_path("stdout").read_text(errors="replace"):
            if self.process.poll() is not None:
                pytest.fail(
                    f"bms-image serve exited with {self.process.returncode}\n{self.output()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"bms-image serve not ready after {timeout}s\n{self.output()}")
            time.sleep(0.05)
        return self

    def token(self, project: str, admin: bool = False) -> str:
        argv = [str(BMS_IMAGE), "token", "--project", project, "--data-dir", str(self.data_dir)]
        if admin:
            argv.append("--admin")
        done = subprocess.run(
            argv, env=clean_environ(), capture_output=True, text=True, timeout=30, check=False
        )
        assert done.returncode == 0, f"{argv} failed: {done.stderr}"
        return done.stdout.strip()

    def metadata(self, project: str) -> Metadata:
        return (("authorization", f"Bearer {self.token(project)}"),)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash or power loss of the process."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"bms-image serve ignored SIGTERM\n{self.output()}") from None


# -- a service of one's own ---------------------------------------------------


@dataclass
class OwnService:
    """A service started by the test with its own settings, its channel and
    stub; `metadata(project)` makes call metadata for it."""

    service: Any
    channel: grpc.aio.Channel
    images: Stub

    def metadata(self, project: str, admin: bool = False) -> Metadata:
        return (("authorization", f"Bearer {self.service.authority.issue(project, admin)}"),)

    @property
    def data_dir(self) -> Path:
        return Path(self.service.settings.data_dir)


def shared_service_fixtures() -> tuple[Any, Any]:
    """Module-scoped replacements of conftest's `service` and `channel`:
    starting a service (migrations, seeding the catalog bytes) costs more
    than most data-plane tests, and these tests never see each other's
    images as each works in a project of its own (`fresh_project`). A module
    using them runs on the module's event loop:
    `pytestmark = pytest.mark.asyncio(loop_scope="module")`."""
    import pytest_asyncio

    from bms_image.common.serving import RunningService
    from bms_image.processes import start
    from helpers import make_settings

    @pytest_asyncio.fixture(scope="module", loop_scope="module")
    async def service(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningService]:
        running = await start(make_settings(tmp_path_factory.mktemp("dataplane-service")))
        yield running
        await running.stop(0)

    @pytest_asyncio.fixture(scope="module", loop_scope="module")
    async def channel(service: RunningService) -> AsyncIterator[grpc.aio.Channel]:
        async with grpc.aio.insecure_channel(service.address) as opened:
            yield opened

    return service, channel


def fresh_project(prefix: str = "p") -> str:
    """A project name no other test uses (the private-image quota is per project)."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@contextlib.asynccontextmanager
async def own_service(data_dir: Path, **overrides: Any) -> AsyncIterator[OwnService]:
    from bms_image.processes import start
    from helpers import make_settings

    running = await start(make_settings(data_dir, **overrides))
    try:
        async with grpc.aio.insecure_channel(running.address) as channel:
            yield OwnService(running, channel, image_pb2_grpc.ImageServiceStub(channel))
    finally:
        await running.stop(0)
