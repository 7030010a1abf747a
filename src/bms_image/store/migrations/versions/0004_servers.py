"""servers: moved to the fleet's own chain (store/fleet_migrations, 0001)

Revision ID: 0004
Revises: 0003

This revision used to create the fleet's `servers` table in the image
service's chain. Each process now migrates only its own tables: the fleet's
chain (version table fleet_alembic_version) creates `servers`, or adopts the
one an older database got here. The revision stays, empty, so that databases
recorded at 0004 and later keep their place in this chain.
"""

from collections.abc import Sequence

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Nothing: `servers` is the fleet's (store/fleet_migrations)."""


def downgrade() -> None:
    """Nothing: `servers` is the fleet's (store/fleet_migrations)."""
