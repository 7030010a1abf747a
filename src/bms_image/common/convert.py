"""Proto messages <-> domain objects, and resource names <-> ids."""

from __future__ import annotations

import enum
import functools
import re
import uuid
from datetime import UTC, datetime
from typing import Any, TypeVar

from google.protobuf import timestamp_pb2

from bms.image.v1 import capture_pb2, image_pb2, provisioning_pb2, sharing_pb2
from bms_image.common import model
from bms_image.common.errors import invalid_field
from bms_image.common.model import CaptureSource
from bms_image.fleet.domain import servers
from bms_image.images.domain.images import ImageChanges, NewImage
from bms_image.images.domain.rules import PROJECT_PATTERN

E = TypeVar("E", bound=enum.Enum)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_ENUM_PREFIXES: dict[type[enum.Enum], tuple[Any, str]] = {
    model.ImageType: (image_pb2.ImageType, "IMAGE_TYPE_"),
    model.ImageStatus: (image_pb2.ImageStatus, "IMAGE_STATUS_"),
    model.OsType: (image_pb2.OsType, "OS_TYPE_"),
    model.Architecture: (image_pb2.Architecture, "ARCHITECTURE_"),
    model.DiskFormat: (image_pb2.DiskFormat, "DISK_FORMAT_"),
    model.PluginKind: (image_pb2.PluginKind, "PLUGIN_KIND_"),
    model.MemberStatus: (sharing_pb2.MemberStatus, "MEMBER_STATUS_"),
    servers.ServerState: (provisioning_pb2.ServerState, "SERVER_STATE_"),
    servers.NetworkState: (provisioning_pb2.NetworkState, "NETWORK_STATE_"),
    servers.BootSource: (provisioning_pb2.BootSource, "BOOT_SOURCE_"),
    servers.ProvisioningStage: (provisioning_pb2.ProvisioningStage, "PROVISIONING_STAGE_"),
}


def enum_to_proto(value: enum.Enum) -> int:
    # Keyed by type too: members of two StrEnums with the same text are equal.
    return _enum_number(type(value), value.value)


@functools.cache
def _enum_number(kind: type[enum.Enum], value: Any) -> int:
    wrapper, prefix = _ENUM_PREFIXES[kind]
    return int(wrapper.Value(prefix + str(value).upper()))


def enum_from_proto(domain_type: type[E], number: int, field: str) -> E | None:
    """None for the UNSPECIFIED zero value; INVALID_ARGUMENT for numbers the
    API does not define (proto3 enums accept any integer on the wire)."""
    if number == 0:
        return None
    wrapper, prefix = _ENUM_PREFIXES[domain_type]
    try:
        name = wrapper.Name(number)
    except ValueError:
        raise invalid_field(field, f"{number} is not a value of this enum") from None
    return domain_type(name.removeprefix(prefix).lower())


def _resource_id(name: str, collection: str, field: str) -> str:
    prefix = collection + "/"
    if not name.startswith(prefix):
        raise invalid_field(field, f"must be `{collection}/{{id}}`, got {name[:80]!r}")
    return name[len(prefix) :]


def _uuid_resource_id(name: str, collection: str, field: str) -> str:
    raw = _resource_id(name, collection, field)
    if _CANONICAL_UUID.fullmatch(raw):
        return raw
    try:
        parsed = uuid.UUID(raw)
    except ValueError:
        raise invalid_field(
            field, f"`{collection}/{{id}}` needs a UUID id, got {raw[:80]!r}"
        ) from None
    if str(parsed) != raw:
        raise invalid_field(field, f"write the id in canonical lower-case form: {parsed}")
    return raw


def image_id_from_name(name: str, field: str = "name") -> str:
    return _uuid_resource_id(name, "images", field)


def flavor_name_from_resource(name: str, field: str = "name") -> str:
    raw = _resource_id(name, "flavors", field)
    if not raw:
        raise invalid_field(field, "names no flavor")
    return raw


def _timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    """Timestamp.FromDatetime, in integer arithmetic (it is on every image
    rendered); a naive datetime is taken as UTC, as FromDatetime does."""
    if value is None:
        return None
    since = (value if value.tzinfo else value.replace(tzinfo=UTC)) - _EPOCH
    return timestamp_pb2.Timestamp(
        seconds=since.days * 86_400 + since.seconds, nanos=since.microseconds * 1000
    )


def image_to_proto(
    image: model.Image, image_type: model.ImageType, supported_flavors: list[str]
) -> image_pb2.Image:
    return image_pb2.Image(
        name=f"images/{image.id}",
        display_name=image.display_name,
        description=image.description,
        type=enum_to_proto(image_type),  # type: ignore[arg-type]
        owner_project=image.owner_project or "",
        os_type=enum_to_proto(image.os_type),  # type: ignore[arg-type]
        os_distro=image.os_distro,
        os_version=image.os_version,
        architecture=enum_to_proto(image.architecture),  # type: ignore[arg-type]
        disk_format=enum_to_proto(image.disk_format),  # type: ignore[arg-type]
        size_bytes=image.size_bytes,
        min_disk_gb=image.min_disk_gb,
        sha256=image.sha256,
        status=enum_to_proto(image.status),  # type: ignore[arg-type]
        status_reason=image.status_reason,
        hardware_model=image.hardware_model,
        supported_flavors=[f"flavors/{name}" for name in supported_flavors],
        plugins=[
            image_pb2.Plugin(kind=enum_to_proto(p.kind), version=p.version)  # type: ignore[arg-type]
            for p in image.plugins
        ],
        source_server=image.source_server,
        tags=image.tags,
        protected=image.protected,
        deprecated=image.deprecated,
        create_time=_timestamp(image.create_time),
        update_time=_timestamp(image.update_time),
        etag=image.etag,
        uploaded_bytes=image.uploaded_bytes,
        partitions=[
            image_pb2.Partition(name=p.name, mount=p.mount, size_bytes=p.size_bytes)
            for p in image.partitions
        ],
    )


def new_image_from_proto(message: image_pb2.Image) -> NewImage:
    plugins = []
    for index, plugin in enumerate(message.plugins):
        kind = enum_from_proto(model.PluginKind, plugin.kind, f"image.plugins[{index}].kind")
        if kind is None:
            raise invalid_field(f"image.plugins[{index}].kind", "is required")
        plugins.append(model.Plugin(kind, plugin.version))
    return NewImage(
        display_name=message.display_name,
        description=message.description,
        type=enum_from_proto(model.ImageType, message.type, "image.type"),
        os_type=enum_from_proto(model.OsType, message.os_type, "image.os_type"),
        os_distro=message.os_distro,
        os_version=message.os_version,
        architecture=enum_from_proto(
            model.Architecture, message.architecture, "image.architecture"
        ),
        disk_format=enum_from_proto(model.DiskFormat, message.disk_format, "image.disk_format"),
        min_disk_gb=message.min_disk_gb,
        hardware_model=message.hardware_model,
        supported_flavors=list(message.supported_flavors),
        plugins=plugins,
        tags=list(message.tags),
        protected=message.protected,
    )


UPDATABLE_FIELDS = ("display_name", "description", "tags", "min_disk_gb", "protected")


def changes_from_proto(message: image_pb2.Image, paths: list[str]) -> ImageChanges:
    if not paths:
        raise invalid_field(
            "update_mask", f"is required: name the fields to change ({', '.join(UPDATABLE_FIELDS)})"
        )
    changes = ImageChanges()
    for path in paths:
        if path not in UPDATABLE_FIELDS:
            raise invalid_field(
                "update_mask",
                f"{path!r} cannot be updated; updatable fields: {', '.join(UPDATABLE_FIELDS)}",
            )
        value = getattr(message, path)
        setattr(changes, path, list(value) if path == "tags" else value)
    return changes


def flavor_to_proto(flavor: model.Flavor) -> provisioning_pb2.Flavor:
    return provisioning_pb2.Flavor(
        name=f"flavors/{flavor.name}",
        hardware_model=flavor.hardware_model,
        cpu_cores=flavor.cpu_cores,
        cpu_model=flavor.cpu_model,
        memory_gib=flavor.memory_gib,
        local_disks=flavor.local_disks,
        local_disk_gb=flavor.local_disk_gb,
        evs_boot=flavor.evs_boot,
        public_images=[f"images/{image_id}" for image_id in flavor.public_image_ids],
        description=flavor.description,
    )


def member_from_name(name: str, field: str = "name") -> tuple[str, str]:
    """`images/{image}/members/{project}` -> (image id, project)."""
    image_part, separator, project = name.rpartition("/members/")
    if not separator or not project:
        raise invalid_field(
            field, f"must be `images/{{id}}/members/{{project}}`, got {name[:80]!r}"
        )
    image_id = image_id_from_name(image_part, field)
    if not PROJECT_PATTERN.match(project):
        raise invalid_field(
            field,
            f"names no valid project ({project[:80]!r}): 2-64 lower-case letters, digits, "
            "'-' or '_'",
        )
    return image_id, project


def member_to_proto(member: model.Member) -> sharing_pb2.ImageMember:
    return sharing_pb2.ImageMember(
        name=f"images/{member.image_id}/members/{member.project}",
        image=f"images/{member.image_id}",
        member_project=member.project,
        status=enum_to_proto(member.status),  # type: ignore[arg-type]
        create_time=_timestamp(member.create_time),
        update_time=_timestamp(member.update_time),
    )


def image_from_proto(message: image_pb2.Image) -> model.Image:
    """An image as ImageService described it (for the provisioner's rules)."""
    image_type = enum_from_proto(model.ImageType, message.type, "image.type")
    return model.Image(
        id=image_id_from_name(message.name),
        display_name=message.display_name,
        description=message.description,
        visibility=(
            model.Visibility.PUBLIC
            if image_type is model.ImageType.PUBLIC
            else model.Visibility.PRIVATE
        ),
        owner_project=message.owner_project or None,
        os_type=enum_from_proto(model.OsType, message.os_type, "os_type") or model.OsType.LINUX,
        os_distro=message.os_distro,
        os_version=message.os_version,
        architecture=enum_from_proto(model.Architecture, message.architecture, "architecture")
        or model.Architecture.X86_64,
        disk_format=enum_from_proto(model.DiskFormat, message.disk_format, "disk_format")
        or model.DiskFormat.RAW,
        size_bytes=message.size_bytes,
        min_disk_gb=message.min_disk_gb,
        sha256=message.sha256,
        status=enum_from_proto(model.ImageStatus, message.status, "status")
        or model.ImageStatus.QUEUED,
        hardware_model=message.hardware_model,
        supported_flavors=[f.removeprefix("flavors/") for f in message.supported_flavors],
        plugins=[
            model.Plugin(kind, p.version)
            for p in message.plugins
            if (kind := enum_from_proto(model.PluginKind, p.kind, "plugins.kind")) is not None
        ],
        tags=list(message.tags),
        protected=message.protected,
        deprecated=message.deprecated,
    )


def server_id_from_name(name: str, field: str = "name") -> str:
    return _uuid_resource_id(name, "servers", field)


def server_to_proto(server: servers.Server) -> provisioning_pb2.Server:
    return provisioning_pb2.Server(
        name=f"servers/{server.id}",
        host_name=server.host_name,
        project=server.project,
        flavor=f"flavors/{server.flavor}",
        hardware_model=server.hardware_model,
        image=f"images/{server.image_id}",
        state=enum_to_proto(server.state),  # type: ignore[arg-type]
        state_reason=server.state_reason,
        network_state=enum_to_proto(server.network_state),  # type: ignore[arg-type]
        boot_source=enum_to_proto(server.boot_source),  # type: ignore[arg-type]
        system_disk_bytes=server.system_disk_bytes,
        ssh_key_fingerprint=server.ssh_key_fingerprint,
        data_disks_gb=server.data_disks_gb,
        task=server.task,
        create_time=_timestamp(server.create_time),
        update_time=_timestamp(server.update_time),
    )


def event_to_proto(event: servers.ServerEvent) -> provisioning_pb2.ServerEvent:
    return provisioning_pb2.ServerEvent(
        server=f"servers/{event.server_id}",
        stage=enum_to_proto(event.stage),  # type: ignore[arg-type]
        bytes_done=event.bytes_done,
        bytes_total=event.bytes_total,
        percent=event.percent,
        boot_source=enum_to_proto(event.boot_source),  # type: ignore[arg-type]
        state=enum_to_proto(event.state),  # type: ignore[arg-type]
        error_code=event.error_code,
        error_reason=event.error_reason,
        message=event.message,
        time=_timestamp(event.time),
    )


def deploy_request_from_proto(
    message: provisioning_pb2.CreateServersRequest,
) -> servers.DeployRequest:
    return servers.DeployRequest(
        flavor=flavor_name_from_resource(message.flavor, "flavor"),
        image_id=image_id_from_name(message.image, "image"),
        count=message.count,
        name_prefix=message.name_prefix,
        ssh_public_key=message.ssh_public_key,
        user_data=message.user_data,
        boot_source=enum_from_proto(servers.BootSource, message.boot_source, "boot_source")
        or servers.BootSource.UNSPECIFIED,
        data_disks_gb=list(message.data_disks_gb),
    )


def _enum_from_text(kind: type[E], text: str) -> int:
    """A disk's free-text value (e.g. os-release `linux`) as a proto enum;
    UNSPECIFIED when the API has no such value."""
    try:
        return enum_to_proto(kind(text))
    except ValueError:
        return 0


def _text_from_enum(kind: type[E], number: int) -> str:
    wrapper, prefix = _ENUM_PREFIXES[kind]
    try:
        return str(wrapper.Name(number)).removeprefix(prefix).lower() if number else ""
    except ValueError:
        return ""


def capture_source_to_proto(source: CaptureSource) -> capture_pb2.PrepareServerCaptureResponse:
    return capture_pb2.PrepareServerCaptureResponse(
        hardware_model=source.hardware_model,
        os_type=_enum_from_text(model.OsType, source.os_type),  # type: ignore[arg-type]
        os_distro=source.os_distro,
        os_version=source.os_version,
        architecture=_enum_from_text(model.Architecture, source.architecture),  # type: ignore[arg-type]
        plugins=[
            image_pb2.Plugin(kind=enum_to_proto(p.kind), version=p.version)  # type: ignore[arg-type]
            for p in source.plugins
        ],
        partitions=[
            image_pb2.Partition(name=p.name, mount=p.mount, size_bytes=p.size_bytes)
            for p in source.partitions
        ],
    )


def capture_source_from_proto(
    server_id: str, message: capture_pb2.PrepareServerCaptureResponse
) -> CaptureSource:
    return CaptureSource(
        server_id=server_id,
        hardware_model=message.hardware_model,
        os_type=_text_from_enum(model.OsType, message.os_type),
        os_distro=message.os_distro,
        os_version=message.os_version,
        architecture=_text_from_enum(model.Architecture, message.architecture),
        plugins=[
            model.Plugin(kind, p.version)
            for p in message.plugins
            if (kind := enum_from_proto(model.PluginKind, p.kind, "plugins.kind")) is not None
        ],
        partitions=[model.Partition(p.name, p.mount, p.size_bytes) for p in message.partitions],
    )
