"""Who may call what: EVERY RPC of ImageService, SharingService and
ProvisioningService (enumerated from the service descriptors, so a new RPC
without a row fails test_every_rpc_has_a_row) called by nine callers:

  no token      no `authorization` metadata at all
  malformed     the owner's (admin) token with its signature cut off
  expired       a token of the owner, admin role, correct key, `exp` past
  wrong key     a token of the owner, admin role, signed with another secret
  other         a project that has nothing to do with the owner's resources
  pending       a project the image was shared with, not answered
  accepted      a project that accepted the share
  owner         the project that owns the image (and the server)
  admin         a platform admin of yet another project

The four bad tokens get UNAUTHENTICATED (with the ErrorInfo reason of the
kind) on every RPC, with the very request the owner then makes successfully,
so the token is the only thing wrong. The five identities get the documented
outcome (README "API", the protos, domain/rules.py, domain/sharing.py,
fleet/domain/fleet.py): a caller that cannot see an image or server gets
NOT_FOUND, never PERMISSION_DENIED; admin-only calls (DeprecateImage,
InjectNetworkFault, publishing with CreateImage type PUBLIC, changing or
deleting a public image) refuse everybody else with PERMISSION_DENIED.

For every forbidden cell nothing the caller may not see is in any reply or
error: the private image's display name, description, SHA-256, size and id
(unless the caller named it), the queued image, the member list beyond the
caller itself, the server's id and host name. A NOT_FOUND is also compared
with the one a non-existent resource gets (same reason and message once the
names are masked), so it is no oracle of existence either.

Where this overlaps tests/sharing/test_access_matrix.py (13 RPCs x 6 callers,
one rejected member there, none here): that matrix checks the sharing rules
in depth; this one covers every RPC, the bad tokens and provisioning.

Each row is one test (`pytest -v` prints the rows as ids) on a service of its
own; each identity cell acts on a fresh scene (the successful calls change
it), the four bad tokens on the owner's scene before the owner acts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from reliability_support import (
    CALL_TIMEOUT,
    OTHER_SECRET,
    S4_FLAVOR,
    Metadata,
    Outcome,
    answer,
    answer_request,
    bearer,
    create_active,
    create_private,
    deploy,
    deploy_request,
    every_method,
    forge_token,
    mask,
    member_name,
    public_image,
    read_stream,
    rpc_id,
    share,
    stop_server,
    system_disk,
    text_of,
    unique,
    upload_requests,
)

from bms.image.v1 import image_pb2, provisioning_pb2, sharing_pb2
from bms_image.common.serving import RunningService
from support.builders import private_image
from support.errors import RichError, decode
from support.services import ImageStub, ProvisioningStub, SharingStub
from support.tokens import TEST_SECRET

BAD_TOKENS = ("no token", "malformed", "expired", "wrong key")
IDENTITIES = ("other", "pending", "accepted", "owner", "admin")
ROLES = BAD_TOKENS + IDENTITIES

BAD_TOKEN_REASONS = {
    "no token": "TOKEN_MISSING",
    "malformed": "TOKEN_INVALID",
    "expired": "TOKEN_EXPIRED",
    "wrong key": "TOKEN_INVALID_SIGNATURE",
}

OK = "OK"
NF = "NOT_FOUND"
PD = "PERMISSION_DENIED"
FP = "FAILED_PRECONDITION"
UNAUTHENTICATED = "UNAUTHENTICATED"
LISTED, HIDDEN = "OK listed", "OK hidden"  # is the scene's image / server in the listing
ALL, SELF = "OK all", "OK self"  # ListImageMembers: every member, or the caller only

#: The shared image's bytes: a real system disk (deployable) whose size is
#: its own (the junk tail), so the size is a secret a reply can be searched for.
SHARED_DATA = system_disk(tail=1237)


# -- the scene every identity cell acts on -------------------------------------------------


@dataclass
class Scene:
    """An ACTIVE private image shared with `pending` (unanswered) and
    `accepted`, a QUEUED private image, and (for the rows that need them) an
    ACTIVE or STOPPED server of the owner and a public image an admin made."""

    service: RunningService
    images: ImageStub
    sharing: SharingStub
    provisioning: ProvisioningStub
    project: dict[str, str]
    md: dict[str, Metadata]
    shared: str  # images/{id}: ACTIVE, private, shared
    shared_display_name: str
    shared_description: str
    shared_sha256: str
    shared_size: int
    queued: str  # images/{id}: QUEUED, private, never shared
    queued_display_name: str
    server: str = ""  # servers/{id} of the owner
    server_host: str = ""
    public: str = ""  # images/{id}: public, made by the admin

    def member(self, role: str) -> str:
        return member_name(self.shared, self.project[role])

    def secrets(self, role: str, row: Row) -> dict[str, str]:
        """What `role` may not learn in this row: label -> text."""
        hidden: dict[str, str] = {}
        if role in ("other", "admin"):
            hidden |= {
                "the shared image's display name": self.shared_display_name,
                "the shared image's description": self.shared_description,
                "the shared image's sha256": self.shared_sha256,
                "the shared image's id": _id(self.shared),
            }
        if role != "owner":
            hidden |= {
                "the queued image's display name": self.queued_display_name,
                "the queued image's id": _id(self.queued),
            }
        if role == "other":
            hidden |= {
                "a member": self.project["pending"],
                "another member": self.project["accepted"],
            }
        if role == "pending":
            hidden["another member"] = self.project["accepted"]
        if role == "accepted":
            hidden["another member"] = self.project["pending"]
        if self.server and role not in row.sees_server:
            hidden |= {
                "the server's id": _id(self.server),
                "the server's host name": self.server_host,
            }
        return {label: text for label, text in hidden.items() if text}


def _id(name: str) -> str:
    return name.rsplit("/", 1)[-1]


async def make_scene(service: RunningService, channel: grpc.aio.Channel, row: Row) -> Scene:
    suffix = uuid.uuid4().hex[:10]
    project = {role: f"{role}-{suffix}" for role in IDENTITIES}
    secret = service.settings.token_secret
    md = {
        role: bearer(forge_token(secret, project[role], admin=role == "admin"))
        for role in IDENTITIES
    }
    images = ImageStub(channel)
    sharing = SharingStub(channel)
    provisioning = ProvisioningStub(channel)
    display_name = f"secret-golden-{suffix}"
    description = f"classified-{uuid.uuid4().hex}"
    active = await create_active(
        images, md["owner"], SHARED_DATA, display_name=display_name, description=description
    )
    for role in ("pending", "accepted"):
        await share(sharing, md["owner"], active.name, project[role])
    await answer(
        sharing, md["accepted"], member_name(active.name, project["accepted"]),
        sharing_pb2.MEMBER_STATUS_ACCEPTED,
    )  # fmt: skip
    queued_name = f"secret-queued-{suffix}"
    queued = await create_private(images, md["owner"], display_name=queued_name)
    scene = Scene(
        service, images, sharing, provisioning, project, md,
        shared=active.name, shared_display_name=display_name, shared_description=description,
        shared_sha256=active.sha256, shared_size=active.size_bytes,
        queued=queued.name, queued_display_name=queued_name,
    )  # fmt: skip
    if row.server:
        scene.server = await deploy(provisioning, md["owner"], prefix=f"secret-{suffix}")
        scene.server_host = f"secret-{suffix}-1"
        if row.server == "stopped":
            await stop_server(provisioning, md["owner"], scene.server)
    if row.public:
        made = await images.CreateImage(
            image_pb2.CreateImageRequest(image=public_image(display_name=f"public-{suffix}")),
            metadata=md["admin"],
            timeout=CALL_TIMEOUT,
        )
        scene.public = made.name
    return scene


def ghost_of(scene: Scene, role: str) -> Scene:
    """The same scene with everything `role` cannot see replaced by things
    that do not exist: the queued image and the server for everyone but the
    owner, the shared and public images too for callers that cannot see
    them, and the other members' projects for a member (who sees the image
    but not the others' memberships)."""
    if role == "owner":
        return scene
    members = {member: unique("ghost") for member in ("pending", "accepted") if member != role}
    ghost = dataclasses.replace(
        scene,
        project={**scene.project, **members},
        queued=f"images/{uuid.uuid4()}",
        server=f"servers/{uuid.uuid4()}" if scene.server else "",
    )
    if role in ("other", "admin"):
        ghost.shared = f"images/{uuid.uuid4()}"
        ghost.public = f"images/{uuid.uuid4()}" if scene.public else ""
    return ghost


# -- probes: one request each, the outcome reduced to a label ------------------------------


@dataclass
class Cell:
    label: str
    asked: str  # the request(s), as text: what the caller itself named
    outcome: Outcome
    rich: RichError | None = None
    problems: list[str] = field(default_factory=list)


Probe = Callable[[Scene, str, Metadata], Awaitable[Cell]]


async def attempt(asked: Sequence[Message], call: Awaitable[list[Message]]) -> Cell:
    """Runs a call; its label is the status code name (OK on success)."""
    try:
        responses = await call
    except grpc.aio.AioRpcError as error:
        outcome = Outcome(error.code(), [], error)
        cell = Cell(error.code().name, text_of(asked), outcome)
        try:
            cell.rich = decode(error)
        except AssertionError as broken:
            cell.problems.append(f"not a proper rich status: {broken}")
        return cell
    return Cell(OK, text_of(asked), Outcome(grpc.StatusCode.OK, responses))


async def one(call: Awaitable[Message]) -> list[Message]:
    return [await call]


def _names(messages: list[Message], attribute: str) -> list[str]:
    return [item.name for m in messages for item in getattr(m, attribute)]


#: How a probe gathers a call's responses: `one`, `read_stream` or `first_of`.
Reader = Callable[[Any], Awaitable[list[Message]]]


async def call(
    s: Scene, md: Metadata, stub: str, method: str, request: Message, read: Reader = one
) -> Cell:
    """`request` sent to `s.<stub>.<method>` with `md`, its responses gathered by `read`."""
    rpc = getattr(getattr(s, stub), method)
    return await attempt([request], read(rpc(request, metadata=md, timeout=CALL_TIMEOUT)))


def probe(stub: str, method: str, build: Callable[[Scene], Message], read: Reader = one) -> Probe:
    """The probe that sends `build(scene)` and only labels the outcome."""

    async def run(s: Scene, role: str, md: Metadata) -> Cell:
        return await call(s, md, stub, method, build(s), read)

    return run


def first_of(responses: grpc.aio.UnaryStreamCall) -> Awaitable[list[Message]]:
    return read_stream(responses, 1)


async def probe_list_images(s: Scene, role: str, md: Metadata) -> Cell:
    cell = await call(s, md, "images", "ListImages", image_pb2.ListImagesRequest(page_size=1000))
    if cell.label == OK:
        listed = s.shared in _names(cell.outcome.responses, "images")
        cell.label = LISTED if listed else HIDDEN
    return cell


def _update(name: str) -> image_pb2.UpdateImageRequest:
    return image_pb2.UpdateImageRequest(
        image=image_pb2.Image(name=name, description="changed"), update_mask=mask("description")
    )


probe_get_image = probe("images", "GetImage", lambda s: image_pb2.GetImageRequest(name=s.shared))
probe_create_image = probe(
    "images", "CreateImage", lambda s: image_pb2.CreateImageRequest(image=private_image("mine"))
)
probe_create_public_image = probe(
    "images",
    "CreateImage",
    lambda s: image_pb2.CreateImageRequest(image=public_image(display_name="published")),
)
probe_update_image = probe("images", "UpdateImage", lambda s: _update(s.shared))
probe_update_public_image = probe("images", "UpdateImage", lambda s: _update(s.public))
probe_delete_image = probe(
    "images", "DeleteImage", lambda s: image_pb2.DeleteImageRequest(name=s.shared)
)
probe_delete_public_image = probe(
    "images", "DeleteImage", lambda s: image_pb2.DeleteImageRequest(name=s.public)
)
probe_deprecate_image = probe(
    "images", "DeprecateImage", lambda s: image_pb2.DeprecateImageRequest(name=s.shared)
)


async def probe_deprecate_public_image(s: Scene, role: str, md: Metadata) -> Cell:
    request = image_pb2.DeprecateImageRequest(name=s.public)
    cell = await call(s, md, "images", "DeprecateImage", request)
    if cell.label == OK:
        assert cell.outcome.responses[0].deprecated  # type: ignore[attr-defined]
    return cell


async def _upload(s: Scene, md: Metadata, name: str) -> Cell:
    requests = list(upload_requests(name, b"\x01" * 4096))
    return await attempt(
        requests, one(s.images.UploadImageData(iter(requests), metadata=md, timeout=CALL_TIMEOUT))
    )


async def probe_upload_queued(s: Scene, role: str, md: Metadata) -> Cell:
    return await _upload(s, md, s.queued)


async def probe_upload_shared(s: Scene, role: str, md: Metadata) -> Cell:
    return await _upload(s, md, s.shared)


async def probe_download(s: Scene, role: str, md: Metadata) -> Cell:
    request = image_pb2.DownloadImageDataRequest(name=s.shared)
    cell = await call(s, md, "images", "DownloadImageData", request, read_stream)
    if cell.label == OK:
        data = b"".join(m.chunk for m in cell.outcome.responses)  # type: ignore[attr-defined]
        if data != SHARED_DATA:
            cell.problems.append(f"{role} downloaded {len(data)} bytes that are not the image")
    return cell


probe_create_member = probe(
    "sharing",
    "CreateImageMember",
    lambda s: sharing_pb2.CreateImageMemberRequest(
        parent=s.shared, member=sharing_pb2.ImageMember(member_project=unique("newcomer"))
    ),
)


async def probe_list_members(s: Scene, role: str, md: Metadata) -> Cell:
    request = sharing_pb2.ListImageMembersRequest(parent=s.shared, page_size=1000)
    cell = await call(s, md, "sharing", "ListImageMembers", request)
    if cell.label == OK:
        listed = sorted(m.member_project for r in cell.outcome.responses for m in r.members)  # type: ignore[attr-defined]
        if listed == sorted([s.project["pending"], s.project["accepted"]]):
            cell.label = ALL
        elif listed == [s.project.get(role, "")]:
            cell.label = SELF
        else:
            cell.label = f"OK {listed}"
    return cell


# Everybody asks for the accepted member's membership: a pending member
# may not see it (a member sees only its own).
probe_get_member = probe(
    "sharing",
    "GetImageMember",
    lambda s: sharing_pb2.GetImageMemberRequest(name=s.member("accepted")),
)
# Everybody tries to accept the pending member's invitation.
probe_update_member = probe(
    "sharing",
    "UpdateImageMember",
    lambda s: answer_request(s.member("pending"), sharing_pb2.MEMBER_STATUS_ACCEPTED),
)
probe_delete_member = probe(
    "sharing",
    "DeleteImageMember",
    lambda s: sharing_pb2.DeleteImageMemberRequest(name=s.member("accepted")),
)
probe_replicate = probe(
    "sharing", "ReplicateImage", lambda s: sharing_pb2.ReplicateImageRequest(name=s.shared)
)
probe_list_flavors = probe(
    "provisioning", "ListFlavors", lambda s: provisioning_pb2.ListFlavorsRequest()
)
probe_get_flavor = probe(
    "provisioning", "GetFlavor", lambda s: provisioning_pb2.GetFlavorRequest(name=S4_FLAVOR)
)


async def probe_create_servers(s: Scene, role: str, md: Metadata) -> Cell:
    # Deploys the shared image: only the owner and the accepted member may.
    # The first event says the request was accepted; the stream is then
    # dropped (the deployment goes on by itself).
    request = deploy_request(image=s.shared, prefix="probe")
    cell = await call(s, md, "provisioning", "CreateServers", request, first_of)
    if cell.label == OK:
        first = cell.outcome.responses[0]
        if first.stage != provisioning_pb2.PROVISIONING_STAGE_VALIDATING:  # type: ignore[attr-defined]
            cell.problems.append(f"first event is not VALIDATING: {first}")
    return cell


async def probe_list_servers(s: Scene, role: str, md: Metadata) -> Cell:
    request = provisioning_pb2.ListServersRequest(page_size=1000)
    cell = await call(s, md, "provisioning", "ListServers", request)
    if cell.label == OK:
        listed = s.server in _names(cell.outcome.responses, "servers")
        cell.label = LISTED if listed else HIDDEN
    return cell


def server_probe(method: str, read: Reader = one) -> Probe:
    """The probe that sends `<method>Request(name=<the owner's server>)`."""
    request_type = getattr(provisioning_pb2, f"{method}Request")
    return probe("provisioning", method, lambda s: request_type(name=s.server), read)


# -- the matrix ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    rpc: str  # Service.Method
    variant: str  # what the row's request targets, when an RPC has several rows
    expected: tuple[str, ...]  # per identity: other, pending, accepted, owner, admin
    probe: Probe
    server: str = ""  # "", "active" or "stopped": the scene needs a server of the owner
    public: bool = False  # the scene needs a public image made by the admin
    sees_server: tuple[str, ...] = ("owner",)

    @property
    def title(self) -> str:
        return self.rpc + (f"[{self.variant}]" if self.variant else "")


#: Only the owner of the server may act on it; everybody else gets NOT_FOUND.
OWNER_ONLY = (NF, NF, NF, OK, NF)
#: Only a platform admin may publish or change a public image.
ADMIN_ONLY = (PD, PD, PD, PD, OK)


def public_row(rpc: str, probe: Probe) -> Row:
    """A change of the public image the admin made: admin-only."""
    return Row(rpc, "public", ADMIN_ONLY, probe, public=True)


def server_row(
    method: str,
    server: str,
    read: Reader = one,
    expected: tuple[str, ...] = OWNER_ONLY,
    sees_server: tuple[str, ...] = ("owner",),
) -> Row:
    """A ProvisioningService call on the owner's `server` ("active" or "stopped")."""
    return Row(
        f"ProvisioningService.{method}",
        "",
        expected,
        server_probe(method, read),
        server=server,
        sees_server=sees_server,
    )


# expected per identity: (other, pending, accepted, owner, admin)
ROWS: list[Row] = [
    Row("ImageService.ListImages", "", (HIDDEN, HIDDEN, LISTED, LISTED, HIDDEN), probe_list_images),
    Row("ImageService.GetImage", "", (NF, OK, OK, OK, NF), probe_get_image),
    Row("ImageService.CreateImage", "private", (OK, OK, OK, OK, OK), probe_create_image),
    Row("ImageService.CreateImage", "public", ADMIN_ONLY, probe_create_public_image),
    Row("ImageService.UpdateImage", "shared", (NF, PD, PD, OK, NF), probe_update_image),
    public_row("ImageService.UpdateImage", probe_update_public_image),
    Row("ImageService.DeleteImage", "shared", (NF, PD, PD, OK, NF), probe_delete_image),
    public_row("ImageService.DeleteImage", probe_delete_public_image),
    Row("ImageService.DeprecateImage", "shared", (NF, PD, PD, PD, NF), probe_deprecate_image),
    public_row("ImageService.DeprecateImage", probe_deprecate_public_image),
    Row("ImageService.UploadImageData", "queued", (NF, NF, NF, OK, NF), probe_upload_queued),
    Row("ImageService.UploadImageData", "shared", (NF, PD, PD, FP, NF), probe_upload_shared),
    Row("ImageService.DownloadImageData", "", (NF, FP, OK, OK, NF), probe_download),
    Row("SharingService.CreateImageMember", "", (NF, PD, PD, OK, NF), probe_create_member),
    Row("SharingService.ListImageMembers", "", (NF, SELF, SELF, ALL, ALL), probe_list_members),
    Row("SharingService.GetImageMember", "accepted's", (NF, NF, OK, OK, OK), probe_get_member),
    Row("SharingService.UpdateImageMember", "pending's", (NF, OK, NF, PD, NF), probe_update_member),
    Row(
        "SharingService.DeleteImageMember", "accepted's", (NF, PD, PD, OK, NF), probe_delete_member
    ),
    Row("SharingService.ReplicateImage", "", (NF, FP, OK, FP, NF), probe_replicate),
    Row("ProvisioningService.ListFlavors", "", (OK, OK, OK, OK, OK), probe_list_flavors),
    Row("ProvisioningService.GetFlavor", "", (OK, OK, OK, OK, OK), probe_get_flavor),
    Row(
        "ProvisioningService.CreateServers",
        "shared image",
        (NF, FP, OK, OK, NF),
        probe_create_servers,
    ),
    server_row("GetServer", "active"),
    Row(
        "ProvisioningService.ListServers",
        "",
        (HIDDEN, HIDDEN, HIDDEN, LISTED, HIDDEN),
        probe_list_servers,
        server="active",
    ),
    server_row("StartServer", "stopped"),
    server_row("StopServer", "active"),
    server_row("DeleteServer", "active"),
    server_row("ReinstallServer", "stopped", first_of),
    server_row("WatchServer", "active", read_stream),
    server_row(
        "InjectNetworkFault",
        "active",
        expected=(NF, NF, NF, PD, OK),
        sees_server=("owner", "admin"),
    ),
]

#: The ErrorInfo reason of each refusal; NOT_FOUND cells default to the
#: resource's *_NOT_FOUND (see not_found_reason).
REASONS: dict[tuple[str, str], str] = {
    **{("ImageService.CreateImage[public]", r): "ADMIN_REQUIRED" for r in IDENTITIES[:4]},
    **{("ImageService.UpdateImage[public]", r): "PUBLIC_IMAGE_READ_ONLY" for r in IDENTITIES[:4]},
    **{("ImageService.DeleteImage[public]", r): "PUBLIC_IMAGE_READ_ONLY" for r in IDENTITIES[:4]},
    **{("ImageService.DeprecateImage[public]", r): "ADMIN_REQUIRED" for r in IDENTITIES[:4]},
    **{
        ("ImageService.DeprecateImage[shared]", r): "ADMIN_REQUIRED"
        for r in ("pending", "accepted", "owner")
    },
    **{("ImageService.UpdateImage[shared]", r): "NOT_IMAGE_OWNER" for r in ("pending", "accepted")},
    **{("ImageService.DeleteImage[shared]", r): "NOT_IMAGE_OWNER" for r in ("pending", "accepted")},
    **{
        ("ImageService.UploadImageData[shared]", r): "NOT_IMAGE_OWNER"
        for r in ("pending", "accepted")
    },
    ("ImageService.UploadImageData[shared]", "owner"): "IMAGE_NOT_QUEUED",
    ("ImageService.DownloadImageData", "pending"): "SHARED_IMAGE_NOT_ACCEPTED",
    **{("SharingService.CreateImageMember", r): "NOT_IMAGE_OWNER" for r in ("pending", "accepted")},
    **{
        ("SharingService.DeleteImageMember[accepted's]", r): "NOT_IMAGE_OWNER"
        for r in ("pending", "accepted")
    },
    ("SharingService.GetImageMember[accepted's]", "pending"): "IMAGE_MEMBER_NOT_FOUND",
    ("SharingService.UpdateImageMember[pending's]", "accepted"): "IMAGE_MEMBER_NOT_FOUND",
    ("SharingService.UpdateImageMember[pending's]", "owner"): "ONLY_MEMBER_ANSWERS",
    ("SharingService.ReplicateImage", "pending"): "SHARED_IMAGE_NOT_ACCEPTED",
    ("SharingService.ReplicateImage", "owner"): "NOT_A_SHARED_IMAGE",
    ("ProvisioningService.CreateServers[shared image]", "pending"): "SHARED_IMAGE_NOT_ACCEPTED",
    ("ProvisioningService.InjectNetworkFault", "owner"): "ADMIN_REQUIRED",
}


def not_found_reason(row: Row) -> str:
    return "SERVER_NOT_FOUND" if row.server else "IMAGE_NOT_FOUND"


CELL_WIDTH = max(len(cell) for row in ROWS for cell in row.expected)


def table_row(title: str, cells: tuple[str, ...] | list[str]) -> str:
    return (
        f"{title} | "
        + " | ".join(
            f"{role}={cell:<{CELL_WIDTH}}" for role, cell in zip(IDENTITIES, cells, strict=True)
        )
    ).rstrip()


def test_every_rpc_has_a_row() -> None:
    """A new RPC in a proto without a row here fails this test."""
    assert {rpc_id(m) for m in every_method()} == {row.rpc for row in ROWS}
    assert len({row.title for row in ROWS}) == len(ROWS)
    assert all(len(row.expected) == len(IDENTITIES) for row in ROWS)
    assert len(every_method()) == 25  # 8 + 6 + 11: update the README figures when it changes


# -- checking one row -------------------------------------------------------------------------


def bad_token_metadata(kind: str, scene: Scene) -> Metadata:
    owner = scene.project["owner"]
    secret = scene.service.settings.token_secret
    assert secret == TEST_SECRET
    if kind == "no token":
        return ()
    if kind == "malformed":
        valid = forge_token(secret, owner, admin=True)
        return bearer(valid.rsplit(".", 1)[0])  # header.payload, the signature cut off
    if kind == "expired":
        return bearer(forge_token(secret, owner, admin=True, expires_in=-600))
    if kind == "wrong key":
        return bearer(forge_token(OTHER_SECRET, owner, admin=True))
    raise AssertionError(kind)


def leaks(scene: Scene, role: str, row: Row, cell: Cell) -> list[str]:
    """What the cell's reply tells `role` that it may not know."""
    said = cell.outcome.said()
    if cell.rich is not None:
        said += "\n" + cell.rich.everything()
    found = [
        f"{label} {text!r}"
        for label, text in scene.secrets(role, row).items()
        if text in said and text not in cell.asked
    ]
    if role in ("other", "admin") and re.search(rf"(?<!\d){scene.shared_size}(?!\d)", said):
        found.append(f"the shared image's size {scene.shared_size}")
    return [f"{role}: the reply tells {leak}: {said[:300]!r}" for leak in found]


def _masked(error: RichError, scene: Scene) -> tuple[str, str, str]:
    replacements = {
        scene.shared: "<image>",
        scene.queued: "<queued>",
        scene.public: "<public>",
        scene.server: "<server>",
        scene.project["pending"]: "<pending>",
        scene.project["accepted"]: "<accepted>",
    }
    text = f"{error.message}\n{error.status}"
    for original, mark in replacements.items():
        if original:
            text = text.replace(original, mark)
    return error.code.name, error.reason, text


async def check_identity(row: Row, role: str, expected: str, scene: Scene) -> tuple[str, list[str]]:
    cell = await row.probe(scene, role, scene.md[role])
    problems = [f"{role}: {p}" for p in cell.problems]
    if cell.label != expected:
        detail = f" ({cell.rich.reason}: {cell.rich.message})" if cell.rich else ""
        problems.append(f"{role}: expected {expected}, got {cell.label}{detail}")
        return cell.label, problems
    if cell.rich is not None:
        reason = REASONS.get((row.title, role), not_found_reason(row) if expected == NF else "")
        assert reason, f"no expected reason for {row.title} by {role}"
        if cell.rich.reason != reason:
            problems.append(f"{role}: expected reason {reason}, got {cell.rich.reason}")
    problems += leaks(scene, role, row, cell)
    if cell.rich is not None and expected == NF:
        # The NOT_FOUND of something the caller cannot see is the very
        # NOT_FOUND of something that does not exist.
        ghost = ghost_of(scene, role)
        twin = await row.probe(ghost, role, scene.md[role])
        if twin.rich is None:
            problems.append(f"{role}: the non-existent twin answered {twin.label}")
        elif _masked(cell.rich, scene) != _masked(twin.rich, ghost):
            problems.append(
                f"{role}: NOT_FOUND differs from a non-existent resource's: "
                f"{_masked(cell.rich, scene)} vs {_masked(twin.rich, ghost)}"
            )
    return cell.label, problems


async def check_bad_tokens(row: Row, scene: Scene) -> list[str]:
    problems: list[str] = []
    for kind in BAD_TOKENS:
        cell = await row.probe(scene, "owner", bad_token_metadata(kind, scene))
        problems += [f"{kind}: {p}" for p in cell.problems]
        if cell.label != UNAUTHENTICATED:
            problems.append(f"{kind}: expected UNAUTHENTICATED, got {cell.label}")
            continue
        assert cell.rich is not None
        if cell.rich.reason != BAD_TOKEN_REASONS[kind]:
            problems.append(f"{kind}: expected {BAD_TOKEN_REASONS[kind]}, got {cell.rich.reason}")
        problems += [f"{kind}: {leak}" for leak in leaks(scene, "other", row, cell)]
    return problems


@pytest.mark.parametrize("row", ROWS, ids=[table_row(r.title, r.expected) for r in ROWS])
async def test_token_matrix(row: Row, service: RunningService, channel: grpc.aio.Channel) -> None:
    scenes = await asyncio.gather(*(make_scene(service, channel, row) for _ in IDENTITIES))
    owners_scene = scenes[IDENTITIES.index("owner")]
    # The bad tokens first, on the owner's scene: the owner's own call then
    # succeeding shows they changed nothing.
    problems = await check_bad_tokens(row, owners_scene)
    cells = await asyncio.gather(
        *(
            check_identity(row, role, expected, scene)
            for role, expected, scene in zip(IDENTITIES, row.expected, scenes, strict=True)
        )
    )
    actual = [label for label, _ in cells]
    problems += [problem for _, found in cells for problem in found]
    assert not problems, (
        "\n".join(problems)
        + "\nexpected: "
        + table_row(row.title, row.expected)
        + "\nactual:   "
        + table_row(row.title, actual)
    )
