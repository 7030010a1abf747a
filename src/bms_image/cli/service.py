"""The service's own commands: serve, provisioner, migrate, token, storage."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from bms_image.common.config import Settings
from bms_image.common.eventloop import run_with

ListenOpt = Annotated[
    str | None, typer.Option(help="host:port to listen on (env BMS_IMAGE_LISTEN, 127.0.0.1:50051)")
]
DataDirOpt = Annotated[
    Path | None,
    typer.Option(
        help="directory for the SQLite file and token secret (env BMS_IMAGE_DATA_DIR, ./data)"
    ),
]
DatabaseOpt = Annotated[
    str | None,
    typer.Option(help="SQLAlchemy URL, e.g. postgresql+asyncpg://... (env BMS_IMAGE_DATABASE_URL)"),
]


#: Where `bms-image provisioner` listens unless told (serve takes 50051).
PROVISIONER_LISTEN = "127.0.0.1:50052"


def _settings(**overrides: object) -> Settings:
    return Settings.from_env(overrides)


#: Files this process creates are its user's alone (0600, directories 0700):
#: image bytes, staging, fleet disks and cache, SQLite files, the secret.
PRIVATE_UMASK = 0o077


def _private_data_dir(settings: Settings) -> None:
    """Before anything is written: files made from now on are private to this
    user, and the data directory is 0700 (existing files are out of other
    users' reach behind it). Exits with a message if it cannot be made so."""
    os.umask(PRIVATE_UMASK)
    try:
        settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(settings.data_dir, 0o700)
    except OSError as error:
        typer.echo(
            f"error: cannot make the data directory {settings.data_dir} private (0700): "
            f"{error.strerror}; use a directory this user owns (--data-dir)",
            err=True,
        )
        raise typer.Exit(1) from None


def serve(
    listen: ListenOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DatabaseOpt = None,
    private_image_quota: Annotated[
        int | None,
        typer.Option(help="private images per project (env BMS_IMAGE_PRIVATE_IMAGE_QUOTA, 50)"),
    ] = None,
    provisioner: Annotated[
        str | None,
        typer.Option(help="embedded: also run the fleet; none: it runs as `bms-image provisioner`"),
    ] = None,
    shutdown_grace_seconds: Annotated[
        float | None,
        typer.Option(help="grace for in-flight calls (env BMS_IMAGE_SHUTDOWN_GRACE_SECONDS, 10)"),
    ] = None,
    provisioner_address: Annotated[
        str | None,
        typer.Option(
            help="with --provisioner none: host:port of `bms-image provisioner`, for captures "
            "(env BMS_IMAGE_PROVISIONER_ADDRESS)"
        ),
    ] = None,
) -> None:
    """Start the gRPC service (migrates and seeds the database first)."""
    from bms_image.common.serving import serve as run_server
    from bms_image.common.telemetry.tracing import SERVE_SERVICE_NAME
    from bms_image.processes import start

    settings = _settings(
        listen=listen,
        data_dir=data_dir,
        database_url=database_url,
        private_image_quota=private_image_quota,
        provisioner=provisioner,
        shutdown_grace_seconds=shutdown_grace_seconds,
        provisioner_address=provisioner_address,
    )
    _private_data_dir(settings)
    try:
        run_with(settings.event_loop, lambda: run_server(settings, start, SERVE_SERVICE_NAME))
    except RuntimeError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None


def provisioner(
    image_service: Annotated[
        str | None,
        typer.Option(
            help="host:port of the ImageService to fetch images from (env BMS_IMAGE_IMAGE_SERVICE)"
        ),
    ] = None,
    listen: Annotated[
        str | None,
        typer.Option(
            help=f"host:port for ProvisioningService (env BMS_IMAGE_LISTEN, {PROVISIONER_LISTEN})"
        ),
    ] = None,
    data_dir: DataDirOpt = None,
    database_url: DatabaseOpt = None,
) -> None:
    """Run the simulated fleet (ProvisioningService) as its own process."""
    from bms_image.common.serving import serve as run_server
    from bms_image.common.telemetry.tracing import PROVISIONER_SERVICE_NAME
    from bms_image.processes import start_provisioner

    settings = _settings(
        listen=listen or (None if os.environ.get("BMS_IMAGE_LISTEN") else PROVISIONER_LISTEN),
        data_dir=data_dir,
        database_url=database_url,
        image_service=image_service,
    )
    _private_data_dir(settings)
    try:
        run_with(
            settings.event_loop,
            lambda: run_server(settings, start_provisioner, PROVISIONER_SERVICE_NAME),
        )
    except RuntimeError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None


def migrate(
    data_dir: DataDirOpt = None,
    database_url: DatabaseOpt = None,
    schema: Annotated[
        str,
        typer.Option(
            help="whose tables: images (the image service's), fleet (the provisioner's), "
            "or all (both, as the embedded default keeps them in one database)"
        ),
    ] = "all",
) -> None:
    """Apply the database migrations, then exit (`serve` and `provisioner`
    also do this on start)."""
    from bms_image.store.db import FLEET, IMAGES, Database

    chosen = {"images": (IMAGES,), "fleet": (FLEET,), "all": (IMAGES, FLEET)}.get(schema)
    if chosen is None:
        typer.echo(f"error: --schema must be images, fleet or all, not {schema!r}", err=True)
        raise typer.Exit(2)

    settings = _settings(data_dir=data_dir, database_url=database_url)
    _private_data_dir(settings)
    try:
        settings = settings.resolved()
    except RuntimeError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None

    async def run() -> None:
        database = Database(settings.database_url, sqlite_synchronous=settings.sqlite_synchronous)
        try:
            await database.migrate(*chosen)
        finally:
            await database.close()
        typer.echo(f"database {database.description} is at the newest schema")

    asyncio.run(run())


def token(
    project: Annotated[str, typer.Option(help="project the token acts for")],
    admin: Annotated[bool, typer.Option(help="grant the platform admin role")] = False,
    ttl_seconds: Annotated[
        int,
        typer.Option(
            help="lifetime in seconds, at most 604800 (7 days): a bearer token cannot be "
            "revoked short of rotating the secret, so mint a new one instead",
            min=1,
            max=7 * 24 * 3600,
        ),
    ] = 24 * 3600,
    data_dir: DataDirOpt = None,
) -> None:
    """Print a user bearer token signed with the service's secret (never a
    service credential: those the services mint for themselves)."""
    from bms_image.common.auth import TokenAuthority

    settings = _settings(data_dir=data_dir)
    try:
        typer.echo(TokenAuthority(settings.secret()).issue(project, admin, ttl_seconds))
    except (ValueError, RuntimeError) as error:  # RuntimeError: an insecure secret file
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None


def storage(data_dir: DataDirOpt = None, database_url: DatabaseOpt = None) -> None:
    """Show what the chunk store holds: the images' bytes (logical) against
    the bytes stored once deduplicated, with chunk and manifest counts
    (read from the database; an operator's view, no token needed)."""
    from bms_image.images.adapters.chunks import manifests
    from bms_image.store.db import IMAGES, Database

    settings = _settings(data_dir=data_dir, database_url=database_url)
    try:
        settings = settings.resolved()
    except RuntimeError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None

    async def run() -> manifests.StoreStats:
        database = Database(settings.database_url, sqlite_synchronous=settings.sqlite_synchronous)
        try:
            await database.migrate(IMAGES)
            return await database.run(manifests.stats)
        finally:
            await database.close()

    stats = asyncio.run(run())
    mib = 1024 * 1024
    typer.echo(
        f"logical bytes   {stats.logical_bytes:>16,}  ({stats.logical_bytes / mib:,.1f} MiB)"
    )
    typer.echo(f"stored bytes    {stats.stored_bytes:>16,}  ({stats.stored_bytes / mib:,.1f} MiB)")
    typer.echo(f"dedup ratio     {stats.dedup_ratio:>16.2f}")
    typer.echo(f"manifests       {stats.manifests:>16,}")
    typer.echo(f"chunks          {stats.chunks:>16,}  ({stats.unreferenced:,} unreferenced)")


COMMANDS: list[Callable[..., None]] = [serve, provisioner, migrate, token, storage]
