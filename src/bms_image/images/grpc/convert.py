"""Proto messages <-> domain objects of the image service's servicers
(ImageService, SharingService)."""

from __future__ import annotations

from bms.image.v1 import image_pb2, sharing_pb2
from bms_image.common import model
from bms_image.common.convert import (
    enum_from_proto,
    enum_to_proto,
    image_id_from_name,
    timestamp_to_proto,
)
from bms_image.common.errors import invalid_field
from bms_image.common.model import PROJECT_PATTERN
from bms_image.images.domain.images import ImageChanges, NewImage


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
        create_time=timestamp_to_proto(image.create_time),
        update_time=timestamp_to_proto(image.update_time),
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
        create_time=timestamp_to_proto(member.create_time),
        update_time=timestamp_to_proto(member.update_time),
    )
