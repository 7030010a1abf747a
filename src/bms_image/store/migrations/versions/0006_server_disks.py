"""servers.disk_*: the fleet's own record of what makes up a system disk

Revision ID: 0006
Revises: 0005

Servers on a local disk get their record (the disk is `system.disk`). An
EVS clone made before this revision was described only by a file in its
server's directory, which is never read again: it has no record, so it
cannot be captured until it is reinstalled.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add servers.disk_kind, disk_top, disk_base_image and disk_base_sha256."""
    with op.batch_alter_table("servers", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("disk_kind", sa.String(length=8), nullable=False, server_default="")
        )
        batch_op.add_column(
            sa.Column("disk_top", sa.String(length=64), nullable=False, server_default="")
        )
        batch_op.add_column(
            sa.Column("disk_base_image", sa.String(length=36), nullable=False, server_default="")
        )
        batch_op.add_column(
            sa.Column("disk_base_sha256", sa.String(length=64), nullable=False, server_default="")
        )
    op.execute(
        "UPDATE servers SET disk_kind = 'local', disk_top = 'system.disk' "
        "WHERE boot_source = 'local_disk' AND state IN ('active', 'stopped', 'error')"
    )


def downgrade() -> None:
    """Drop the servers.disk_* columns."""
    with op.batch_alter_table("servers", schema=None) as batch_op:
        batch_op.drop_column("disk_base_sha256")
        batch_op.drop_column("disk_base_image")
        batch_op.drop_column("disk_top")
        batch_op.drop_column("disk_kind")
