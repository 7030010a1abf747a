"""`bms-image servers ...`: the servers of ProvisioningService, with live
progress of their deployments."""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from google.protobuf import empty_pb2

from bms.image.v1 import provisioning_pb2
from bms_image.cli.client import (
    EXIT_RPC_ERROR,
    CliError,
    Connection,
    client_app,
    connection,
    reports_errors,
    resource,
)
from bms_image.cli.output import Column, JsonOpt, Output, label, pages, short_name
from bms_image.cli.progress import Deployment

app = client_app("Servers: deploy, follow, power, reinstall and delete bare-metal servers.")

pb = provisioning_pb2

ServerArg = Annotated[str, typer.Argument(help="the server, `servers/{id}` or just the id")]
_TEXT_FILE = {"exists": True, "dir_okay": False, "readable": True, "show_default": False}
SshKeyFileOpt = Annotated[
    Path | None,
    typer.Option(help="OpenSSH public key for root, installed by Cloud-Init", **_TEXT_FILE),
]
UserDataFileOpt = Annotated[
    Path | None, typer.Option(help="Cloud-Init user data (at most 32 KiB)", **_TEXT_FILE)
]
SERVER_COLUMNS = [
    Column("ID", lambda s: short_name(s.name), no_wrap=True),
    Column("HOST", lambda s: s.host_name),
    Column("STATE", lambda s: label(s, "state")),
    Column("NETWORK", lambda s: label(s, "network_state")),
    Column("FLAVOR", lambda s: short_name(s.flavor)),
    Column("IMAGE", lambda s: short_name(s.image)),
    Column("BOOT", lambda s: label(s, "boot_source")),
]


class BootChoice(StrEnum):
    evs = "evs"
    local = "local"


BOOT_SOURCES = {BootChoice.evs: pb.BOOT_SOURCE_EVS, BootChoice.local: pb.BOOT_SOURCE_LOCAL_DISK}


def _text(path: Path | None) -> str:
    if path is None:
        return ""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise CliError(f"cannot read {path}: {error}") from None


def follow(out: Output, events: Iterable[provisioning_pb2.ServerEvent]) -> Deployment:
    """Shows a stream of server events as progress bars (and, with --json,
    prints each event as one line of JSON) until it ends."""
    with Deployment() as view:
        for event in events:
            view.update(event)
            if out.json:
                out.write_json(event, indent=None)
    return view


def finish(conn: Connection, out: Output, view: Deployment) -> None:
    """After a deployment: the servers' table for people; an error line per
    failed server and exit code 1 if any failed."""
    if not out.json and view.last:
        servers = [
            conn.provisioning.GetServer(pb.GetServerRequest(name=name), metadata=conn.metadata)
            for name in view.last
        ]
        out.listing(pb.ListServersResponse(servers=servers), servers, SERVER_COLUMNS)
    failures = view.failures()
    for event in failures:
        reason = f" ({event.error_reason})" if event.error_reason else ""
        typer.echo(
            f"error: {event.server}: {event.error_code or 'FAILED'}{reason}: {event.message}",
            err=True,
        )
    if failures:
        raise typer.Exit(EXIT_RPC_ERROR)


@app.command()
@reports_errors
def create(
    ctx: typer.Context,
    flavor: Annotated[str, typer.Option(help="e.g. physical.s4.large (see `flavors list`)")],
    image: Annotated[str, typer.Option(help="the image, `images/{id}` or just the id")],
    name_prefix: Annotated[
        str, typer.Option(help="host names are {prefix}-1, {prefix}-2, ... (a-z, 0-9, -)")
    ],
    count: Annotated[int, typer.Option(min=1, max=100, help="how many servers")] = 1,
    ssh_key_file: SshKeyFileOpt = None,
    user_data_file: UserDataFileOpt = None,
    boot_source: Annotated[
        BootChoice | None,
        typer.Option(help="evs (quick provisioning) or local disk (evs when possible)"),
    ] = None,
    data_disk_gb: Annotated[
        list[int] | None, typer.Option(help="attach a data disk of this size (repeat, at most 8)")
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="print each progress event as a line of JSON")
    ] = False,
) -> None:
    """Deploy servers from an image, following each one's progress to ACTIVE."""
    conn = connection(ctx)
    out = Output(json_output)
    request = pb.CreateServersRequest(
        flavor=resource("flavors", flavor),
        image=resource("images", image),
        count=count,
        name_prefix=name_prefix,
        ssh_public_key=_text(ssh_key_file).strip(),
        user_data=_text(user_data_file),
        boot_source=BOOT_SOURCES[boot_source] if boot_source else pb.BOOT_SOURCE_UNSPECIFIED,
        data_disks_gb=data_disk_gb or [],
    )
    view = follow(out, conn.provisioning.CreateServers(request, metadata=conn.metadata))
    finish(conn, out, view)


@app.command()
@reports_errors
def reinstall(
    ctx: typer.Context,
    server: ServerArg,
    image: Annotated[
        str | None, typer.Option(help="install this image instead (the server's own)")
    ] = None,
    ssh_key_file: SshKeyFileOpt = None,
    user_data_file: UserDataFileOpt = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="print each progress event as a line of JSON")
    ] = False,
) -> None:
    """Rewrite a STOPPED server's system disk (data disks are kept), following it to ACTIVE."""
    conn = connection(ctx)
    out = Output(json_output)
    request = pb.ReinstallServerRequest(
        name=resource("servers", server),
        image=resource("images", image) if image else "",
        ssh_public_key=_text(ssh_key_file).strip(),
        user_data=_text(user_data_file),
    )
    view = follow(out, conn.provisioning.ReinstallServer(request, metadata=conn.metadata))
    finish(conn, out, view)


@app.command()
@reports_errors
def watch(
    ctx: typer.Context,
    server: ServerArg,
    json_output: Annotated[
        bool, typer.Option("--json", help="print each progress event as a line of JSON")
    ] = False,
) -> None:
    """Follow a server's work in progress to its end (or show its state when idle)."""
    conn = connection(ctx)
    out = Output(json_output)
    request = pb.WatchServerRequest(name=resource("servers", server))
    view = follow(out, conn.provisioning.WatchServer(request, metadata=conn.metadata))
    finish(conn, out, view)


@app.command("list")
@reports_errors
def list_servers(
    ctx: typer.Context,
    page_size: Annotated[
        int,
        typer.Option(
            show_default=False,
            help="servers per call, all pages being read (default: the service's, 50)",
        ),
    ] = 0,
    json_output: JsonOpt = False,
) -> None:
    """List your project's servers, oldest first."""
    conn = connection(ctx)
    found = pages(
        lambda token: conn.provisioning.ListServers(
            pb.ListServersRequest(page_size=page_size, page_token=token), metadata=conn.metadata
        ),
        lambda response: response.servers,
    )
    Output(json_output).listing(pb.ListServersResponse(servers=found), found, SERVER_COLUMNS)


@app.command()
@reports_errors
def show(ctx: typer.Context, server: ServerArg, json_output: JsonOpt = False) -> None:
    """Show one server."""
    conn = connection(ctx)
    answer = conn.provisioning.GetServer(
        pb.GetServerRequest(name=resource("servers", server)), metadata=conn.metadata
    )
    Output(json_output).detail(answer)


@app.command()
@reports_errors
def stop(ctx: typer.Context, server: ServerArg, json_output: JsonOpt = False) -> None:
    """Power an ACTIVE server off."""
    conn = connection(ctx)
    answer = conn.provisioning.StopServer(
        pb.StopServerRequest(name=resource("servers", server)), metadata=conn.metadata
    )
    Output(json_output).detail(answer)


@app.command()
@reports_errors
def start(ctx: typer.Context, server: ServerArg, json_output: JsonOpt = False) -> None:
    """Power a STOPPED server on."""
    conn = connection(ctx)
    answer = conn.provisioning.StartServer(
        pb.StartServerRequest(name=resource("servers", server)), metadata=conn.metadata
    )
    Output(json_output).detail(answer)


@app.command()
@reports_errors
def delete(ctx: typer.Context, server: ServerArg, json_output: JsonOpt = False) -> None:
    """Delete a server and its disks."""
    conn = connection(ctx)
    name = resource("servers", server)
    conn.provisioning.DeleteServer(pb.DeleteServerRequest(name=name), metadata=conn.metadata)
    Output(json_output).done(f"deleted {name}", empty_pb2.Empty())
