"""Helpers of the provisioning tests: real disk images built with
bms_image.common.disk_format, image upload and sharing, deployments, event
collection and disk inspection. Plain functions, so import them as
`from provisioning_support import ...` (never from a conftest module). Stages,
states and events come from support.fleet_events, errors from support.errors,
SSH keys from support.builders."""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from bms.image.v1 import (
    image_pb2,
    provisioning_pb2,
    sharing_pb2,
)
from bms_image.common import disk_format as disks
from bms_image.common.config import Settings
from bms_image.common.disk_format import DiskSpec
from bms_image.common.model import Plugin, PluginKind
from bms_image.fleet.adapters.image_source import ImageSource
from bms_image.images.adapters.catalog import public_image_id
from support import builders
from support.disks import recorded_disk
from support.errors import RichError, expect_error
from support.fleet_events import Events, collect_events
from support.paging import every_page
from support.services import ImageStub, ProvisioningStub, SharingStub
from support.tokens import Metadata

pb = provisioning_pb2


S4 = "physical.s4.large"  # s4-2288h-v5, evs_boot
H2 = "physical.h2.large"  # h2-rh2288-v3, no evs_boot
I7N = "physical.i7n.28xlarge.4"  # i7n-2288h-v6, evs_boot
KI1 = "physical.ki1.2xlarge"  # Kunpeng, evs_boot
S4_MODEL = "s4-2288h-v5"
H2_MODEL = "h2-rh2288-v3"

CENTOS = builders.CENTOS_IMAGE
UBUNTU = builders.UBUNTU_IMAGE
SLES = f"images/{public_image_id('sles-12sp3-x86_64')}"  # no SDI driver
OPENEULER_ARM = f"images/{public_image_id('openeuler-22.03-aarch64')}"  # ki1 only

ACCEPTED = sharing_pb2.MEMBER_STATUS_ACCEPTED
REJECTED = sharing_pb2.MEMBER_STATUS_REJECTED

CLOUD_INIT = Plugin(PluginKind.CLOUD_INIT, "0.7.9")
NETWORK_CONFIG = Plugin(PluginKind.BMS_NETWORK_CONFIG, "2.1.3")
SDI_DRIVER = Plugin(PluginKind.SDI_INIC_DRIVER, "1.2.0")
ALL_PLUGINS = (CLOUD_INIT, NETWORK_CONFIG, SDI_DRIVER)

CENTOS_RELEASE = {"NAME": "centos", "ID": "centos", "VERSION_ID": "7.6"}


# -- disks and images --------------------------------------------------------------


def build_disk(
    plugins: Sequence[Plugin] = ALL_PLUGINS,
    files: Mapping[str, bytes] | None = None,
    os_release: Mapping[str, str] | None = None,
    bulk_bytes: int = 64 * 1024,
    seed: str = "provisioning-test",
) -> bytes:
    """The bytes of a real BMSDISK1 system disk."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "golden.disk"
        disks.write_disk(
            path,
            DiskSpec(
                os_release=dict(os_release or CENTOS_RELEASE),
                plugins=tuple(plugins),
                bulk_bytes=bulk_bytes,
                seed=seed,
                files=dict(files or {}),
            ),
        )
        return path.read_bytes()


def plugin_protos(plugins: Iterable[Plugin]) -> list[image_pb2.Plugin]:
    kinds = {
        PluginKind.CLOUD_INIT: image_pb2.PLUGIN_KIND_CLOUD_INIT,
        PluginKind.CLOUDBASE_INIT: image_pb2.PLUGIN_KIND_CLOUDBASE_INIT,
        PluginKind.BMS_NETWORK_CONFIG: image_pb2.PLUGIN_KIND_BMS_NETWORK_CONFIG,
        PluginKind.SDI_INIC_DRIVER: image_pb2.PLUGIN_KIND_SDI_INIC_DRIVER,
    }
    return [image_pb2.Plugin(kind=kinds[p.kind], version=p.version) for p in plugins]


def private_image(plugins: Iterable[Plugin] = ALL_PLUGINS, **overrides: Any) -> image_pb2.Image:
    values: dict[str, Any] = {
        "display_name": "golden-app",
        "os_type": image_pb2.OS_TYPE_LINUX,
        "os_distro": "centos",
        "os_version": "7.6",
        "architecture": image_pb2.ARCHITECTURE_X86_64,
        "hardware_model": S4_MODEL,
        "plugins": plugin_protos(plugins),
    }
    values.update(overrides)
    return image_pb2.Image(**values)


async def create_queued(
    images: ImageStub, md: Metadata, plugins: Iterable[Plugin] = ALL_PLUGINS, **overrides: Any
) -> image_pb2.Image:
    request = image_pb2.CreateImageRequest(image=private_image(plugins, **overrides))
    created: image_pb2.Image = await images.CreateImage(request, metadata=md)
    assert created.status == image_pb2.IMAGE_STATUS_QUEUED
    return created


def _upload_requests(
    name: str, data: bytes, chunk: int = 256 * 1024
) -> Iterable[image_pb2.UploadImageDataRequest]:
    yield image_pb2.UploadImageDataRequest(
        metadata=image_pb2.UploadImageDataMetadata(
            name=name, size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest()
        )
    )
    for offset in range(0, len(data), chunk):
        yield image_pb2.UploadImageDataRequest(chunk=data[offset : offset + chunk])


async def upload(images: ImageStub, md: Metadata, name: str, data: bytes) -> image_pb2.Image:
    image: image_pb2.Image = await images.UploadImageData(
        iter(_upload_requests(name, data)), metadata=md
    )
    return image


async def create_disk_image(
    images: ImageStub,
    md: Metadata,
    plugins: Sequence[Plugin] = ALL_PLUGINS,
    files: Mapping[str, bytes] | None = None,
    bulk_bytes: int = 64 * 1024,
    declared: Sequence[Plugin] | None = None,
    **overrides: Any,
) -> tuple[image_pb2.Image, bytes]:
    """An ACTIVE private image whose bytes are a real disk with `plugins`
    and `files`; the image record declares `declared` (by default `plugins`)."""
    data = build_disk(plugins, files, bulk_bytes=bulk_bytes)
    created = await create_queued(
        images, md, plugins if declared is None else declared, **overrides
    )
    active = await upload(images, md, created.name, data)
    assert active.status == image_pb2.IMAGE_STATUS_ACTIVE, active
    assert active.sha256 == hashlib.sha256(data).hexdigest()
    return active, data


async def image_without(images: ImageStub, md: Metadata, *missing: Plugin) -> image_pb2.Image:
    """An ACTIVE private image whose disk and record have every plug-in but
    `missing`."""
    plugins = tuple(p for p in ALL_PLUGINS if p not in missing)
    label = "-".join(p.kind.value.replace("_", "-") for p in missing)
    image, _ = await create_disk_image(images, md, plugins, display_name=f"no-{label}")
    return image


async def get_image(images: ImageStub, md: Metadata, name: str) -> image_pb2.Image:
    image: image_pb2.Image = await images.GetImage(
        image_pb2.GetImageRequest(name=name), metadata=md
    )
    return image


async def share(sharing: SharingStub, md: Metadata, image_name: str, project: str) -> None:
    await sharing.CreateImageMember(
        sharing_pb2.CreateImageMemberRequest(
            parent=image_name, member=sharing_pb2.ImageMember(member_project=project)
        ),
        metadata=md,
    )


async def answer(
    sharing: SharingStub, md: Metadata, image_name: str, project: str, status: int
) -> None:
    await sharing.UpdateImageMember(
        sharing_pb2.UpdateImageMemberRequest(
            member=sharing_pb2.ImageMember(
                name=f"{image_name}/members/{project}",
                status=status,  # type: ignore[arg-type]
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["status"]),
        ),
        metadata=md,
    )


# -- deployments --------------------------------------------------------------------


def create_request(
    image: str = CENTOS,
    flavor: str = S4,
    count: int = 1,
    name_prefix: str = "web",
    ssh_public_key: str = "",
    user_data: str = "",
    boot_source: int = pb.BOOT_SOURCE_UNSPECIFIED,
) -> provisioning_pb2.CreateServersRequest:
    return pb.CreateServersRequest(
        flavor=f"flavors/{flavor}" if flavor and "/" not in flavor else flavor,
        image=image,
        count=count,
        name_prefix=name_prefix,
        ssh_public_key=ssh_public_key,
        user_data=user_data,
        boot_source=boot_source,  # type: ignore[arg-type]
    )


async def collect(stream: Any, within: float = 30.0) -> list[provisioning_pb2.ServerEvent]:
    return await collect_events(stream, within)


async def deploy(
    provisioning: ProvisioningStub, md: Metadata, request: provisioning_pb2.CreateServersRequest
) -> Events:
    """Runs CreateServers to its end."""
    return Events(await collect(provisioning.CreateServers(request, metadata=md)))


async def create_error(
    provisioning: ProvisioningStub,
    md: Metadata,
    request: provisioning_pb2.CreateServersRequest,
    code: grpc.StatusCode,
    reason: str = "",
) -> RichError:
    """CreateServers must fail before streaming any event."""
    received: list[provisioning_pb2.ServerEvent] = []

    async def run() -> None:
        async for event in provisioning.CreateServers(request, metadata=md):
            received.append(event)

    rich = await expect_error(asyncio.wait_for(run(), 30), code, reason)
    assert received == [], f"events streamed before the error: {received}"
    return rich


async def list_servers(
    provisioning: ProvisioningStub, md: Metadata, page_size: int = 0
) -> list[provisioning_pb2.Server]:
    """Every server of a listing, following next_page_token to the end."""

    def read_page(token: str) -> Awaitable[provisioning_pb2.ListServersResponse]:
        request = pb.ListServersRequest(page_size=page_size, page_token=token)
        return provisioning.ListServers(request, metadata=md)

    return await every_page(read_page, lambda page: page.servers, most_pages=1000)


async def get_server(
    provisioning: ProvisioningStub, md: Metadata, name: str
) -> provisioning_pb2.Server:
    server: provisioning_pb2.Server = await provisioning.GetServer(
        pb.GetServerRequest(name=name), metadata=md
    )
    return server


async def watch(
    provisioning: ProvisioningStub, md: Metadata, name: str, within: float = 30.0
) -> list[provisioning_pb2.ServerEvent]:
    return await collect(
        provisioning.WatchServer(pb.WatchServerRequest(name=name), metadata=md), within
    )


# -- the fleet on disk ------------------------------------------------------------------


def count_downloads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The image ids the fleet downloads from now on, in order."""
    downloads: list[str] = []
    real = ImageSource._download

    async def counting(self, image_id, *args, **kwargs):  # type: ignore[no-untyped-def]
        downloads.append(image_id)
        return await real(self, image_id, *args, **kwargs)

    monkeypatch.setattr(ImageSource, "_download", counting)
    return downloads


def server_dir(settings: Settings, server_name: str) -> Path:
    return Path(settings.data_dir) / "fleet" / "servers" / server_name.removeprefix("servers/")


def system_disk(settings: Settings, server_name: str) -> disks.Layers:
    """The disk of a server as the fleet recorded it: an EVS clone (base and
    overlay) or the local disk."""
    return recorded_disk(Path(settings.data_dir), server_name, settings.database_url)


def cache_dir(settings: Settings) -> Path:
    return Path(settings.data_dir) / "fleet" / "image-cache"


def cache_file(settings: Settings, sha256: str) -> Path:
    """The image cache's entry of the bytes with this SHA-256 (named by it)."""
    return cache_dir(settings) / f"{sha256}.raw"


def read_disk_file(settings: Settings, server_name: str, name: str) -> bytes | None:
    return disks.read_file(system_disk(settings, server_name), name)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def corrupt(path: Path, offset: int, garbage: bytes) -> None:
    """Overwrites bytes of a file in place (its size stays the same)."""
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(garbage)


def cloud_config(files: Mapping[str, str]) -> str:
    """`#cloud-config` user data writing `files` (absolute path -> text)."""
    lines = ["#cloud-config", "write_files:"]
    for path, content in files.items():
        lines.append(f"  - path: {path}")
        lines.append("    content: |")
        lines.extend(f"      {line}" for line in content.splitlines())
    return "\n".join(lines) + "\n"
