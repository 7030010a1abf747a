"""Persistence: SQLAlchemy 2.x tables, repositories and Alembic migrations."""
