"""listing indexes: a project's own images and the images shared with it,
each walked in seq order (ListImages)

Revision ID: 0009
Revises: 0008
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

#: images.seq's type: BIGINT, INTEGER on SQLite (the rowid).
SeqType = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create ix_images_owner_seq; add image_members.image_seq, filled from
    images, and its index."""
    op.create_index("ix_images_owner_seq", "images", ["owner_project", "seq"])
    with op.batch_alter_table("image_members") as batch:
        batch.add_column(sa.Column("image_seq", SeqType, nullable=True))
    op.execute(
        "UPDATE image_members SET image_seq = "
        "(SELECT images.seq FROM images WHERE images.id = image_members.image_id)"
    )
    with op.batch_alter_table("image_members") as batch:
        batch.alter_column("image_seq", existing_type=SeqType, nullable=False)
    op.create_index(
        "ix_image_members_project_status_seq",
        "image_members",
        ["project", "status", "image_seq"],
    )


def downgrade() -> None:
    """Drop them again."""
    op.drop_index("ix_image_members_project_status_seq", table_name="image_members")
    with op.batch_alter_table("image_members") as batch:
        batch.drop_column("image_seq")
    op.drop_index("ix_images_owner_seq", table_name="images")
