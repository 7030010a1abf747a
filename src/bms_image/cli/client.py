"""What every client command shares: the connection options (flags or
environment), the channel and stubs, and turning failures into one line on
stderr with a fixed exit code."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ParamSpec

import grpc
import jwt
import typer
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from bms.image.v1 import image_pb2_grpc, provisioning_pb2_grpc, sharing_pb2_grpc
from bms_image.cli.tracing import trace_command
from bms_image.common.telemetry.tracing import Tracing

#: Exit codes of the client commands (also in their --help).
EXIT_OK = 0
EXIT_RPC_ERROR = 1  # the service answered with an error, or a deployment failed
EXIT_USAGE = 2  # bad flags or arguments, unreadable or unwritable local files
EXIT_VERIFY = 3  # downloaded bytes differ from the size or SHA-256 the service sent

EXIT_CODES_HELP = (
    "Exit codes: 0 success; 1 the service returned an error (printed as "
    "`error: CODE (REASON): message`) or a deployment failed; 2 usage error "
    "(bad flags, unreadable or unwritable files); 3 a download failed verification."
)

DEFAULT_ADDRESS = "127.0.0.1:50051"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class CliError(Exception):
    """A failure the command reports as `error: <message>` and exits with."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class ClientOptions:
    """Where the service is and how to prove who we are."""

    address: str = DEFAULT_ADDRESS
    token: str | None = None
    ca_cert: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None

    def credentials(self) -> Any | None:
        """TLS channel credentials, or None for a plaintext channel."""
        if self.ca_cert is None and self.client_cert is None:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_cert),
            private_key=_read(self.client_key),
            certificate_chain=_read(self.client_cert),
        )


def _read(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as error:
        raise CliError(f"cannot read {path}: {error.strerror}") from None


@dataclass
class Connection:
    """The channel of one command, opened on first use and closed with the
    command's context; with tracing, its calls are client spans."""

    options: ClientOptions
    tracing: Tracing | None = None
    _channel: Any = field(default=None, init=False, repr=False)

    @property
    def channel(self) -> Any:
        if self._channel is None:
            channel_options = [
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ]
            credentials = self.options.credentials()
            if credentials is None:
                self._channel = grpc.insecure_channel(self.options.address, channel_options)
            else:
                self._channel = grpc.secure_channel(
                    self.options.address, credentials, channel_options
                )
            if self.tracing is not None:
                self._channel = self.tracing.intercept(self._channel)
        return self._channel

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        if not self.options.token:
            return ()
        return (("authorization", f"Bearer {self.options.token}"),)

    @property
    def images(self) -> Any:
        return image_pb2_grpc.ImageServiceStub(self.channel)

    @property
    def sharing(self) -> Any:
        return sharing_pb2_grpc.SharingServiceStub(self.channel)

    @property
    def provisioning(self) -> Any:
        return provisioning_pb2_grpc.ProvisioningServiceStub(self.channel)

    def token_project(self) -> str | None:
        """The project the token names (read, not verified: the service does that)."""
        if not self.options.token:
            return None
        try:
            claims = jwt.decode(self.options.token, options={"verify_signature": False})
        except jwt.InvalidTokenError:
            return None
        project = claims.get("sub")
        return project if isinstance(project, str) else None

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None


# -- the options, on the callback of every client sub-app ---------------------

AddressOpt = Annotated[
    str, typer.Option("--address", envvar="BMS_IMAGE_ADDRESS", help="host:port of the service")
]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="BMS_IMAGE_TOKEN",
        show_default=False,
        help="bearer token (see `bms-image token`), sent as `authorization: Bearer <token>`",
    ),
]
_FILE = {"exists": True, "dir_okay": False, "readable": True, "show_default": False}
CaCertOpt = Annotated[
    Path | None,
    typer.Option(
        "--ca-cert", envvar="BMS_IMAGE_CA_CERT", help="PEM CA bundle: use TLS, trusting it", **_FILE
    ),
]
ClientCertOpt = Annotated[
    Path | None,
    typer.Option(
        "--client-cert",
        envvar="BMS_IMAGE_CLIENT_CERT",
        help="PEM client certificate for mutual TLS (with --client-key)",
        **_FILE,
    ),
]
ClientKeyOpt = Annotated[
    Path | None,
    typer.Option(
        "--client-key",
        envvar="BMS_IMAGE_CLIENT_KEY",
        help="PEM private key of --client-cert",
        **_FILE,
    ),
]


def connect(
    ctx: typer.Context,
    address: AddressOpt = DEFAULT_ADDRESS,
    token: TokenOpt = None,
    ca_cert: CaCertOpt = None,
    client_cert: ClientCertOpt = None,
    client_key: ClientKeyOpt = None,
) -> None:
    """Connection options of the client commands; each also reads its BMS_IMAGE_* variable."""
    if (client_cert is None) != (client_key is None):
        raise typer.BadParameter(
            "--client-cert and --client-key go together", param_hint="--client-cert/--client-key"
        )
    try:
        command = trace_command(f"bms-image {ctx.info_name} {ctx.invoked_subcommand or ''}".strip())
    except RuntimeError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    connection = Connection(
        ClientOptions(address, token, ca_cert, client_cert, client_key),
        command.tracing if command is not None else None,
    )
    ctx.obj = connection
    if command is not None:  # closed after the channel (callbacks run last first)
        ctx.call_on_close(command.close)
    ctx.call_on_close(connection.close)


def client_app(help_text: str) -> typer.Typer:
    """A sub-app of client commands sharing the connection options."""
    return typer.Typer(
        no_args_is_help=True,
        callback=connect,
        help=help_text,
        epilog=EXIT_CODES_HELP,
    )


def connection(ctx: typer.Context) -> Connection:
    found = ctx.find_object(Connection)
    if found is None:  # only when a command is called outside its sub-app
        raise CliError("no connection options: run this command through `bms-image`")
    return found


# -- errors -------------------------------------------------------------------


def describe_rpc_error(error: grpc.RpcError) -> str:
    """`error: NOT_FOUND (IMAGE_NOT_FOUND): message`, then on the same line
    each field, precondition or quota violation the message does not already say."""
    code = error.code() if hasattr(error, "code") else None
    code_name = code.name if code is not None else "UNKNOWN"
    details = error.details() if hasattr(error, "details") else None
    message = " ".join((details or "").split())
    reason = ""
    violations: list[tuple[str, str]] = []  # (field or subject, description)
    try:
        status = rpc_status.from_call(error)
    except (ValueError, AttributeError):
        status = None
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        bad_request = error_details_pb2.BadRequest()
        precondition = error_details_pb2.PreconditionFailure()
        quota = error_details_pb2.QuotaFailure()
        if detail.Unpack(info):
            reason = info.reason
        elif detail.Unpack(bad_request):
            violations += [(v.field, v.description) for v in bad_request.field_violations]
        elif detail.Unpack(precondition):
            violations += [(v.subject, v.description) for v in precondition.violations]
        elif detail.Unpack(quota):
            violations += [(v.subject, v.description) for v in quota.violations]
    line = f"error: {code_name}" + (f" ({reason})" if reason else "") + f": {message or code_name}"
    extras = [
        f"{subject}: {description}"
        for subject, description in violations
        if " ".join(description.split()) not in message
    ]
    return "; ".join([line, *extras])


P = ParamSpec("P")


def reports_errors(command: Callable[P, None]) -> Callable[P, None]:
    """Wraps a client command: a failed call or a CliError becomes one line
    on stderr and its exit code instead of a traceback."""

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            command(*args, **kwargs)
        except grpc.RpcError as error:
            typer.echo(describe_rpc_error(error), err=True)
            if _is_unauthenticated(error) and not _has_token(kwargs.get("ctx")):
                typer.echo("hint: no token given: pass --token or set BMS_IMAGE_TOKEN", err=True)
            raise typer.Exit(EXIT_RPC_ERROR) from None
        except CliError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(error.exit_code) from None

    return run


def _has_token(ctx: object) -> bool:
    # Typer passes the context by keyword; it is click's Context, not typer.Context.
    found = ctx.find_object(Connection) if hasattr(ctx, "find_object") else None
    return isinstance(found, Connection) and bool(found.options.token)


def _is_unauthenticated(error: grpc.RpcError) -> bool:
    return hasattr(error, "code") and error.code() == grpc.StatusCode.UNAUTHENTICATED


# -- resource names -------------------------------------------------------------


def resource(collection: str, value: str) -> str:
    """`images/{id}` from either the name or the bare id."""
    prefix = collection + "/"
    return value if value.startswith(prefix) else prefix + value
