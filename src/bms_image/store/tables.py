"""Table definitions. Alembic migrations in migrations/versions mirror these."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

#: SQLite autoincrements only an INTEGER PRIMARY KEY; PostgreSQL gets BIGINT.
SeqType = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    pass


class ProjectRow(Base):
    """One row per project that owns images: the lock that serialises quota checks."""

    __tablename__ = "projects"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ImageRow(Base):
    __tablename__ = "images"

    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(36), unique=True)
    display_name: Mapped[str] = mapped_column(String(128))
    description: Mapped[str] = mapped_column(Text, default="")
    visibility: Mapped[str] = mapped_column(String(16))
    owner_project: Mapped[str | None] = mapped_column(String(64), nullable=True)
    #: The project whose call created the image (an admin's, for public images);
    #: with request_method and request_id it makes creates idempotent.
    creator_project: Mapped[str] = mapped_column(String(64), default="")
    os_type: Mapped[str] = mapped_column(String(16))
    os_distro: Mapped[str] = mapped_column(String(32))
    os_version: Mapped[str] = mapped_column(String(32))
    architecture: Mapped[str] = mapped_column(String(16))
    disk_format: Mapped[str] = mapped_column(String(16))
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    min_disk_gb: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64), default="")
    uploaded_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    status: Mapped[str] = mapped_column(String(16))
    status_reason: Mapped[str] = mapped_column(Text, default="")
    hardware_model: Mapped[str] = mapped_column(String(64), default="")
    plugins: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    partitions: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    source_server: Mapped[str] = mapped_column(String(80), default="")
    protected: Mapped[bool] = mapped_column(Boolean, default=False)
    deprecated: Mapped[bool] = mapped_column(Boolean, default=False)
    request_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    #: The RPC request_id was given to ("create", "replicate"): each RPC has
    #: its own keys per project. Replicas say "replicate" even without one.
    request_method: Mapped[str] = mapped_column(String(16), default="create")
    revision: Mapped[int] = mapped_column(Integer, default=1)
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    update_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    tags: Mapped[list[ImageTagRow]] = relationship(
        lazy="selectin", cascade="all, delete-orphan", order_by="ImageTagRow.position"
    )
    flavors: Mapped[list[ImageFlavorRow]] = relationship(
        lazy="selectin", cascade="all, delete-orphan", order_by="ImageFlavorRow.flavor"
    )

    __table_args__ = (
        UniqueConstraint(
            "creator_project", "request_method", "request_id", name="uq_images_request"
        ),
        Index("ix_images_owner_status", "owner_project", "status"),
        Index("ix_images_visibility_seq", "visibility", "seq"),
        Index("ix_images_model_seq", "hardware_model", "seq"),
        Index("ix_images_status", "status"),
    )


class ImageTagRow(Base):
    __tablename__ = "image_tags"

    image_id: Mapped[str] = mapped_column(
        ForeignKey("images.id", ondelete="CASCADE"), primary_key=True
    )
    tag: Mapped[str] = mapped_column(String(64), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, default=0)

    __table_args__ = (Index("ix_image_tags_tag", "tag", "image_id"),)


class ImageFlavorRow(Base):
    """The flavors a public image is published for."""

    __tablename__ = "image_flavors"

    image_id: Mapped[str] = mapped_column(
        ForeignKey("images.id", ondelete="CASCADE"), primary_key=True
    )
    flavor: Mapped[str] = mapped_column(
        ForeignKey("flavors.name", ondelete="CASCADE"), primary_key=True
    )

    __table_args__ = (Index("ix_image_flavors_flavor", "flavor", "image_id"),)


class FlavorRow(Base):
    __tablename__ = "flavors"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    hardware_model: Mapped[str] = mapped_column(String(64), index=True)
    cpu_cores: Mapped[int] = mapped_column(Integer)
    cpu_model: Mapped[str] = mapped_column(String(128))
    memory_gib: Mapped[int] = mapped_column(Integer)
    local_disks: Mapped[str] = mapped_column(String(128))
    local_disk_gb: Mapped[int] = mapped_column(Integer)
    evs_boot: Mapped[bool] = mapped_column(Boolean)
    description: Mapped[str] = mapped_column(Text, default="")


class ImageMemberRow(Base):
    """A project a private image is shared with, and its answer."""

    __tablename__ = "image_members"

    image_id: Mapped[str] = mapped_column(
        ForeignKey("images.id", ondelete="CASCADE"), primary_key=True
    )
    project: Mapped[str] = mapped_column(String(64), primary_key=True)
    status: Mapped[str] = mapped_column(String(16))
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    update_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_image_members_project_status", "project", "status", "image_id"),)


class ServerRow(Base):
    """A server of the simulated fleet."""

    __tablename__ = "servers"

    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(36), unique=True)
    project: Mapped[str] = mapped_column(String(64))
    host_name: Mapped[str] = mapped_column(String(64))
    flavor: Mapped[str] = mapped_column(String(64))
    hardware_model: Mapped[str] = mapped_column(String(64))
    image_id: Mapped[str] = mapped_column(String(36))
    state: Mapped[str] = mapped_column(String(16))
    state_reason: Mapped[str] = mapped_column(Text, default="")
    network_state: Mapped[str] = mapped_column(String(16))
    boot_source: Mapped[str] = mapped_column(String(16))
    system_disk_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    ssh_key_fingerprint: Mapped[str] = mapped_column(String(128), default="")
    #: Plug-ins found intact on the disk at deployment: a capture needs them all.
    plugins: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    data_disks_gb: Mapped[list[int]] = mapped_column(JSON, default=list)
    #: Work holding the server ("", "capture", "reinstall"); nothing else may change it meanwhile.
    task: Mapped[str] = mapped_column(String(16), default="")
    last_operation: Mapped[str] = mapped_column(String(16), default="deploy")
    revision: Mapped[int] = mapped_column(Integer, default=1)
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    update_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    #: What makes up the system disk (domain/system_disks.py), the fleet's own
    #: record, never read from a disk's bytes: "" (none yet), "local" or "evs".
    disk_kind: Mapped[str] = mapped_column(String(8), default="")
    #: The writable file in the server's directory: system.disk or an overlay.
    disk_top: Mapped[str] = mapped_column(String(64), default="")
    #: An EVS clone's base: the image id and the SHA-256 naming its cache entry.
    disk_base_image: Mapped[str] = mapped_column(String(36), default="")
    disk_base_sha256: Mapped[str] = mapped_column(String(64), default="")

    __table_args__ = (
        Index("ix_servers_project_seq", "project", "seq"),
        Index("ix_servers_state", "state"),
    )


class DeploymentRow(Base):
    """The one row naming this deployment (every replica on this database):
    its id marks the blob store prefix the deployment owns, so that two
    deployments never sweep each other's blobs as orphans."""

    __tablename__ = "deployment"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
