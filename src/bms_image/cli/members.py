"""`bms-image members ...`: SharingService. The owner adds, lists and
removes members; a member accepts or rejects."""

from __future__ import annotations

from typing import Annotated

import typer
from google.protobuf import empty_pb2, field_mask_pb2

from bms.image.v1 import sharing_pb2
from bms_image.cli.client import (
    CliError,
    Connection,
    client_app,
    connection,
    reports_errors,
    resource,
)
from bms_image.cli.output import Column, JsonOpt, Output, label, pages, short_name, timestamp

app = client_app("Sharing: the projects an image is shared with, and their answers.")

ImageArg = Annotated[str, typer.Argument(help="the image, `images/{id}` or just the id")]
ProjectArg = Annotated[str, typer.Argument(help="the member project")]
OwnProjectArg = Annotated[
    str | None,
    typer.Argument(show_default=False, help="your project (the one your token names)"),
]
MEMBER_COLUMNS = [
    Column("PROJECT", lambda m: m.member_project, no_wrap=True),
    Column("STATUS", lambda m: label(m, "status")),
    Column("IMAGE", lambda m: short_name(m.image), no_wrap=True),
    Column("SHARED", lambda m: timestamp(m.create_time)),
    Column("UPDATED", lambda m: timestamp(m.update_time)),
]


def member_name(image: str, project: str) -> str:
    return f"{resource('images', image)}/members/{project}"


@app.command()
@reports_errors
def add(
    ctx: typer.Context, image: ImageArg, project: ProjectArg, json_output: JsonOpt = False
) -> None:
    """Share an active private image of yours with a project (it starts PENDING)."""
    conn = connection(ctx)
    answer = conn.sharing.CreateImageMember(
        sharing_pb2.CreateImageMemberRequest(
            parent=resource("images", image),
            member=sharing_pb2.ImageMember(member_project=project),
        ),
        metadata=conn.metadata,
    )
    Output(json_output).detail(answer)


@app.command("list")
@reports_errors
def list_members(
    ctx: typer.Context,
    image: ImageArg,
    page_size: Annotated[
        int,
        typer.Option(
            show_default=False,
            help="members per call, all pages being read (default: the service's, 50)",
        ),
    ] = 0,
    json_output: JsonOpt = False,
) -> None:
    """List an image's members (a member sees only itself)."""
    conn = connection(ctx)
    parent = resource("images", image)
    found = pages(
        lambda token: conn.sharing.ListImageMembers(
            sharing_pb2.ListImageMembersRequest(
                parent=parent, page_size=page_size, page_token=token
            ),
            metadata=conn.metadata,
        ),
        lambda response: response.members,
    )
    Output(json_output).listing(
        sharing_pb2.ListImageMembersResponse(members=found), found, MEMBER_COLUMNS
    )


@app.command()
@reports_errors
def remove(
    ctx: typer.Context, image: ImageArg, project: ProjectArg, json_output: JsonOpt = False
) -> None:
    """Stop sharing an image with a project (it loses the image at once)."""
    conn = connection(ctx)
    name = member_name(image, project)
    conn.sharing.DeleteImageMember(
        sharing_pb2.DeleteImageMemberRequest(name=name), metadata=conn.metadata
    )
    Output(json_output).done(f"removed {name}", empty_pb2.Empty())


def _answer(
    conn: Connection, image: str, project: str | None, status: sharing_pb2.MemberStatus
) -> sharing_pb2.ImageMember:
    project = project or conn.token_project()
    if not project:
        raise CliError("name your project: the token does not say which it is")
    answer: sharing_pb2.ImageMember = conn.sharing.UpdateImageMember(
        sharing_pb2.UpdateImageMemberRequest(
            member=sharing_pb2.ImageMember(name=member_name(image, project), status=status),
            update_mask=field_mask_pb2.FieldMask(paths=["status"]),
        ),
        metadata=conn.metadata,
    )
    return answer


@app.command()
@reports_errors
def accept(
    ctx: typer.Context, image: ImageArg, project: OwnProjectArg = None, json_output: JsonOpt = False
) -> None:
    """Accept an image shared with your project (then it is listed and deployable)."""
    answer = _answer(connection(ctx), image, project, sharing_pb2.MEMBER_STATUS_ACCEPTED)
    Output(json_output).detail(answer)


@app.command()
@reports_errors
def reject(
    ctx: typer.Context, image: ImageArg, project: OwnProjectArg = None, json_output: JsonOpt = False
) -> None:
    """Reject an image shared with your project (you may accept it later)."""
    answer = _answer(connection(ctx), image, project, sharing_pb2.MEMBER_STATUS_REJECTED)
    Output(json_output).detail(answer)
