"""servers: the simulated bare-metal fleet, in the fleet's own chain

Revision ID: fleet_0001
Revises:

Before each process migrated its own tables, the image service's chain
created `servers` (its revision 0004) and added the system-disk record
(0006, see below). On such a database this revision adopts the table as it
finds it, adding the disk record if the database stopped before 0006; on a
new one it creates it. Either way the rows are kept.

The disk record: servers on a local disk get theirs (the disk is
`system.disk`). An EVS clone made before the record existed was described
only by a file in its server's directory, which is never read again: it has
no record, so it cannot be captured until it is reinstalled.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "fleet_0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_DISK_COLUMNS = (
    ("disk_kind", 8),
    ("disk_top", 64),
    ("disk_base_image", 36),
    ("disk_base_sha256", 64),
)


def upgrade() -> None:
    """Create servers, or adopt the one the image service's chain made."""
    inspector = sa.inspect(op.get_bind())
    if not inspector.has_table("servers"):
        _create_servers()
        return
    present = {column["name"] for column in inspector.get_columns("servers")}
    missing = [(name, length) for name, length in _DISK_COLUMNS if name not in present]
    if not missing:
        return
    with op.batch_alter_table("servers", schema=None) as batch_op:
        for name, length in missing:
            batch_op.add_column(
                sa.Column(name, sa.String(length=length), nullable=False, server_default="")
            )
    op.execute(
        "UPDATE servers SET disk_kind = 'local', disk_top = 'system.disk' "
        "WHERE boot_source = 'local_disk' AND state IN ('active', 'stopped', 'error')"
    )


def _create_servers() -> None:
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
        *(
            sa.Column(name, sa.String(length=length), nullable=False, server_default="")
            for name, length in _DISK_COLUMNS
        ),
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
