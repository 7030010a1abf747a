"""Builders of what tests send (images, uploads, members, deployments) and
the catalog names they use."""

from __future__ import annotations

import base64
import hashlib
import os
import struct
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from bms.image.v1 import image_pb2
from bms_image.images.adapters.catalog import public_image_id

MiB = 1024 * 1024

# -- the catalog (src/bms_image/common/catalog.toml) -------------------------------

S4_FLAVOR = "physical.s4.large"  # hardware model s4-2288h-v5, the only flavor of it; EVS boot
H2_FLAVOR = "physical.h2.large"  # h2-rh2288-v3, no EVS boot
KI1_FLAVOR = "physical.ki1.2xlarge"  # ki1-taishan-2280-v2 (Arm)
S4_MODEL = "s4-2288h-v5"
H2_MODEL = "h2-rh2288-v3"
KI1_MODEL = "ki1-taishan-2280-v2"

#: Display names of the public images.
CENTOS_NAME = "CentOS 7.6 64bit"
UBUNTU_NAME = "Ubuntu 22.04 server 64bit"
SLES_NAME = "SUSE Linux Enterprise Server 12 SP3 64bit"
EULER_NAME = "EulerOS 2.3 64bit"
WINDOWS_NAME = "Windows Server 2019 Datacenter 64bit"
OPENEULER_ARM_NAME = "openEuler 22.03 LTS SP1 64bit (Arm)"
UBUNTU_ARM_NAME = "Ubuntu 22.04 server 64bit (Arm)"
PUBLIC_NAMES = frozenset(
    {
        CENTOS_NAME,
        UBUNTU_NAME,
        SLES_NAME,
        EULER_NAME,
        WINDOWS_NAME,
        OPENEULER_ARM_NAME,
        UBUNTU_ARM_NAME,
    }
)

#: Resource names of public images (the same everywhere).
CENTOS_IMAGE = f"images/{public_image_id('centos-7.6-x86_64')}"
UBUNTU_IMAGE = f"images/{public_image_id('ubuntu-22.04-x86_64')}"


# -- images and uploads ------------------------------------------------------------


def private_image(display_name: str = "web-server-base", **overrides: Any) -> image_pb2.Image:
    """A valid private image for CreateImage (CentOS 7.6 on the s4 model)."""
    values: dict[str, Any] = {
        "display_name": display_name,
        "os_type": image_pb2.OS_TYPE_LINUX,
        "os_distro": "centos",
        "os_version": "7.6",
        "architecture": image_pb2.ARCHITECTURE_X86_64,
        "hardware_model": S4_MODEL,
    }
    values.update(overrides)
    return image_pb2.Image(**values)


def public_image(display_name: str = "Rocky Linux 9.3 64bit", **overrides: Any) -> image_pb2.Image:
    """A valid public image for an admin's CreateImage (Rocky 9.3 on s4 and h2)."""
    values: dict[str, Any] = {
        "display_name": display_name,
        "type": image_pb2.IMAGE_TYPE_PUBLIC,
        "os_type": image_pb2.OS_TYPE_LINUX,
        "os_distro": "rocky",
        "os_version": "9.3",
        "architecture": image_pb2.ARCHITECTURE_X86_64,
        "supported_flavors": [f"flavors/{S4_FLAVOR}", H2_FLAVOR],
    }
    values.update(overrides)
    return image_pb2.Image(**values)


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


# -- deployments -------------------------------------------------------------------


@dataclass(frozen=True)
class SshKey:
    line: str
    fingerprint: str


def new_ssh_key(comment: str = "") -> SshKey:
    """A real Ed25519 key in OpenSSH format, with its OpenSSH SHA256
    fingerprint computed from the raw key (not from the text line): the
    SHA-256 of the wire blob string("ssh-ed25519") + string(32 key bytes),
    base64 without padding."""
    public = Ed25519PrivateKey.generate().public_key()
    line = public.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()
    raw = public.public_bytes(Encoding.Raw, PublicFormat.Raw)
    kind = b"ssh-ed25519"
    blob = struct.pack(">I", len(kind)) + kind + struct.pack(">I", len(raw)) + raw
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return SshKey(line + (f" {comment}" if comment else ""), f"SHA256:{digest}")
