"""Image bytes are data (issue 14): what a tenant uploads never names a host
file. Black-box, against a real `bms-image serve` and a plain gRPC client.

The attack: an image whose bytes look like the EVS clone record of old
(b"BMSEVS1\\n" + JSON naming host files), deployed to a local disk. Before
the fleet kept its own record of what makes up a disk, it read those bytes
as paths: first boot appended the attacker's Cloud-Init partition to the
named file (the image cache's copy of public CentOS, so every later tenant
got the attacker's files and SSH key), and a capture copied the named base
(another tenant's disk). Now such bytes boot nothing: IMAGE_NOT_BOOTABLE."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from bms.image.v1 import image_pb2, image_pb2_grpc, provisioning_pb2, provisioning_pb2_grpc
from bms_image.common import disk_format as disks
from bms_image.images.adapters.catalog import public_image_id
from support.builders import private_image
from support.processes import ServerProcess
from support.tokens import bearer

pytestmark = pytest.mark.e2e

pb = provisioning_pb2
CENTOS = f"images/{public_image_id('centos-7.6-x86_64')}"
S4 = "flavors/physical.s4.large"  # model s4-2288h-v5: local disk or EVS
LOCAL = pb.BOOT_SOURCE_LOCAL_DISK
EVS = pb.BOOT_SOURCE_EVS
#: A hang guard only: nothing is asserted about how long anything takes.
TIMEOUT = 60.0
MALLORY_FILE = "etc/mallory-was-here"
MALLORY_USER_DATA = (
    "#cloud-config\nwrite_files:\n  - path: /etc/mallory-was-here\n    content: owned\n"
)


def ssh_key() -> str:
    public = Ed25519PrivateKey.generate().public_key()
    return public.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode() + " mallory"


def sha256_file(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def evs_record(base: Path, overlay: Path) -> bytes:
    """The bytes of an EVS clone record as the fleet once wrote (and read)."""
    return b"BMSEVS1\n" + json.dumps({"base": str(base), "overlay": str(overlay)}).encode()


@pytest.fixture
def service(tmp_path: Path) -> Iterator[ServerProcess]:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    process = ServerProcess(data_dir, catalog_image_mib="1", shutdown_grace_seconds="2")
    process.start()
    try:
        yield process
    finally:
        process.kill()


@pytest.fixture
def channel(service: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(service.address) as opened:
        yield opened


class Tenant:
    """One project's client: its token from the real CLI, plain stubs."""

    def __init__(self, service: ServerProcess, channel: grpc.Channel, project: str) -> None:
        self.project = project
        self.md = bearer(service.token(project))
        self.images = image_pb2_grpc.ImageServiceStub(channel)
        self.fleet = provisioning_pb2_grpc.ProvisioningServiceStub(channel)

    def image(self, name: str) -> image_pb2.Image:
        found: image_pb2.Image = self.images.GetImage(
            image_pb2.GetImageRequest(name=name), metadata=self.md, timeout=TIMEOUT
        )
        return found

    def upload(self, data: bytes, display_name: str) -> image_pb2.Image:
        """A private image of these bytes, declared a CentOS with Cloud-Init
        (so a key may be passed) and the SDI driver (so EVS is possible)."""
        created = self.images.CreateImage(
            image_pb2.CreateImageRequest(
                image=private_image(
                    display_name,
                    plugins=[
                        image_pb2.Plugin(kind=image_pb2.PLUGIN_KIND_CLOUD_INIT, version="0.7.9"),
                        image_pb2.Plugin(
                            kind=image_pb2.PLUGIN_KIND_BMS_NETWORK_CONFIG, version="2.1.3"
                        ),
                        image_pb2.Plugin(
                            kind=image_pb2.PLUGIN_KIND_SDI_INIC_DRIVER, version="1.0.0"
                        ),
                    ],
                )
            ),
            metadata=self.md,
            timeout=TIMEOUT,
        )
        messages = [
            image_pb2.UploadImageDataRequest(
                metadata=image_pb2.UploadImageDataMetadata(
                    name=created.name,
                    size_bytes=len(data),
                    sha256=hashlib.sha256(data).hexdigest(),
                )
            ),
            image_pb2.UploadImageDataRequest(chunk=data),
        ]
        active: image_pb2.Image = self.images.UploadImageData(
            iter(messages), metadata=self.md, timeout=TIMEOUT
        )
        assert active.status == image_pb2.IMAGE_STATUS_ACTIVE, active
        return active

    def deploy(
        self, image: str, prefix: str, boot_source: int, key: str = "", user_data: str = ""
    ) -> pb.ServerEvent:
        """One server, followed to its final event."""
        events = list(
            self.fleet.CreateServers(
                pb.CreateServersRequest(
                    flavor=S4,
                    image=image,
                    count=1,
                    name_prefix=prefix,
                    ssh_public_key=key,
                    user_data=user_data,
                    boot_source=boot_source,  # type: ignore[arg-type]
                ),
                metadata=self.md,
                timeout=TIMEOUT,
            )
        )
        assert events, f"no events for {prefix}"
        return events[-1]

    def capture(self, server: str, scratch: Path) -> Path:
        """Stops the server, captures it into a new image and downloads the
        image's bytes into a file: what the server's disk really holds."""
        self.fleet.StopServer(pb.StopServerRequest(name=server), metadata=self.md, timeout=TIMEOUT)
        created = self.images.CreateImage(
            image_pb2.CreateImageRequest(
                image=image_pb2.Image(display_name=f"capture-{uuid.uuid4().hex[:8]}"),
                source_server=server,
            ),
            metadata=self.md,
            timeout=TIMEOUT,
        )
        deadline = time.monotonic() + TIMEOUT
        image = self.image(created.name)
        while image.status in (image_pb2.IMAGE_STATUS_QUEUED, image_pb2.IMAGE_STATUS_SAVING):
            assert time.monotonic() < deadline, f"{created.name} still {image.status}"
            time.sleep(0.1)
            image = self.image(created.name)
        assert image.status == image_pb2.IMAGE_STATUS_ACTIVE, image
        target = scratch / f"{image.name.removeprefix('images/')}.disk"
        with open(target, "wb") as handle:
            for message in self.images.DownloadImageData(
                image_pb2.DownloadImageDataRequest(name=image.name),
                metadata=self.md,
                timeout=TIMEOUT,
            ):
                handle.write(message.chunk)
        assert sha256_file(target) == image.sha256
        return target


def cache_is_intact(cache: Path) -> None:
    """Every cached image still holds the bytes its name says."""
    for path in cache.iterdir():
        if path.name.startswith("."):
            continue
        named = path.name.removesuffix(".raw").rsplit("-", 1)[-1]
        assert sha256_file(path) == named, f"{path.name} was written to"


def test_image_bytes_naming_the_image_cache_never_reach_another_tenant(
    service: ServerProcess, channel: grpc.Channel, tmp_path: Path
) -> None:
    alpha = Tenant(service, channel, "alpha")
    mallory = Tenant(service, channel, "mallory")
    victim = Tenant(service, channel, "victim")
    centos = alpha.image(CENTOS)

    # alpha deploys public CentOS: the fleet's image cache now holds it
    assert alpha.deploy(CENTOS, "warm", LOCAL).stage == pb.PROVISIONING_STAGE_ACTIVE
    cache = service.data_dir / "fleet" / "image-cache"
    guessed = sorted(p for p in cache.iterdir() if p.suffix == ".raw")
    assert guessed, "an attacker finds the cached CentOS where the data dir keeps it"
    assert [sha256_file(p) for p in guessed] == [centos.sha256] * len(guessed)

    # mallory's image: bytes that name the cached CentOS as base and overlay,
    # deployed with a key and user data that writes a file
    outcomes = []
    for target in guessed:
        crafted = mallory.upload(evs_record(target, target), f"innocent-{target.stem[:8]}")
        outcomes.append(mallory.deploy(crafted.name, "evil", LOCAL, ssh_key(), MALLORY_USER_DATA))

    # the victim deploys public CentOS without a key, on both boot sources:
    # nothing of mallory's is on its disk
    for boot_source, prefix in ((LOCAL, "local"), (EVS, "quick")):
        final = victim.deploy(CENTOS, prefix, boot_source)
        assert final.stage == pb.PROVISIONING_STAGE_ACTIVE, final
        assert final.boot_source == boot_source
        disk = victim.capture(final.server, tmp_path)
        files = disks.list_files(disk)
        assert MALLORY_FILE not in files, f"mallory's file on the victim's {prefix} server"
        assert "root/.ssh/authorized_keys" not in files, f"a key on the victim's {prefix} server"
        assert disks.read_file(disk, "etc/hostname") == f"{prefix}-1\n".encode()
        assert disks.os_release(disk)["ID"] == "centos"
    cache_is_intact(cache)
    # and mallory's bytes booted nothing
    for final in outcomes:
        assert (final.stage, final.error_code, final.error_reason) == (
            pb.PROVISIONING_STAGE_FAILED,
            "FAILED_PRECONDITION",
            "IMAGE_NOT_BOOTABLE",
        ), final


def test_image_bytes_naming_another_tenants_disk_never_read_it(
    service: ServerProcess, channel: grpc.Channel, tmp_path: Path
) -> None:
    alice = Tenant(service, channel, "alice")
    mallory = Tenant(service, channel, "mallory")
    secret = f"alice's secret {uuid.uuid4()}"
    user_data = f"#cloud-config\nwrite_files:\n  - path: /root/secret.txt\n    content: {secret}\n"
    final = alice.deploy(CENTOS, "alice", LOCAL, user_data=user_data)
    assert final.stage == pb.PROVISIONING_STAGE_ACTIVE, final
    alice_server = final.server
    directory = service.data_dir / "fleet" / "servers" / alice_server.removeprefix("servers/")
    targets = sorted(p for p in directory.iterdir() if p.name.startswith("system"))
    assert targets, "alice's system disk is in her server's directory"

    for target in targets:
        crafted = mallory.upload(evs_record(target, target), f"reader-{uuid.uuid4().hex[:6]}")
        final = mallory.deploy(crafted.name, "reader", LOCAL, ssh_key(), MALLORY_USER_DATA)
        if final.stage == pb.PROVISIONING_STAGE_ACTIVE:  # what it did before the fix
            leaked = mallory.capture(final.server, tmp_path)
            assert secret.encode() not in leaked.read_bytes(), "mallory read alice's disk"
        assert (final.stage, final.error_code, final.error_reason) == (
            pb.PROVISIONING_STAGE_FAILED,
            "FAILED_PRECONDITION",
            "IMAGE_NOT_BOOTABLE",
        ), final
        # mallory's failed server has no disk to capture
        with pytest.raises(grpc.RpcError) as refused:
            mallory.images.CreateImage(
                image_pb2.CreateImageRequest(
                    image=image_pb2.Image(display_name="loot"), source_server=final.server
                ),
                metadata=mallory.md,
                timeout=TIMEOUT,
            )
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, refused.value

    # alice's disk is hers alone: her secret, nothing of mallory's
    disk = alice.capture(alice_server, tmp_path)
    assert disks.read_file(disk, "root/secret.txt") == secret.encode()
    files = disks.list_files(disk)
    assert MALLORY_FILE not in files
    assert "root/.ssh/authorized_keys" not in files
