"""servers: the simulated bare-metal fleet

Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create servers."""
    op.create_table(
        "servers",
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("project", sa.String(length=64), nullable=False),
        sa.Column("host_name", sa.String(length=64), nullable=False),
        sa.Column("flavor", sa.String(length=64), nullable=False),
        sa.Column("hardware_model", sa.String(length=64), nullable=False),
        sa.Column("image_id", sa.String(length=36), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("state_reason", sa.Text(), nullable=False),
        sa.Column("network_state", sa.String(length=16), nullable=False),
        sa.Column("boot_source", sa.String(length=16), nullable=False),
        sa.Column("system_disk_bytes", sa.BigInteger(), nullable=False),
        sa.Column("ssh_key_fingerprint", sa.String(length=128), nullable=False),
        sa.Column("plugins", sa.JSON(), nullable=False),
        sa.Column("data_disks_gb", sa.JSON(), nullable=False),
        sa.Column("task", sa.String(length=16), nullable=False),
        sa.Column("last_operation", sa.String(length=16), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
        sa.UniqueConstraint("id"),
    )
    op.create_index("ix_servers_project_seq", "servers", ["project", "seq"], unique=False)
    op.create_index("ix_servers_state", "servers", ["state"], unique=False)


def downgrade() -> None:
    """Drop servers."""
    op.drop_index("ix_servers_state", table_name="servers")
    op.drop_index("ix_servers_project_seq", table_name="servers")
    op.drop_table("servers")
