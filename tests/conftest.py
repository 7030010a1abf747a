"""Shared fixtures: a real service on a loopback port, tokens, stubs, and
PostgreSQL databases (skipped with a visible reason where there is no server,
except in CI, where a missing PostgreSQL fails the run)."""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from moto.server import ThreadedMotoServer

from support.services import (  # noqa: F401 - the fixtures of every test folder
    as_project,
    channel,
    images,
    provisioning,
    service,
    settings,
)
from support.tokens import Metadata  # noqa: F401 - re-exported

POSTGRES_URL = os.environ.get(
    "BMS_IMAGE_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)


def _postgres_dsn(url: str, database: str | None = None) -> str:
    dsn = url.replace("postgresql+asyncpg://", "postgresql://", 1)
    if database is not None:
        dsn = dsn.rsplit("/", 1)[0] + "/" + database
    return dsn


async def _postgres_reachable() -> str | None:
    try:
        connection = await asyncio.wait_for(asyncpg.connect(_postgres_dsn(POSTGRES_URL)), 5)
    except (TimeoutError, OSError, asyncpg.PostgresError) as error:
        return f"{type(error).__name__}: {error}"
    await connection.close()
    return None


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    problem = await _postgres_reachable()
    if problem is not None:
        message = f"PostgreSQL at {POSTGRES_URL} is not reachable ({problem})"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must run the PostgreSQL tests")
        pytest.skip(message)
    name = f"bms_image_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(_postgres_dsn(POSTGRES_URL))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield POSTGRES_URL.rsplit("/", 1)[0] + "/" + name
    admin = await asyncpg.connect(_postgres_dsn(POSTGRES_URL))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Runs a test once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'bms-image.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """The URL of an S3 server for the whole test session. Port 0 lets the
    kernel pick a free port; get_host_and_port() reports it once started.
    moto accepts any credentials."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def isolated_aws_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keeps the developer's ~/.aws files and AWS_* variables out of the tests."""
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
