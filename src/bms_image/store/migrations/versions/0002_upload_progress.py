"""uploaded_bytes for resumable uploads; index on status for recovery;
creator_project so that creating public images is idempotent too

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add images.uploaded_bytes and ix_images_status."""
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("uploaded_bytes", sa.BigInteger(), nullable=False, server_default="0")
        )
        batch_op.create_index("ix_images_status", ["status"], unique=False)
        batch_op.add_column(
            sa.Column("creator_project", sa.String(64), nullable=False, server_default="")
        )
        batch_op.create_unique_constraint(
            "uq_images_creator_request", ["creator_project", "request_id"]
        )
    images = sa.table(
        "images",
        sa.column("creator_project", sa.String),
        sa.column("owner_project", sa.String),
    )
    op.execute(
        images.update()
        .where(images.c.owner_project.is_not(None))
        .values(creator_project=images.c.owner_project)
    )


def downgrade() -> None:
    """Drop them again."""
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.drop_constraint("uq_images_creator_request", type_="unique")
        batch_op.drop_column("creator_project")
        batch_op.drop_index("ix_images_status")
        batch_op.drop_column("uploaded_bytes")
