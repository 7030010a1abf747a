"""Support of the fleet scenarios: a service started by the test itself with
its stubs, rich-status decoding, SSH keys, disk images built with
bms_image.common.disk_format, deployments followed to their end, captures polled to
ACTIVE, and the fleet's files on disk. Plain functions: import them as
`from scenario_support import ...` (never from a conftest module)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from bms.image.v1 import image_pb2, image_pb2_grpc, provisioning_pb2, provisioning_pb2_grpc
from bms_image.common import disk_format as disks
from bms_image.common.config import Settings
from bms_image.common.disk_format import DiskSpec
from bms_image.common.model import Plugin, PluginKind
from bms_image.common.serving import RunningService
from bms_image.images.adapters.catalog import public_image_id
from bms_image.processes import start
from helpers import make_settings, recorded_disk

Metadata = tuple[tuple[str, str], ...]
ImageStub = image_pb2_grpc.ImageServiceStub
ProvisioningStub = provisioning_pb2_grpc.ProvisioningServiceStub
Code = grpc.StatusCode
pb = provisioning_pb2

ERROR_DOMAIN = "image.bms.cloud"

S4 = "physical.s4.large"  # model s4-2288h-v5, boots from EVS
S4_MODEL = "s4-2288h-v5"

CENTOS = f"images/{public_image_id('centos-7.6-x86_64')}"
UBUNTU = f"images/{public_image_id('ubuntu-22.04-x86_64')}"
OPENEULER_ARM = f"images/{public_image_id('openeuler-22.03-aarch64')}"  # ki1 (Arm) only

LOCAL = pb.BOOT_SOURCE_LOCAL_DISK
EVS = pb.BOOT_SOURCE_EVS

VALIDATING = pb.PROVISIONING_STAGE_VALIDATING
STREAMING = pb.PROVISIONING_STAGE_IMAGE_STREAMING
VERIFYING = pb.PROVISIONING_STAGE_VERIFYING_CHECKSUM
CLONING = pb.PROVISIONING_STAGE_EVS_CLONING
FIRST_BOOT = pb.PROVISIONING_STAGE_FIRST_BOOT
NETWORK = pb.PROVISIONING_STAGE_NETWORK_CONFIGURED
STAGE_ACTIVE = pb.PROVISIONING_STAGE_ACTIVE
FAILED = pb.PROVISIONING_STAGE_FAILED

BUILDING = pb.SERVER_STATE_BUILDING
ACTIVE = pb.SERVER_STATE_ACTIVE
STOPPED = pb.SERVER_STATE_STOPPED
ERROR = pb.SERVER_STATE_ERROR
REBUILDING = pb.SERVER_STATE_REBUILDING

NET_UP = pb.NETWORK_STATE_UP
NET_DOWN = pb.NETWORK_STATE_DOWN

# What the public catalog puts on the CentOS 7.6 disk.
CENTOS_PLUGINS = (
    Plugin(PluginKind.CLOUD_INIT, "0.7.9"),
    Plugin(PluginKind.BMS_NETWORK_CONFIG, "2.1.3"),
    Plugin(PluginKind.SDI_INIC_DRIVER, "1.2.0"),
)
CENTOS_RELEASE = {
    "NAME": "centos",
    "ID": "centos",
    "VERSION_ID": "7.6",
    "BMS_OS_TYPE": "linux",
    "BMS_ARCHITECTURE": "x86_64",
}
NETWORK_CONFIG_PATH = disks.PLUGIN_PATHS[PluginKind.BMS_NETWORK_CONFIG]

_PLUGIN_PROTO = {
    PluginKind.CLOUD_INIT: image_pb2.PLUGIN_KIND_CLOUD_INIT,
    PluginKind.CLOUDBASE_INIT: image_pb2.PLUGIN_KIND_CLOUDBASE_INIT,
    PluginKind.BMS_NETWORK_CONFIG: image_pb2.PLUGIN_KIND_BMS_NETWORK_CONFIG,
    PluginKind.SDI_INIC_DRIVER: image_pb2.PLUGIN_KIND_SDI_INIC_DRIVER,
}


def stage_name(stage: int) -> str:
    return str(pb.ProvisioningStage.Name(stage))  # type: ignore[arg-type]


def state_name(state: int) -> str:
    return str(pb.ServerState.Name(state))  # type: ignore[arg-type]


def plugin_pairs(plugins: Iterable[image_pb2.Plugin]) -> set[tuple[int, str]]:
    return {(p.kind, p.version) for p in plugins}


def expected_plugin_pairs(plugins: Iterable[Plugin]) -> set[tuple[int, str]]:
    return {(_PLUGIN_PROTO[p.kind], p.version) for p in plugins}


# -- a service of the test's own ----------------------------------------------------


@dataclass
class Cloud:
    """A service (image service with the embedded fleet) and its stubs."""

    service: RunningService
    settings: Settings
    images: ImageStub
    provisioning: ProvisioningStub

    @property
    def data_dir(self) -> Path:
        return Path(self.settings.data_dir)

    def md(self, project: str, admin: bool = False) -> Metadata:
        return (("authorization", f"Bearer {self.service.authority.issue(project, admin)}"),)


@asynccontextmanager
async def cloud(tmp_path: Path, **overrides: object) -> AsyncIterator[Cloud]:
    """Starts the service in this process, on a loopback port; stops it."""
    settings = make_settings(tmp_path, **overrides)
    running = await start(settings)
    try:
        async with grpc.aio.insecure_channel(
            running.address,
            options=[("grpc.max_receive_message_length", 16 * 1024 * 1024)],
        ) as channel:
            yield Cloud(
                running,
                settings,
                image_pb2_grpc.ImageServiceStub(channel),
                provisioning_pb2_grpc.ProvisioningServiceStub(channel),
            )
    finally:
        await running.stop(0)


# -- errors -------------------------------------------------------------------------


@dataclass
class RichError:
    """A failed call with its decoded google.rpc.Status details."""

    error: grpc.RpcError
    status: status_pb2.Status
    info: error_details_pb2.ErrorInfo
    precondition_failure: error_details_pb2.PreconditionFailure | None = None

    @property
    def code(self) -> grpc.StatusCode:
        return self.error.code()  # type: ignore[no-any-return]

    @property
    def reason(self) -> str:
        return self.info.reason

    @property
    def message(self) -> str:
        return self.error.details() or ""  # type: ignore[no-any-return]

    @property
    def violations(self) -> list[error_details_pb2.PreconditionFailure.Violation]:
        return list(self.precondition_failure.violations) if self.precondition_failure else []


def decode(error: grpc.RpcError) -> RichError:
    """The rich status of a failed call: one ErrorInfo of our domain and no
    INTERNAL, UNKNOWN or traceback anywhere."""
    code = error.code()  # type: ignore[attr-defined]
    details = error.details() or ""  # type: ignore[attr-defined]
    assert code not in (Code.INTERNAL, Code.UNKNOWN), f"{code.name}: {details}"
    assert "Traceback" not in details
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, f"{code.name} without google.rpc.Status: {details}"
    infos = [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    assert len(infos) == 1, f"expected exactly one ErrorInfo, got {status.details}"
    info = error_details_pb2.ErrorInfo()
    infos[0].Unpack(info)
    assert info.domain == ERROR_DOMAIN, info
    rich = RichError(error=error, status=status, info=info)
    for packed in status.details:
        if packed.Is(error_details_pb2.PreconditionFailure.DESCRIPTOR):
            rich.precondition_failure = error_details_pb2.PreconditionFailure()
            packed.Unpack(rich.precondition_failure)
    return rich


async def expect_error(call: Awaitable[Any], code: grpc.StatusCode, reason: str = "") -> RichError:
    """Awaits a call that must fail with `code` (and `reason`, when given)."""
    try:
        response = await call
    except grpc.aio.AioRpcError as error:
        rich = decode(error)
    else:
        raise AssertionError(f"expected {code.name}, the call succeeded: {response}")
    assert rich.code == code, f"expected {code.name}, got {rich.code.name}: {rich.message}"
    if reason:
        assert rich.reason == reason, f"expected {reason}, got {rich.reason}: {rich.message}"
    return rich


async def expect_stream_error(
    stream: Any, code: grpc.StatusCode, reason: str = "", within: float = 30.0
) -> RichError:
    """A streaming call that must fail before it streams any event."""
    received: list[Any] = []

    async def run() -> None:
        async for event in stream:
            received.append(event)

    rich = await expect_error(asyncio.wait_for(run(), within), code, reason)
    assert received == [], f"events streamed before the error: {received}"
    return rich


# -- SSH keys -----------------------------------------------------------------------


@dataclass(frozen=True)
class SshKey:
    line: str
    fingerprint: str


def new_ssh_key(comment: str = "ops@scenario") -> SshKey:
    """A real Ed25519 key in OpenSSH format and its OpenSSH SHA256 fingerprint,
    computed from the raw key bytes (the wire blob), not from the text line."""
    public = Ed25519PrivateKey.generate().public_key()
    line = public.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()
    raw = public.public_bytes(Encoding.Raw, PublicFormat.Raw)
    kind = b"ssh-ed25519"
    blob = struct.pack(">I", len(kind)) + kind + struct.pack(">I", len(raw)) + raw
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return SshKey(f"{line} {comment}", f"SHA256:{digest}")


# -- deployments --------------------------------------------------------------------


def create_request(
    image: str = CENTOS,
    count: int = 1,
    name_prefix: str = "web",
    ssh_public_key: str = "",
    boot_source: int = pb.BOOT_SOURCE_UNSPECIFIED,
    data_disks_gb: Sequence[int] = (),
    flavor: str = S4,
) -> provisioning_pb2.CreateServersRequest:
    return pb.CreateServersRequest(
        flavor=f"flavors/{flavor}",
        image=image,
        count=count,
        name_prefix=name_prefix,
        ssh_public_key=ssh_public_key,
        boot_source=boot_source,  # type: ignore[arg-type]
        data_disks_gb=list(data_disks_gb),
    )


@dataclass
class Events:
    """The events of a CreateServers or ReinstallServer stream, by server in
    the order the servers first appeared."""

    events: list[provisioning_pb2.ServerEvent]
    by_server: dict[str, list[provisioning_pb2.ServerEvent]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for event in self.events:
            self.by_server.setdefault(event.server, []).append(event)

    @property
    def servers(self) -> list[str]:
        return list(self.by_server)

    def stages(self, server: str) -> list[int]:
        return [e.stage for e in self.by_server[server]]

    def final(self, server: str) -> provisioning_pb2.ServerEvent:
        return self.by_server[server][-1]

    def describe(self, server: str) -> list[str]:
        return [f"{stage_name(e.stage)}: {e.message}" for e in self.by_server[server]]


async def collect(stream: Any, within: float = 60.0) -> Events:
    async def run() -> list[provisioning_pb2.ServerEvent]:
        return [event async for event in stream]

    return Events(await asyncio.wait_for(run(), within))


async def deploy(
    cloud: Cloud, md: Metadata, request: provisioning_pb2.CreateServersRequest, within: float = 60
) -> Events:
    """CreateServers followed to its end; every server must end ACTIVE."""
    events = await collect(cloud.provisioning.CreateServers(request, metadata=md), within)
    assert len(events.servers) == request.count, events.servers
    for server in events.servers:
        final = events.final(server)
        assert final.stage == STAGE_ACTIVE, events.describe(server)
        assert final.state == ACTIVE, events.describe(server)
    return events


async def deploy_one(
    cloud: Cloud, md: Metadata, request: provisioning_pb2.CreateServersRequest
) -> provisioning_pb2.Server:
    events = await deploy(cloud, md, request)
    (name,) = events.servers
    return await get_server(cloud, md, name)


async def reinstall(
    cloud: Cloud, md: Metadata, request: provisioning_pb2.ReinstallServerRequest
) -> Events:
    return await collect(cloud.provisioning.ReinstallServer(request, metadata=md))


async def get_server(cloud: Cloud, md: Metadata, name: str) -> provisioning_pb2.Server:
    server: provisioning_pb2.Server = await cloud.provisioning.GetServer(
        pb.GetServerRequest(name=name), metadata=md
    )
    return server


async def stop_server(cloud: Cloud, md: Metadata, name: str) -> provisioning_pb2.Server:
    server: provisioning_pb2.Server = await cloud.provisioning.StopServer(
        pb.StopServerRequest(name=name), metadata=md
    )
    assert server.state == STOPPED, server
    return server


async def poll(
    read: Callable[[], Awaitable[Any]],
    done: Callable[[Any], bool],
    within: float,
    every: float = 0.1,
) -> Any:
    """Reads until `done` holds or `within` seconds passed; returns the last read."""
    deadline = time.monotonic() + within
    while True:
        value = await read()
        if done(value) or time.monotonic() > deadline:
            return value
        await asyncio.sleep(every)


# -- images -------------------------------------------------------------------------


async def capture(
    cloud: Cloud, md: Metadata, server: str, display_name: str, within: float = 60.0
) -> image_pb2.Image:
    """CreateImage with source_server, then GetImage until the image is ACTIVE."""
    created: image_pb2.Image = await cloud.images.CreateImage(
        image_pb2.CreateImageRequest(
            image=image_pb2.Image(display_name=display_name), source_server=server
        ),
        metadata=md,
    )
    assert created.status == image_pb2.IMAGE_STATUS_QUEUED, created
    assert created.source_server == server
    image: image_pb2.Image = await poll(
        lambda: cloud.images.GetImage(image_pb2.GetImageRequest(name=created.name), metadata=md),
        lambda image: (
            image.status != image_pb2.IMAGE_STATUS_QUEUED
            and image.status != image_pb2.IMAGE_STATUS_SAVING
        ),
        within,
    )
    assert image.status == image_pb2.IMAGE_STATUS_ACTIVE, image
    return image


async def wait_released(
    cloud: Cloud, md: Metadata, server: str, within: float = 5.0
) -> provisioning_pb2.Server:
    """The server once no work holds it any more (a capture lets go of it)."""
    found: provisioning_pb2.Server = await poll(
        lambda: get_server(cloud, md, server), lambda s: s.task == "", within, every=0.02
    )
    assert found.task == "", f"{server} still held by a {found.task} after {within}s"
    return found


def write_disk_file(path: Path, spec: DiskSpec) -> Path:
    disks.write_disk(path, spec)
    return path


def disk_spec(
    bulk_bytes: int = 64 * 1024,
    files: Mapping[str, bytes] | None = None,
    plugins: Sequence[Plugin] = CENTOS_PLUGINS,
    seed: str = "scenario",
) -> DiskSpec:
    return DiskSpec(
        os_release=dict(CENTOS_RELEASE),
        plugins=tuple(plugins),
        bulk_bytes=bulk_bytes,
        seed=seed,
        files=dict(files or {}),
    )


async def upload_disk_image(
    cloud: Cloud, md: Metadata, disk: Path, display_name: str = "golden"
) -> image_pb2.Image:
    """A private CentOS image (model s4-2288h-v5) whose bytes are `disk`."""
    sha256, size = await asyncio.to_thread(sha256_and_size, disk)
    created: image_pb2.Image = await cloud.images.CreateImage(
        image_pb2.CreateImageRequest(
            image=image_pb2.Image(
                display_name=display_name,
                os_type=image_pb2.OS_TYPE_LINUX,
                os_distro="centos",
                os_version="7.6",
                architecture=image_pb2.ARCHITECTURE_X86_64,
                hardware_model=S4_MODEL,
                plugins=[
                    image_pb2.Plugin(kind=_PLUGIN_PROTO[p.kind], version=p.version)
                    for p in CENTOS_PLUGINS
                ],
            )
        ),
        metadata=md,
    )

    async def messages() -> AsyncIterator[image_pb2.UploadImageDataRequest]:
        yield image_pb2.UploadImageDataRequest(
            metadata=image_pb2.UploadImageDataMetadata(
                name=created.name, size_bytes=size, sha256=sha256
            )
        )
        with open(disk, "rb") as handle:  # noqa: ASYNC230 - reads go to a thread
            while chunk := await asyncio.to_thread(handle.read, 2 * 1024 * 1024):
                yield image_pb2.UploadImageDataRequest(chunk=chunk)

    active: image_pb2.Image = await cloud.images.UploadImageData(messages(), metadata=md)
    assert active.status == image_pb2.IMAGE_STATUS_ACTIVE, active
    assert active.sha256 == sha256
    return active


# -- the fleet on disk --------------------------------------------------------------


def server_dir(data_dir: Path, server: str) -> Path:
    return data_dir / "fleet" / "servers" / server.removeprefix("servers/")


def system_disk(data_dir: Path, server: str) -> disks.Layers:
    """A server's system disk as the fleet recorded it: an EVS clone (base
    and overlay) or the local disk."""
    return recorded_disk(data_dir, server)


def cache_dir(data_dir: Path) -> Path:
    return data_dir / "fleet" / "image-cache"


def blob_path(data_dir: Path, image: str) -> Path:
    return data_dir / "blobs" / f"{image.removeprefix('images/')}.blob"


def image_id(image: str) -> str:
    return image.removeprefix("images/")


async def read_disk_file(data_dir: Path, server: str, name: str) -> bytes | None:
    return await asyncio.to_thread(disks.read_file, system_disk(data_dir, server), name)


async def disk_contents(disk: disks.Disk) -> dict[str, bytes | None]:
    """Every file a disk shows (later partitions win) with its content."""

    def read_all() -> dict[str, bytes | None]:
        return {name: disks.read_file(disk, name, 1 << 30) for name in disks.list_files(disk)}

    return await asyncio.to_thread(read_all)


async def add_partition(
    data_dir: Path, server: str, name: str, mount: str, files: Mapping[str, bytes]
) -> None:
    """What a user does on a server: a partition written to its system disk
    (the overlay of an EVS clone, the disk itself otherwise)."""
    writable = system_disk(data_dir, server).top
    await asyncio.to_thread(disks.append_partition, writable, name, mount, files)


def sha256_and_size(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1024 * 1024):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def read_at(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(size)


def overwrite(path: Path, offset: int, garbage: bytes) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(garbage)
