"""The `bms-image` command: the service's own commands (serve, provisioner,
migrate, token) and the client commands (images, members, servers, flavors)
that call a running service over gRPC."""

from __future__ import annotations

import os

# Before grpc loads (it reads this once): its core would otherwise log INFO
# lines, such as every failed TLS handshake, on stderr around our own error
# line. ERROR is gRPC's documented default; an explicit setting wins.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import typer

from bms_image.cli import flavors, images, members, servers, service
from bms_image.cli.client import EXIT_CODES_HELP

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="bms-image: the BMS image service, and a client for it.",
    epilog=EXIT_CODES_HELP,
)
for command in service.COMMANDS:
    app.command()(command)
app.add_typer(images.app, name="images")
app.add_typer(members.app, name="members")
app.add_typer(servers.app, name="servers")
app.add_typer(flavors.app, name="flavors")


def main() -> None:
    app()


__all__ = ["app", "main"]
