"""The fleet's tables: its servers. No other process reads or writes them
(the image service captures a server by calling the fleet).
store/fleet_migrations (version table fleet_alembic_version) builds exactly these."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from bms_image.store.columns import SeqType


class Base(DeclarativeBase):
    """The fleet's tables: a MetaData of their own."""


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
    #: What makes up the system disk (fleet/domain/system_disks.py), the fleet's own
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
