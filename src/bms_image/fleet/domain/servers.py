"""Servers of the simulated fleet: their state machine and the rules that
decide whether, and how, an image may be deployed on a flavor."""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import re
from dataclasses import dataclass, field
from datetime import datetime

from bms_image.common.errors import (
    FailedPrecondition,
    FieldViolation,
    PreconditionViolation,
    raise_if_invalid,
)
from bms_image.common.model import Flavor, Image, ImageStatus, Plugin, PluginKind, Visibility


class ServerState(enum.StrEnum):
    BUILDING = "building"
    ACTIVE = "active"
    STOPPED = "stopped"
    REBUILDING = "rebuilding"
    ERROR = "error"
    DELETED = "deleted"


class NetworkState(enum.StrEnum):
    UNSPECIFIED = "unspecified"
    UP = "up"
    DOWN = "down"


class BootSource(enum.StrEnum):
    UNSPECIFIED = "unspecified"
    LOCAL_DISK = "local_disk"
    EVS = "evs"


class ProvisioningStage(enum.StrEnum):
    VALIDATING = "validating"
    IMAGE_STREAMING = "image_streaming"
    VERIFYING_CHECKSUM = "verifying_checksum"
    EVS_CLONING = "evs_cloning"
    FIRST_BOOT = "first_boot"
    NETWORK_CONFIGURED = "network_configured"
    ACTIVE = "active"
    FAILED = "failed"


#: Server state machine: state -> states it may move to.
SERVER_TRANSITIONS: dict[ServerState, frozenset[ServerState]] = {
    ServerState.BUILDING: frozenset({ServerState.ACTIVE, ServerState.ERROR}),
    ServerState.ACTIVE: frozenset({ServerState.STOPPED, ServerState.DELETED}),
    ServerState.STOPPED: frozenset(
        {ServerState.ACTIVE, ServerState.REBUILDING, ServerState.DELETED}
    ),
    ServerState.REBUILDING: frozenset({ServerState.ACTIVE, ServerState.ERROR}),
    # A server whose reinstall failed may be reinstalled again.
    ServerState.ERROR: frozenset({ServerState.REBUILDING, ServerState.DELETED}),
    ServerState.DELETED: frozenset(),
}

MAX_BATCH = 100
#: User data Cloud-Init takes: 32 KiB, below the 64 KiB clouds allow (Nova,
#: Azure), and the bound of everything its parser does (see firstboot.py).
MAX_USER_DATA_BYTES = 32 * 1024
#: An OpenSSH public key line: an RSA-16384 key is about 2.8 KB, so 16 KiB
#: leaves room for any real key and a long comment, and bounds the base64
#: decoding a key costs.
MAX_SSH_PUBLIC_KEY_BYTES = 16 * 1024
MAX_DATA_DISKS = 8
#: A data disk is a sparse file on the fleet's file system: ext4 with 4 KiB
#: blocks holds files of at most 2**32 - 1 blocks (16 TiB - 4 KiB), so 16,384
#: GiB itself fails (EFBIG) and 16,383 GiB is the largest disk it can hold.
MAX_DATA_DISK_GB = 16383
NAME_PREFIX = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,46}[a-z0-9])?\Z")
_SSH_KEY = re.compile(
    r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(?:256|384|521)) ([A-Za-z0-9+/]+={0,3})(?: [^\n]*)?\Z"
)
_INIT_PLUGINS = {PluginKind.CLOUD_INIT, PluginKind.CLOUDBASE_INIT}


@dataclass
class Server:
    id: str
    project: str
    host_name: str
    flavor: str
    hardware_model: str
    image_id: str
    state: ServerState = ServerState.BUILDING
    state_reason: str = ""
    network_state: NetworkState = NetworkState.UNSPECIFIED
    boot_source: BootSource = BootSource.LOCAL_DISK
    system_disk_bytes: int = 0
    ssh_key_fingerprint: str = ""
    plugins: list[Plugin] = field(default_factory=list)
    data_disks_gb: list[int] = field(default_factory=list)
    task: str = ""
    last_operation: str = "deploy"
    seq: int = 0
    revision: int = 1
    create_time: datetime | None = None
    update_time: datetime | None = None


@dataclass(frozen=True)
class ServerEvent:
    server_id: str
    stage: ProvisioningStage
    state: ServerState
    message: str
    time: datetime
    bytes_done: int = 0
    bytes_total: int = 0
    percent: float = 0.0
    boot_source: BootSource = BootSource.UNSPECIFIED
    error_code: str = ""
    error_reason: str = ""

    @property
    def final(self) -> bool:
        return self.stage in (ProvisioningStage.ACTIVE, ProvisioningStage.FAILED)


@dataclass
class DeployRequest:
    """What CreateServers asks for, after proto translation."""

    flavor: str
    image_id: str
    count: int
    name_prefix: str
    ssh_public_key: str = ""
    user_data: str = ""
    boot_source: BootSource = BootSource.UNSPECIFIED
    data_disks_gb: list[int] = field(default_factory=list)


def first_boot_violations(ssh_public_key: str, user_data: str) -> list[FieldViolation]:
    """What is wrong with the key and user data Cloud-Init will apply."""
    violations: list[FieldViolation] = []
    if len(ssh_public_key) > MAX_SSH_PUBLIC_KEY_BYTES:
        violations.append(
            FieldViolation(
                "ssh_public_key",
                f"is {len(ssh_public_key)} characters; an OpenSSH public key line has at most "
                f"{MAX_SSH_PUBLIC_KEY_BYTES}",
            )
        )
    elif ssh_public_key and not _is_ssh_public_key(ssh_public_key):
        violations.append(
            FieldViolation("ssh_public_key", "must be an OpenSSH public key (ssh-ed25519 AAAA...)")
        )
    if len(user_data.encode()) > MAX_USER_DATA_BYTES:
        violations.append(FieldViolation("user_data", "is larger than 32 KiB"))
    if "\x00" in user_data:
        violations.append(FieldViolation("user_data", "must not contain NUL characters"))
    return violations


def validate_deploy_request(request: DeployRequest) -> None:
    violations: list[FieldViolation] = []
    if not 1 <= request.count <= MAX_BATCH:
        violations.append(FieldViolation("count", f"is {request.count}; must be 1 to {MAX_BATCH}"))
    if not NAME_PREFIX.match(request.name_prefix):
        violations.append(
            FieldViolation("name_prefix", "must be 1-48 lower-case letters, digits and '-'")
        )
    if len(request.data_disks_gb) > MAX_DATA_DISKS:
        violations.append(
            FieldViolation(
                "data_disks_gb",
                f"has {len(request.data_disks_gb)} disks; at most {MAX_DATA_DISKS} are allowed",
            )
        )
    for index, size in enumerate(request.data_disks_gb[:MAX_DATA_DISKS]):
        if not 1 <= size <= MAX_DATA_DISK_GB:
            violations.append(
                FieldViolation(
                    f"data_disks_gb[{index}]",
                    f"is {size} GiB; a data disk has 1 to {MAX_DATA_DISK_GB} GiB",
                )
            )
    violations += first_boot_violations(request.ssh_public_key, request.user_data)
    raise_if_invalid(violations, "INVALID_DEPLOYMENT")


def _is_ssh_public_key(text: str) -> bool:
    """`type base64 [comment]` whose base64 decodes to a key blob of that type."""
    match = _SSH_KEY.match(text.strip())
    if match is None:
        return False
    try:
        blob = base64.b64decode(match.group(2), validate=True)
    except binascii.Error:
        return False
    length = int.from_bytes(blob[:4], "big")
    return blob[4 : 4 + length] == match.group(1).encode()


def ssh_key_fingerprint(public_key: str) -> str:
    """OpenSSH's SHA256 fingerprint of a public key line (one that passed
    first_boot_violations; anything else has none)."""
    match = _SSH_KEY.match(public_key.strip()) if public_key else None
    if match is None or len(public_key) > MAX_SSH_PUBLIC_KEY_BYTES:
        return ""
    try:
        body = base64.b64decode(match.group(2), validate=True)
    except binascii.Error:
        return ""
    return "SHA256:" + base64.b64encode(hashlib.sha256(body).digest()).decode().rstrip("=")


def _incompatible(image: Image, flavor: Flavor, supported: str) -> FailedPrecondition:
    subject = f"images/{image.id}"
    return FailedPrecondition(
        "IMAGE_FLAVOR_INCOMPATIBLE",
        f"{subject} ({image.display_name}) cannot be deployed on flavors/{flavor.name} "
        f"(model {flavor.hardware_model}); it supports {supported}",
        [PreconditionViolation("COMPATIBILITY", subject, f"supports {supported}")],
    )


def require_deployable(image: Image, flavor: Flavor, supported_flavors: list[str]) -> None:
    """A public image only on the flavors that list it; a private or shared one
    only on servers of the same hardware model as its source server."""
    if image.status is not ImageStatus.ACTIVE:
        raise FailedPrecondition(
            "IMAGE_NOT_ACTIVE",
            f"images/{image.id} is {image.status.value}; only active images can be deployed",
            [PreconditionViolation("STATUS", f"images/{image.id}", image.status.value)],
        )
    if image.visibility is Visibility.PUBLIC:
        if image.deprecated:
            raise FailedPrecondition(
                "IMAGE_DEPRECATED",
                f"images/{image.id} is deprecated and cannot be chosen for new servers",
                [PreconditionViolation("DEPRECATED", f"images/{image.id}", "deprecated")],
            )
        if flavor.name not in image.supported_flavors:
            flavors = ", ".join(f"flavors/{f}" for f in image.supported_flavors) or "no flavor"
            raise _incompatible(image, flavor, f"the flavors {flavors}")
    elif image.hardware_model != flavor.hardware_model:
        others = ", ".join(f"flavors/{f}" for f in supported_flavors) or "none"
        raise _incompatible(
            image, flavor, f"hardware model {image.hardware_model} only (flavors: {others})"
        )


def require_cloud_init_for_key(image: Image, ssh_public_key: str) -> None:
    if ssh_public_key and not {p.kind for p in image.plugins} & _INIT_PLUGINS:
        raise FailedPrecondition(
            "IMAGE_WITHOUT_CLOUD_INIT",
            f"images/{image.id} has no Cloud-Init or Cloudbase-Init, so it cannot take an SSH "
            "key; deploy without ssh_public_key or pick an image that has it",
            [PreconditionViolation("PLUGIN", f"images/{image.id}", "cloud-init missing")],
        )


def choose_boot_source(image: Image, flavor: Flavor, requested: BootSource) -> BootSource:
    """EVS (quick provisioning) needs a flavor that boots from EVS and an image
    with the SDI iNIC driver; unset means EVS when possible."""
    evs_possible = flavor.evs_boot and any(
        p.kind is PluginKind.SDI_INIC_DRIVER for p in image.plugins
    )
    if requested is BootSource.EVS and not evs_possible:
        why = (
            f"flavors/{flavor.name} cannot boot from EVS"
            if not flavor.evs_boot
            else f"images/{image.id} lacks the SDI iNIC driver"
        )
        raise FailedPrecondition(
            "EVS_BOOT_UNAVAILABLE",
            f"quick provisioning is not possible: {why}",
            [PreconditionViolation("BOOT_SOURCE", f"flavors/{flavor.name}", why)],
        )
    if requested is BootSource.LOCAL_DISK or not evs_possible:
        return BootSource.LOCAL_DISK
    return BootSource.EVS


def require_server_transition(server: Server, target: ServerState) -> None:
    if server.task:
        raise FailedPrecondition(
            "SERVER_BUSY",
            f"servers/{server.id} is busy ({server.task} in progress); wait until it is done",
            [PreconditionViolation("TASK", f"servers/{server.id}", server.task)],
        )
    reinstall_after_failure = (
        server.state is ServerState.ERROR
        and target is ServerState.REBUILDING
        and server.last_operation != "reinstall"
    )
    if target not in SERVER_TRANSITIONS[server.state] or reinstall_after_failure:
        raise FailedPrecondition(
            "SERVER_STATE_CONFLICT",
            f"servers/{server.id} is {server.state.value} and cannot become {target.value}",
            [PreconditionViolation("STATE", f"servers/{server.id}", server.state.value)],
        )


def intact_plugins(states: dict[PluginKind, tuple[str, str]]) -> list[Plugin]:
    """The plug-ins a disk holds intact (the known-good bytes of their release)."""
    return [Plugin(kind, version) for kind, (state, version) in states.items() if state == "intact"]


def has_cloud_init(states: dict[PluginKind, tuple[str, str]]) -> bool:
    """Whether first boot runs Cloud-Init (or Cloudbase-Init): one is intact."""
    return any(
        states[kind][0] == "intact" for kind in (PluginKind.CLOUD_INIT, PluginKind.CLOUDBASE_INIT)
    )
