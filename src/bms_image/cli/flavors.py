"""`bms-image flavors ...`: the hardware servers are built on."""

from __future__ import annotations

from typing import Annotated

import typer

from bms.image.v1 import provisioning_pb2
from bms_image.cli.client import client_app, connection, reports_errors, resource
from bms_image.cli.output import Column, JsonOpt, Output, pages, short_name

app = client_app("Flavors: the bare-metal hardware models, and the public images each supports.")

pb = provisioning_pb2

FLAVOR_COLUMNS = [
    Column("NAME", lambda f: short_name(f.name), no_wrap=True),
    Column("MODEL", lambda f: f.hardware_model),
    Column("CPU", lambda f: str(f.cpu_cores)),
    Column("MEMORY", lambda f: f"{f.memory_gib} GiB"),
    Column("LOCAL DISK", lambda f: f"{f.local_disk_gb} GiB"),
    Column("EVS BOOT", lambda f: "yes" if f.evs_boot else "no"),
    Column("PUBLIC IMAGES", lambda f: str(len(f.public_images))),
]


@app.command("list")
@reports_errors
def list_flavors(
    ctx: typer.Context,
    page_size: Annotated[
        int,
        typer.Option(
            show_default=False,
            help="flavors per call, all pages being read (default: the service's, 50)",
        ),
    ] = 0,
    json_output: JsonOpt = False,
) -> None:
    """List every flavor, by name."""
    conn = connection(ctx)
    found = pages(
        lambda token: conn.provisioning.ListFlavors(
            pb.ListFlavorsRequest(page_size=page_size, page_token=token), metadata=conn.metadata
        ),
        lambda response: response.flavors,
    )
    Output(json_output).listing(pb.ListFlavorsResponse(flavors=found), found, FLAVOR_COLUMNS)


@app.command()
@reports_errors
def show(
    ctx: typer.Context,
    flavor: Annotated[str, typer.Argument(help="e.g. physical.s4.large")],
    json_output: JsonOpt = False,
) -> None:
    """Show one flavor, with the public images it supports."""
    conn = connection(ctx)
    answer = conn.provisioning.GetFlavor(
        pb.GetFlavorRequest(name=resource("flavors", flavor)), metadata=conn.metadata
    )
    Output(json_output).detail(answer)
