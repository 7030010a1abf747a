"""Alembic environment: runs on the connection handed over by Database.migrate."""

from alembic import context

from bms_image.store.tables import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `bms-image migrate`, which provides the connection")
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
