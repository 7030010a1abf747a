"""`bms-image images ...`: ImageService (and ReplicateImage of SharingService)."""

from __future__ import annotations

import hashlib
import json
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated, BinaryIO

import typer
from google.protobuf import empty_pb2, field_mask_pb2

from bms.image.v1 import image_pb2, sharing_pb2
from bms_image.cli.client import (
    EXIT_USAGE,
    EXIT_VERIFY,
    CliError,
    client_app,
    connection,
    reports_errors,
    resource,
)
from bms_image.cli.output import Column, JsonOpt, Output, human_bytes, label, pages, short_name
from bms_image.cli.progress import Transfer

app = client_app("Images: list, inspect, create, change, upload, download, replicate.")

#: Bytes per upload message (the service takes at most 4 MiB).
CHUNK_BYTES = 1024 * 1024

ImageArg = Annotated[str, typer.Argument(help="the image, `images/{id}` or just the id")]
RequestIdOpt = Annotated[
    str | None,
    typer.Option(help="idempotency key (a UUID); a retry with the same key creates nothing new"),
]
IMAGE_COLUMNS = [
    Column("ID", lambda i: short_name(i.name), no_wrap=True),
    Column("DISPLAY NAME", lambda i: i.display_name),
    Column("TYPE", lambda i: label(i, "type")),
    Column("STATUS", lambda i: label(i, "status")),
    Column("OS", lambda i: f"{i.os_distro} {i.os_version} {label(i, 'architecture').lower()}"),
    Column("SIZE", lambda i: human_bytes(i.size_bytes) if i.size_bytes else "-"),
    Column("OWNER", lambda i: i.owner_project or "-"),
]


class OsChoice(StrEnum):
    linux = "linux"
    windows = "windows"


class ArchitectureChoice(StrEnum):
    x86_64 = "x86_64"
    aarch64 = "aarch64"


class FormatChoice(StrEnum):
    raw = "raw"
    qcow2 = "qcow2"
    vmdk = "vmdk"
    vhd = "vhd"
    vhdx = "vhdx"


def _plugin(text: str) -> image_pb2.Plugin:
    """`cloud-init=0.7.9` -> Plugin(PLUGIN_KIND_CLOUD_INIT, "0.7.9")."""
    kind, _, version = text.partition("=")
    enum_name = "PLUGIN_KIND_" + kind.strip().upper().replace("-", "_")
    if enum_name not in image_pb2.PluginKind.keys()[1:]:
        known = ", ".join(
            n.removeprefix("PLUGIN_KIND_").lower().replace("_", "-")
            for n in image_pb2.PluginKind.keys()[1:]
        )
        raise typer.BadParameter(f"{kind!r} is not a plug-in ({known})", param_hint="--plugin")
    return image_pb2.Plugin(kind=enum_name, version=version.strip())


@app.command("list")
@reports_errors
def list_images(
    ctx: typer.Context,
    filter_expression: Annotated[
        str,
        typer.Option(
            "--filter",
            help="e.g. 'type = public AND flavor = physical.s4.large'; fields: type, flavor, "
            "os_type, os_distro, os_version, architecture, status, name, tag, owner_project, "
            "protected, deprecated, member_status",
        ),
    ] = "",
    page_size: Annotated[
        int,
        typer.Option(
            show_default=False,
            help="images per call, all pages being read (default: the service's, 50)",
        ),
    ] = 0,
    json_output: JsonOpt = False,
) -> None:
    """List the images you can see, oldest first."""
    conn = connection(ctx)
    found = pages(
        lambda token: conn.images.ListImages(
            image_pb2.ListImagesRequest(
                page_size=page_size, page_token=token, filter=filter_expression
            ),
            metadata=conn.metadata,
        ),
        lambda response: response.images,
    )
    Output(json_output).listing(image_pb2.ListImagesResponse(images=found), found, IMAGE_COLUMNS)


@app.command()
@reports_errors
def show(ctx: typer.Context, image: ImageArg, json_output: JsonOpt = False) -> None:
    """Show one image."""
    conn = connection(ctx)
    answer = conn.images.GetImage(
        image_pb2.GetImageRequest(name=resource("images", image)), metadata=conn.metadata
    )
    Output(json_output).detail(answer)


@app.command()
@reports_errors
def create(
    ctx: typer.Context,
    display_name: Annotated[str, typer.Argument(help="the image's name, 1 to 128 characters")],
    os_type: Annotated[
        OsChoice | None, typer.Option(help="required unless --source-server")
    ] = None,
    os_distro: Annotated[str, typer.Option(help="e.g. centos, ubuntu, windows-server")] = "",
    os_version: Annotated[str, typer.Option(help="e.g. 7.6, 22.04, 2019")] = "",
    architecture: Annotated[ArchitectureChoice | None, typer.Option()] = None,
    hardware_model: Annotated[
        str, typer.Option(help="model the image was made on, e.g. s4-2288h-v5 (private images)")
    ] = "",
    description: Annotated[str, typer.Option()] = "",
    min_disk_gb: Annotated[
        int, typer.Option(show_default=False, help="smallest system disk, GiB (default: 40)")
    ] = 0,
    tag: Annotated[list[str] | None, typer.Option(help="a tag (repeat for more)")] = None,
    plugin: Annotated[
        list[str] | None,
        typer.Option(help="an installed plug-in as kind=version, e.g. cloud-init=0.7.9"),
    ] = None,
    protected: Annotated[
        bool, typer.Option("--protected", help="refuse deletion until unprotected")
    ] = False,
    public: Annotated[bool, typer.Option("--public", help="admin: publish a public image")] = False,
    supported_flavor: Annotated[
        list[str] | None, typer.Option(help="public images: a flavor it deploys on (repeat)")
    ] = None,
    source_server: Annotated[
        str | None, typer.Option(help="capture this STOPPED server's system disk")
    ] = None,
    request_id: RequestIdOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Create an image (QUEUED until `images upload`), or capture a server's disk."""
    conn = connection(ctx)
    image = image_pb2.Image(
        display_name=display_name,
        description=description,
        type=image_pb2.IMAGE_TYPE_PUBLIC if public else image_pb2.IMAGE_TYPE_UNSPECIFIED,
        os_type=f"OS_TYPE_{os_type.upper()}" if os_type else None,
        os_distro=os_distro,
        os_version=os_version,
        architecture=f"ARCHITECTURE_{architecture.upper()}" if architecture else None,
        hardware_model=hardware_model,
        min_disk_gb=min_disk_gb,
        tags=tag or [],
        plugins=[_plugin(text) for text in plugin or []],
        protected=protected,
        supported_flavors=[resource("flavors", f) for f in supported_flavor or []],
    )
    answer = conn.images.CreateImage(
        image_pb2.CreateImageRequest(
            image=image,
            request_id=request_id or str(uuid.uuid4()),
            source_server=resource("servers", source_server) if source_server else "",
        ),
        metadata=conn.metadata,
    )
    Output(json_output).detail(answer)


@app.command()
@reports_errors
def update(
    ctx: typer.Context,
    image: ImageArg,
    display_name: Annotated[str | None, typer.Option()] = None,
    description: Annotated[str | None, typer.Option()] = None,
    tag: Annotated[
        list[str] | None, typer.Option(help="the new tags, replacing all (repeat for more)")
    ] = None,
    clear_tags: Annotated[bool, typer.Option("--clear-tags", help="remove every tag")] = False,
    min_disk_gb: Annotated[int | None, typer.Option()] = None,
    protected: Annotated[bool | None, typer.Option("--protected/--unprotected")] = None,
    etag: Annotated[str, typer.Option(help="fail with ABORTED if the image changed since")] = "",
    json_output: JsonOpt = False,
) -> None:
    """Change the fields given (only those)."""
    conn = connection(ctx)
    changed = image_pb2.Image(name=resource("images", image), etag=etag)
    paths: list[str] = []
    if display_name is not None:
        changed.display_name = display_name
        paths.append("display_name")
    if description is not None:
        changed.description = description
        paths.append("description")
    if tag is not None or clear_tags:
        if tag and clear_tags:
            raise CliError("--tag and --clear-tags exclude each other", EXIT_USAGE)
        changed.tags.extend(tag or [])
        paths.append("tags")
    if min_disk_gb is not None:
        changed.min_disk_gb = min_disk_gb
        paths.append("min_disk_gb")
    if protected is not None:
        changed.protected = protected
        paths.append("protected")
    if not paths:
        raise CliError("nothing to change: give at least one field option", EXIT_USAGE)
    answer = conn.images.UpdateImage(
        image_pb2.UpdateImageRequest(
            image=changed, update_mask=field_mask_pb2.FieldMask(paths=paths)
        ),
        metadata=conn.metadata,
    )
    Output(json_output).detail(answer)


@app.command()
@reports_errors
def delete(
    ctx: typer.Context,
    image: ImageArg,
    etag: Annotated[str, typer.Option(help="fail with ABORTED if the image changed since")] = "",
    json_output: JsonOpt = False,
) -> None:
    """Delete an image (a protected one must be unprotected first)."""
    conn = connection(ctx)
    name = resource("images", image)
    conn.images.DeleteImage(
        image_pb2.DeleteImageRequest(name=name, etag=etag), metadata=conn.metadata
    )
    Output(json_output).done(f"deleted {name}", empty_pb2.Empty())


@app.command()
@reports_errors
def deprecate(ctx: typer.Context, image: ImageArg, json_output: JsonOpt = False) -> None:
    """Admin: deprecate a public image (hidden by default, not deployable anew)."""
    conn = connection(ctx)
    answer = conn.images.DeprecateImage(
        image_pb2.DeprecateImageRequest(name=resource("images", image)), metadata=conn.metadata
    )
    Output(json_output).detail(answer)


@app.command()
@reports_errors
def replicate(
    ctx: typer.Context,
    image: ImageArg,
    display_name: Annotated[str, typer.Option(help="name of the copy (the original's)")] = "",
    request_id: RequestIdOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Copy an accepted shared image into a private image of your own."""
    conn = connection(ctx)
    answer = conn.sharing.ReplicateImage(
        sharing_pb2.ReplicateImageRequest(
            name=resource("images", image),
            display_name=display_name,
            request_id=request_id or str(uuid.uuid4()),
        ),
        metadata=conn.metadata,
    )
    Output(json_output).detail(answer)


# -- the data plane ---------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Transfer(f"sha256 {path.name}", total=path.stat().st_size) as bar, path.open("rb") as f:
        while block := f.read(CHUNK_BYTES):
            digest.update(block)
            bar.advance(len(block))
    return digest.hexdigest()


def _upload_requests(
    metadata: image_pb2.UploadImageDataMetadata, path: Path, advance: Callable[[int], None]
) -> Iterator[image_pb2.UploadImageDataRequest]:
    yield image_pb2.UploadImageDataRequest(metadata=metadata)
    with path.open("rb") as handle:
        handle.seek(metadata.offset)
        while chunk := handle.read(CHUNK_BYTES):
            yield image_pb2.UploadImageDataRequest(chunk=chunk)
            advance(len(chunk))


@app.command()
@reports_errors
def upload(
    ctx: typer.Context,
    image: ImageArg,
    file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="the disk image")
    ],
    disk_format: Annotated[
        FormatChoice | None,
        typer.Option("--format", help="check the content is this format (detect it)"),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="continue a broken upload from the bytes already stored"),
    ] = False,
    json_output: JsonOpt = False,
) -> None:
    """Upload the bytes of a QUEUED image, with its size and SHA-256 for the service to check."""
    conn = connection(ctx)
    name = resource("images", image)
    size = file.stat().st_size
    offset = 0
    if resume:
        stored = conn.images.GetImage(image_pb2.GetImageRequest(name=name), metadata=conn.metadata)
        offset = stored.uploaded_bytes
        if offset > size:
            raise CliError(f"{name} has {offset} bytes stored, more than {file} holds", EXIT_USAGE)
    metadata = image_pb2.UploadImageDataMetadata(
        name=name,
        offset=offset,
        size_bytes=size,
        sha256=_sha256(file),
        disk_format=f"DISK_FORMAT_{disk_format.upper()}" if disk_format else None,
    )
    with Transfer(f"upload {file.name}", total=size, done=offset) as bar:
        answer = conn.images.UploadImageData(
            _upload_requests(metadata, file, bar.advance), metadata=conn.metadata
        )
    Output(json_output).detail(answer)


def receive(
    responses: Iterable[image_pb2.DownloadImageDataResponse],
    sink: BinaryIO,
    bar: Transfer | None = None,
) -> image_pb2.DownloadImageDataResponse:
    """Writes a download stream to `sink`, checking that the chunks follow
    each other and that size and SHA-256 match what its last message says."""
    digest = hashlib.sha256()
    written = 0
    for response in responses:
        if response.offset != written:
            raise CliError(
                f"the stream jumped from byte {written} to {response.offset}", EXIT_VERIFY
            )
        if bar is not None and written == 0:
            bar.set_total(response.size_bytes)
        sink.write(response.chunk)
        digest.update(response.chunk)
        written += len(response.chunk)
        if bar is not None:
            bar.advance(len(response.chunk))
        if response.last:
            if written != response.size_bytes:
                raise CliError(
                    f"received {written} bytes, the service says the image has "
                    f"{response.size_bytes}",
                    EXIT_VERIFY,
                )
            if digest.hexdigest() != response.sha256:
                raise CliError(
                    f"sha256 mismatch: received {digest.hexdigest()}, "
                    f"the service says {response.sha256 or '(nothing)'}",
                    EXIT_VERIFY,
                )
            return response
    raise CliError(f"the stream ended after {written} bytes without its last message", EXIT_VERIFY)


@app.command()
@reports_errors
def download(
    ctx: typer.Context,
    image: ImageArg,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", dir_okay=False, help="file to write (./{id}.raw)"),
    ] = None,
    json_output: JsonOpt = False,
) -> None:
    """Download an ACTIVE image, verifying its size and SHA-256.

    The file is written as FILE.part and renamed to FILE only once verified.
    """
    conn = connection(ctx)
    name = resource("images", image)
    target = output or Path(f"{short_name(name)}.raw")
    partial = target.with_name(target.name + ".part")
    try:
        sink = partial.open("wb")
    except OSError as error:
        raise CliError(f"cannot write {partial}: {error.strerror}", EXIT_USAGE) from None
    try:
        with sink, Transfer(f"download {target.name}") as bar:
            responses = conn.images.DownloadImageData(
                image_pb2.DownloadImageDataRequest(name=name), metadata=conn.metadata
            )
            last = receive(responses, sink, bar)
        partial.replace(target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    summary = {
        "name": name,
        "file": str(target),
        "size_bytes": last.size_bytes,
        "sha256": last.sha256,
    }
    if json_output:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    else:
        Output().out.print(
            f"downloaded {name} to {target}: {human_bytes(last.size_bytes)}, "
            f"sha256 {last.sha256} verified",
            markup=False,
        )
