"""images.request_method: request ids are scoped per RPC (and project)

Revision ID: 0007
Revises: 0006
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: What marks an existing row as a replica (domain.rules.REPLICATING; "copy
#: failed: " is the reason of a replica whose copy failed).
_REPLICATING = "replicating images/"
_COPY_FAILED = "copy failed: "


def upgrade() -> None:
    """Add images.request_method; the request id is unique per creator
    project, method and id (instead of per owner and per creator)."""
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("request_method", sa.String(16), nullable=False, server_default="create")
        )
    images = sa.table(
        "images",
        sa.column("request_method", sa.String),
        sa.column("visibility", sa.String),
        sa.column("source_server", sa.String),
        sa.column("status", sa.String),
        sa.column("status_reason", sa.String),
        sa.column("revision", sa.Integer),
    )
    # Replicas had no mark of their own. A replica is inserted SAVING with
    # its source in status_reason and becomes ACTIVE (revision 2) or KILLED
    # ("copy failed: ..."); an uploaded or captured image is inserted QUEUED
    # and needs two transitions (revision 3 at least) to become ACTIVE. So an
    # ACTIVE image at revision 2 that no server was captured into is a
    # replica no one has changed since. A replica changed since (revision 3
    # and up) cannot be told apart and counts as a create: a ReplicateImage
    # retry of it would make a new replica.
    op.execute(
        images.update()
        .where(
            images.c.visibility == "private",
            images.c.source_server == "",
            sa.or_(
                images.c.status_reason.like(_REPLICATING + "%"),
                sa.and_(images.c.status == "killed", images.c.status_reason.like(_COPY_FAILED + "%")),
                sa.and_(images.c.status == "active", images.c.revision == 2),
            ),
        )
        .values(request_method="replicate")
    )
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.drop_constraint("uq_images_owner_request", type_="unique")
        batch_op.drop_constraint("uq_images_creator_request", type_="unique")
        batch_op.create_unique_constraint(
            "uq_images_request", ["creator_project", "request_method", "request_id"]
        )


def downgrade() -> None:
    """Back to one request id space per owner and per creator. Fails if a
    project used one request id for both RPCs."""
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.drop_constraint("uq_images_request", type_="unique")
        batch_op.create_unique_constraint(
            "uq_images_creator_request", ["creator_project", "request_id"]
        )
        batch_op.create_unique_constraint(
            "uq_images_owner_request", ["owner_project", "request_id"]
        )
        batch_op.drop_column("request_method")
