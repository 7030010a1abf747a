"""Support of the fleet scenarios: a service started by the test itself with
its stubs, SSH keys, disk images built with bms_image.common.disk_format,
deployments followed to their end, captures polled to ACTIVE, and the
fleet's files on disk. Plain functions: import them as
`from scenario_support import ...` (never from a conftest module). Stages,
states and events come from support.fleet_events, errors from support.errors,
where the fleet keeps its files from support.disks."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

from bms.image.v1 import image_pb2, provisioning_pb2
from bms_image.common import disk_format as disks
from bms_image.common.disk_format import DiskSpec
from bms_image.common.model import Plugin, PluginKind
from bms_image.images.adapters.catalog import public_image_id
from support import builders
from support.builders import SshKey
from support.disks import PLUGIN_PROTO, system_disk
from support.fleet_events import ACTIVE, LOCAL, STAGE_ACTIVE, STOPPED, Events, collect_events
from support.services import Serving, make_settings, serving
from support.tokens import Metadata

pb = provisioning_pb2

ERROR_DOMAIN = "image.bms.cloud"

S4 = "physical.s4.large"  # model s4-2288h-v5, boots from EVS
S4_MODEL = "s4-2288h-v5"

CENTOS = builders.CENTOS_IMAGE
UBUNTU = builders.UBUNTU_IMAGE
OPENEULER_ARM = f"images/{public_image_id('openeuler-22.03-aarch64')}"  # ki1 (Arm) only

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


def plugin_pairs(plugins: Iterable[image_pb2.Plugin]) -> set[tuple[int, str]]:
    return {(p.kind, p.version) for p in plugins}


def expected_plugin_pairs(plugins: Iterable[Plugin]) -> set[tuple[int, str]]:
    return {(PLUGIN_PROTO[p.kind], p.version) for p in plugins}


# -- a service of the test's own ----------------------------------------------------


Cloud = Serving


def cloud(tmp_path: Path, **overrides: object) -> AbstractAsyncContextManager[Serving]:
    """Starts the service in this process, on a loopback port; stops it."""
    return serving(
        make_settings(tmp_path, **overrides),
        channel_options=[("grpc.max_receive_message_length", 16 * 1024 * 1024)],
    )


# -- SSH keys -----------------------------------------------------------------------


def new_ssh_key(comment: str = "ops@scenario") -> SshKey:
    """support.builders.new_ssh_key, with a comment."""
    return builders.new_ssh_key(comment)


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


async def collect(stream: Any, within: float = 60.0) -> Events:
    return Events(await collect_events(stream, within))


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


async def stopped_server(cloud: Cloud, md: Metadata, name_prefix: str) -> provisioning_pb2.Server:
    """A CentOS server on its local disk, deployed and stopped: ready to be
    captured."""
    server = await deploy_one(cloud, md, create_request(CENTOS, 1, name_prefix, boot_source=LOCAL))
    return await stop_server(cloud, md, server.name)


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


def capture_request(
    server: str, display_name: str = "snapshot", request_id: str = ""
) -> image_pb2.CreateImageRequest:
    """CreateImage of `server`'s system disk."""
    return image_pb2.CreateImageRequest(
        image=image_pb2.Image(display_name=display_name),
        source_server=server,
        request_id=request_id,
    )


async def private_images(cloud: Cloud, md: Metadata) -> list[image_pb2.Image]:
    response = await cloud.images.ListImages(
        image_pb2.ListImagesRequest(filter="type = private"), metadata=md
    )
    return list(response.images)


async def capture(
    cloud: Cloud, md: Metadata, server: str, display_name: str, within: float = 60.0
) -> image_pb2.Image:
    """CreateImage with source_server, then GetImage until the image is ACTIVE."""
    created: image_pb2.Image = await cloud.images.CreateImage(
        capture_request(server, display_name), metadata=md
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
                    image_pb2.Plugin(kind=PLUGIN_PROTO[p.kind], version=p.version)
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
