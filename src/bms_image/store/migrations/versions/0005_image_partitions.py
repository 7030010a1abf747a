"""images.partitions: the partition layout of captured images

Revision ID: 0005
Revises: 0004
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add images.partitions."""
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.add_column(sa.Column("partitions", sa.JSON(), nullable=False, server_default="[]"))


def downgrade() -> None:
    """Drop images.partitions."""
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.drop_column("partitions")
