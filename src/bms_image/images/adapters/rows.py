"""The image service's tables as SQLAlchemy Core handles, and their rows <->
Image: what the repositories, the filter compiler and the catalog seeder
share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from sqlalchemy import (
    Connection,
    RowMapping,
    Select,
    Table,
    bindparam,
    insert,
    literal,
    select,
    union_all,
)

from bms_image.common.model import (
    Architecture,
    DiskFormat,
    Image,
    ImageStatus,
    OsType,
    Partition,
    Plugin,
    PluginKind,
    RequestMethod,
    Visibility,
)
from bms_image.images.adapters.tables import (
    ImageFlavorRow,
    ImageMemberRow,
    ImageRow,
    ImageTagRow,
    ProjectRow,
)
from bms_image.images.domain.rules import QUOTA_COUNTED_STATUSES
from bms_image.store.columns import utc

IMAGES: Table = ImageRow.__table__  # type: ignore[assignment]
TAGS: Table = ImageTagRow.__table__  # type: ignore[assignment]
FLAVORS: Table = ImageFlavorRow.__table__  # type: ignore[assignment]
MEMBERS: Table = ImageMemberRow.__table__  # type: ignore[assignment]
PROJECTS: Table = ProjectRow.__table__  # type: ignore[assignment]

#: The statuses that count against a project's quota, as stored.
COUNTED_STATUSES = [status.value for status in QUOTA_COUNTED_STATUSES]

#: The tags and supported flavors of a set of images, in one statement.
_LISTS_OF = union_all(
    select(
        TAGS.c.image_id,
        literal(0).label("kind"),
        TAGS.c.tag.label("value"),
        TAGS.c.position.label("position"),
    ).where(TAGS.c.image_id.in_(bindparam("ids", expanding=True))),
    select(FLAVORS.c.image_id, literal(1), FLAVORS.c.flavor, literal(0)).where(
        FLAVORS.c.image_id.in_(bindparam("ids", expanding=True))
    ),
)
#: Statements built once and bound at execution: building one costs more than
#: running it on SQLite.
_INSERT_IMAGE = insert(IMAGES).returning(IMAGES.c.seq)
_INSERT_TAG = insert(TAGS)
_INSERT_FLAVOR = insert(FLAVORS)


def image_from(row: RowMapping, tags: Sequence[str], flavors: Sequence[str]) -> Image:
    return Image(
        id=row["id"],
        seq=row["seq"],
        display_name=row["display_name"],
        description=row["description"],
        visibility=Visibility(row["visibility"]),
        owner_project=row["owner_project"],
        os_type=OsType(row["os_type"]),
        os_distro=row["os_distro"],
        os_version=row["os_version"],
        architecture=Architecture(row["architecture"]),
        disk_format=DiskFormat(row["disk_format"]),
        size_bytes=row["size_bytes"],
        min_disk_gb=row["min_disk_gb"],
        sha256=row["sha256"],
        uploaded_bytes=row["uploaded_bytes"],
        creator_project=row["creator_project"],
        status=ImageStatus(row["status"]),
        status_reason=row["status_reason"],
        hardware_model=row["hardware_model"],
        supported_flavors=list(flavors),
        plugins=[Plugin(PluginKind(p["kind"]), p["version"]) for p in row["plugins"]],
        partitions=[Partition(p["name"], p["mount"], p["size_bytes"]) for p in row["partitions"]],
        source_server=row["source_server"],
        tags=list(tags),
        protected=row["protected"],
        deprecated=row["deprecated"],
        request_id=row["request_id"],
        request_method=RequestMethod(row["request_method"]),
        revision=row["revision"],
        create_time=utc(row["create_time"]),
        update_time=utc(row["update_time"]),
    )


def images_from(connection: Connection, rows: Sequence[RowMapping]) -> list[Image]:
    """Images of rows of the images table, with their tags and flavors."""
    if not rows:
        return []
    tags: dict[str, list[tuple[int, str]]] = {}
    flavors: dict[str, list[str]] = {}
    for image_id, kind, value, position in connection.execute(
        _LISTS_OF, {"ids": [row["id"] for row in rows]}
    ):
        if kind == 0:
            tags.setdefault(image_id, []).append((position, value))
        else:
            flavors.setdefault(image_id, []).append(value)
    return [
        image_from(
            row,
            [tag for _, tag in sorted(tags.get(row["id"], ()))],
            sorted(flavors.get(row["id"], ())),
        )
        for row in rows
    ]


def image_or_none(connection: Connection, row: RowMapping | None) -> Image | None:
    return images_from(connection, [row])[0] if row is not None else None


def _image_values(image: Image) -> dict[str, Any]:
    """The images-table columns of a new image (seq comes from the database)."""
    assert image.create_time is not None and image.update_time is not None
    return {
        "id": image.id,
        "display_name": image.display_name,
        "description": image.description,
        "visibility": image.visibility.value,
        "owner_project": image.owner_project,
        "os_type": image.os_type.value,
        "os_distro": image.os_distro,
        "os_version": image.os_version,
        "architecture": image.architecture.value,
        "disk_format": image.disk_format.value,
        "size_bytes": image.size_bytes,
        "min_disk_gb": image.min_disk_gb,
        "sha256": image.sha256,
        "uploaded_bytes": image.uploaded_bytes,
        "creator_project": image.creator_project,
        "status": image.status.value,
        "status_reason": image.status_reason,
        "hardware_model": image.hardware_model,
        "plugins": [{"kind": p.kind.value, "version": p.version} for p in image.plugins],
        "partitions": [vars(p) for p in image.partitions],
        "source_server": image.source_server,
        "protected": image.protected,
        "deprecated": image.deprecated,
        "request_id": image.request_id,
        "request_method": image.request_method.value,
        "revision": image.revision,
        "create_time": image.create_time,
        "update_time": image.update_time,
    }


def insert_tags(connection: Connection, image_id: str, tags: Sequence[str]) -> None:
    if tags:
        connection.execute(
            _INSERT_TAG,
            [{"image_id": image_id, "tag": tag, "position": i} for i, tag in enumerate(tags)],
        )


def images_selected(
    connection: Connection, statement: Select[Any], values: dict[str, Any] | None = None
) -> list[Image]:
    return images_from(connection, connection.execute(statement, values).mappings().all())


def insert_image(connection: Connection, image: Image) -> Image:
    seq = connection.execute(_INSERT_IMAGE, _image_values(image)).scalar_one()
    insert_tags(connection, image.id, image.tags)
    if image.supported_flavors:
        connection.execute(
            _INSERT_FLAVOR,
            [{"image_id": image.id, "flavor": name} for name in image.supported_flavors],
        )
    return replace(
        image, seq=seq, tags=list(image.tags), supported_flavors=list(image.supported_flavors)
    )
