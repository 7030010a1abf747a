"""Entities of the image catalog."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from datetime import datetime


class Visibility(enum.StrEnum):
    """Who an image belongs to: the platform (public) or a project (private)."""

    PUBLIC = "public"
    PRIVATE = "private"


class ImageType(enum.StrEnum):
    """How a caller relates to an image it can see."""

    PUBLIC = "public"
    PRIVATE = "private"
    SHARED = "shared"


class ImageStatus(enum.StrEnum):
    """Life-cycle status; transitions are in rules.ALLOWED_TRANSITIONS."""

    QUEUED = "queued"
    SAVING = "saving"
    ACTIVE = "active"
    KILLED = "killed"
    DEACTIVATED = "deactivated"
    DELETED = "deleted"


class RequestMethod(enum.StrEnum):
    """The RPC a request_id was given to: each has its own idempotency keys
    (per project), so one RPC's retry never answers with another's image.
    A capture is a CreateImage."""

    CREATE = "create"
    REPLICATE = "replicate"


class MemberStatus(enum.StrEnum):
    """A member project's answer to an image shared with it."""

    PENDING = "pending"
    ACCEPTED = "accepted"
    REJECTED = "rejected"


class OsType(enum.StrEnum):
    LINUX = "linux"
    WINDOWS = "windows"


class Architecture(enum.StrEnum):
    X86_64 = "x86_64"
    AARCH64 = "aarch64"


class DiskFormat(enum.StrEnum):
    RAW = "raw"
    QCOW2 = "qcow2"
    VMDK = "vmdk"
    VHD = "vhd"
    VHDX = "vhdx"


class PluginKind(enum.StrEnum):
    CLOUD_INIT = "cloud_init"
    CLOUDBASE_INIT = "cloudbase_init"
    BMS_NETWORK_CONFIG = "bms_network_config"
    SDI_INIC_DRIVER = "sdi_inic_driver"


#: The service identities our processes present to each other (auth.py).
#: A project id, as tokens carry it and resource names spell it.
PROJECT_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{1,63}\Z")

IMAGE_SERVICE_IDENTITY = "image-service"
PROVISIONER_IDENTITY = "provisioner"


@dataclass(frozen=True)
class Caller:
    """The verified identity behind a request: the project (and roles) of
    the user token, and, when one of our own services carried the call for
    that user, the service its service credential names (else empty)."""

    project: str
    roles: frozenset[str] = frozenset()
    service: str = ""

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles


@dataclass(frozen=True)
class Plugin:
    kind: PluginKind
    version: str


@dataclass(frozen=True)
class Partition:
    """A partition of a system disk (the layout a user chose)."""

    name: str
    mount: str
    size_bytes: int


@dataclass(frozen=True)
class Flavor:
    """A bare-metal hardware offering and the public images it supports."""

    name: str
    hardware_model: str
    cpu_cores: int
    cpu_model: str
    memory_gib: int
    local_disks: str
    local_disk_gb: int
    evs_boot: bool
    description: str
    public_image_ids: tuple[str, ...] = ()


@dataclass
class Image:
    """An image as stored. `supported_flavors` is stored for public images only;
    a private image deploys on the flavors of its `hardware_model`."""

    id: str
    display_name: str
    visibility: Visibility
    owner_project: str | None
    os_type: OsType
    os_distro: str
    os_version: str
    architecture: Architecture
    disk_format: DiskFormat = DiskFormat.RAW
    description: str = ""
    size_bytes: int = 0
    min_disk_gb: int = 40
    sha256: str = ""
    status: ImageStatus = ImageStatus.QUEUED
    status_reason: str = ""
    hardware_model: str = ""
    supported_flavors: list[str] = field(default_factory=list)
    plugins: list[Plugin] = field(default_factory=list)
    partitions: list[Partition] = field(default_factory=list)
    source_server: str = ""
    tags: list[str] = field(default_factory=list)
    protected: bool = False
    deprecated: bool = False
    uploaded_bytes: int = 0
    creator_project: str = ""
    request_id: str | None = None
    request_method: RequestMethod = RequestMethod.CREATE
    revision: int = 1
    seq: int = 0
    create_time: datetime | None = None
    update_time: datetime | None = None

    @property
    def etag(self) -> str:
        return f'"{self.revision}"'


@dataclass(frozen=True)
class Member:
    """A project an image is shared with."""

    image_id: str
    project: str
    status: MemberStatus
    create_time: datetime | None = None
    update_time: datetime | None = None


@dataclass(frozen=True)
class CaptureSource:
    """What a server's disk says about the image captured from it."""

    server_id: str
    hardware_model: str
    os_type: str
    os_distro: str
    os_version: str
    architecture: str
    plugins: list[Plugin]
    partitions: list[Partition]
