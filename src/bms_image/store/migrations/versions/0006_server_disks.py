"""servers.disk_*: moved to the fleet's own chain (store/fleet_migrations, 0001)

Revision ID: 0006
Revises: 0005

This revision used to add the fleet's record of what makes up a system disk
to `servers`. The fleet's chain now does (or finds it done on a database
that got it here); the revision stays, empty, so that databases recorded at
0006 and later keep their place in this chain.
"""

from collections.abc import Sequence

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Nothing: `servers` is the fleet's (store/fleet_migrations)."""


def downgrade() -> None:
    """Nothing: `servers` is the fleet's (store/fleet_migrations)."""
