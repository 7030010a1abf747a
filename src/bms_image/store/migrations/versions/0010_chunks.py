"""chunks: the content-addressed chunk store (chunks, manifests and their entries)

Revision ID: 0010
Revises: 0009
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create chunks, manifests and manifest_chunks (existing whole blobs
    stay readable and are converted in the background: README "Chunk store")."""
    op.create_table(
        "chunks",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("generation", sa.String(length=16), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("refs", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(length=8), nullable=False),
        sa.Column("stored", sa.Boolean(), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_chunks_refs_state", "chunks", ["refs", "state"])
    op.create_table(
        "manifests",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("chunk_bytes", sa.Integer(), nullable=False),
        sa.Column("complete", sa.Boolean(), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    op.create_table(
        "manifest_chunks",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("chunk_id", sa.String(length=64), nullable=True),
        sa.Column("length", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("key", "position"),
    )


def downgrade() -> None:
    """Drop them."""
    op.drop_table("manifest_chunks")
    op.drop_table("manifests")
    op.drop_index("ix_chunks_refs_state", table_name="chunks")
    op.drop_table("chunks")
