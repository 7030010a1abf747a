"""Proto messages <-> domain objects that both processes convert: the shared
enums, resource names <-> ids, timestamps, an image as ImageService describes
it (read by the fleet's image source) and a capture source (both directions).
What one process alone converts is in images/grpc/convert.py or
fleet/grpc/convert.py."""

from __future__ import annotations

import enum
import functools
import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

from google.protobuf import timestamp_pb2

from bms.image.v1 import capture_pb2, image_pb2, sharing_pb2
from bms_image.common import model
from bms_image.common.errors import invalid_field
from bms_image.common.model import CaptureSource

E = TypeVar("E", bound=enum.Enum)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
#: Each domain enum's proto enum, and the prefix of its value names.
EnumPrefixes = Mapping[type[enum.Enum], tuple[Any, str]]


class ProtoEnums:
    """Domain enums <-> the numbers of their proto enums, for the enum types
    it is given (each process adds its own to the shared ones)."""

    def __init__(self, prefixes: EnumPrefixes) -> None:
        self.prefixes: EnumPrefixes = dict(prefixes)
        self._number = functools.cache(self._lookup)

    def extended(self, prefixes: EnumPrefixes) -> ProtoEnums:
        return ProtoEnums({**self.prefixes, **prefixes})

    def to_proto(self, value: enum.Enum) -> int:
        # Keyed by type too: members of two StrEnums with the same text are equal.
        return self._number(type(value), value.value)

    def _lookup(self, kind: type[enum.Enum], value: Any) -> int:
        wrapper, prefix = self.prefixes[kind]
        return int(wrapper.Value(prefix + str(value).upper()))

    def from_proto(self, domain_type: type[E], number: int, field: str) -> E | None:
        """None for the UNSPECIFIED zero value; INVALID_ARGUMENT for numbers the
        API does not define (proto3 enums accept any integer on the wire)."""
        if number == 0:
            return None
        wrapper, prefix = self.prefixes[domain_type]
        try:
            name = wrapper.Name(number)
        except ValueError:
            raise invalid_field(field, f"{number} is not a value of this enum") from None
        return domain_type(name.removeprefix(prefix).lower())

    def text_from(self, kind: type[enum.Enum], number: int) -> str:
        """The value's text (e.g. `linux`); "" for UNSPECIFIED or an unknown number."""
        wrapper, prefix = self.prefixes[kind]
        try:
            return str(wrapper.Name(number)).removeprefix(prefix).lower() if number else ""
        except ValueError:
            return ""


#: The enums of the shared model.
ENUMS = ProtoEnums(
    {
        model.ImageType: (image_pb2.ImageType, "IMAGE_TYPE_"),
        model.ImageStatus: (image_pb2.ImageStatus, "IMAGE_STATUS_"),
        model.OsType: (image_pb2.OsType, "OS_TYPE_"),
        model.Architecture: (image_pb2.Architecture, "ARCHITECTURE_"),
        model.DiskFormat: (image_pb2.DiskFormat, "DISK_FORMAT_"),
        model.PluginKind: (image_pb2.PluginKind, "PLUGIN_KIND_"),
        model.MemberStatus: (sharing_pb2.MemberStatus, "MEMBER_STATUS_"),
    }
)
enum_to_proto = ENUMS.to_proto
enum_from_proto = ENUMS.from_proto


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


def server_id_from_name(name: str, field: str = "name") -> str:
    return _uuid_resource_id(name, "servers", field)


def flavor_name_from_resource(name: str, field: str = "name") -> str:
    raw = _resource_id(name, "flavors", field)
    if not raw:
        raise invalid_field(field, "names no flavor")
    return raw


def timestamp_to_proto(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    """Timestamp.FromDatetime, in integer arithmetic (it is on every image
    rendered); a naive datetime is taken as UTC, as FromDatetime does."""
    if value is None:
        return None
    since = (value if value.tzinfo else value.replace(tzinfo=UTC)) - _EPOCH
    return timestamp_pb2.Timestamp(
        seconds=since.days * 86_400 + since.seconds, nanos=since.microseconds * 1000
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


def _enum_from_text(kind: type[E], text: str) -> int:
    """A disk's free-text value (e.g. os-release `linux`) as a proto enum;
    UNSPECIFIED when the API has no such value."""
    try:
        return enum_to_proto(kind(text))
    except ValueError:
        return 0


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
        os_type=ENUMS.text_from(model.OsType, message.os_type),
        os_distro=message.os_distro,
        os_version=message.os_version,
        architecture=ENUMS.text_from(model.Architecture, message.architecture),
        plugins=[
            model.Plugin(kind, p.version)
            for p in message.plugins
            if (kind := enum_from_proto(model.PluginKind, p.kind, "plugins.kind")) is not None
        ],
        partitions=[model.Partition(p.name, p.mount, p.size_bytes) for p in message.partitions],
    )
