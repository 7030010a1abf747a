"""Alembic environment of the image service's chain (version table
alembic_version): runs on the connection handed over by Database.migrate.
It knows no table declarations: migrations are plain op.* calls, and
tests/store compares the result with images/adapters/tables.py."""

from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `bms-image migrate`, which provides the connection")
context.configure(
    connection=connection,
    target_metadata=None,
    render_as_batch=True,
    version_table=context.config.attributes.get("version_table", "alembic_version"),
)
with context.begin_transaction():
    context.run_migrations()
