"""The image service's tables: images, their tags, flavors and members,
the projects that serialise quota checks, the flavors and the deployment
marker. No other process reads or writes them (the fleet asks ImageService).
store/migrations (version table alembic_version) builds exactly these."""

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

from bms_image.store.columns import SeqType


class Base(DeclarativeBase):
    """The image service's tables: a MetaData of their own."""


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
        Index("ix_images_owner_seq", "owner_project", "seq"),
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
    #: The image's seq (it never changes): the images shared with a project
    #: are walked in seq order from its member rows (ListImages).
    image_seq: Mapped[int] = mapped_column(SeqType)
    status: Mapped[str] = mapped_column(String(16))
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    update_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index("ix_image_members_project_status", "project", "status", "image_id"),
        Index("ix_image_members_project_status_seq", "project", "status", "image_seq"),
    )


class DeploymentRow(Base):
    """The one row naming this deployment (every replica on this database):
    its id marks the blob store prefix the deployment owns, so that two
    deployments never sweep each other's blobs as orphans."""

    __tablename__ = "deployment"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ChunkRow(Base):
    """A chunk of the content-addressed store: its id (BLAKE3 of its bytes),
    the generation its bytes are stored under, and how many manifest entries
    reference it. `refs` changes in the transaction that adds or drops the
    references, and the collector frees only a chunk it finds at 0 (marking
    it `deleting` first, under the row's lock): README "Chunk store"."""

    __tablename__ = "chunks"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    generation: Mapped[str] = mapped_column(String(16))
    size: Mapped[int] = mapped_column(Integer)
    refs: Mapped[int] = mapped_column(BigInteger)
    #: "live", or "deleting" while the collector removes its bytes.
    state: Mapped[str] = mapped_column(String(8))
    #: Whether this generation's bytes were made durable at least once.
    stored: Mapped[bool] = mapped_column(Boolean)
    update_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_chunks_refs_state", "refs", "state"),)


class ManifestRow(Base):
    """The bytes stored under a key (an image's id, or a put in progress,
    `pending-...`): `size` bytes in chunks of `chunk_bytes`."""

    __tablename__ = "manifests"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    chunk_bytes: Mapped[int] = mapped_column(Integer)
    complete: Mapped[bool] = mapped_column(Boolean)
    #: A put in progress touches it with every batch: one left untouched
    #: long enough was abandoned (its process died) and is collected.
    update_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ManifestChunkRow(Base):
    """Entry `position` of a manifest: the chunk holding bytes
    [position * chunk_bytes, + length), or none for a chunk of zeros."""

    __tablename__ = "manifest_chunks"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    chunk_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    length: Mapped[int] = mapped_column(Integer)
