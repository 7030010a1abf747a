"""Who may do what with a shared image: every SharingService and ImageService
call, by each of six callers, gets exactly the documented status code.

The callers, for one ACTIVE private image:
  owner     the project that created it
  pending   a project it is shared with that has not answered
  accepted  a project that accepted it
  rejected  a project that rejected it
  stranger  any other project
  admin     a platform admin (token with --admin) of a project that is not the owner

The expectations come from sharing.proto / image.proto and the domain rules
(rules.is_visible, rules.require_usable, Sharing._owned): a caller that cannot
see the image gets NOT_FOUND (never PERMISSION_DENIED, so nothing leaks); a
member sees it but may change nothing (PERMISSION_DENIED) and deploys or
copies it only once accepted (FAILED_PRECONDITION SHARED_IMAGE_NOT_ACCEPTED);
only the owner shares and stops sharing; only the member answers; the owner
and admins list every member, a member only itself.

Each test is one row of the matrix; `pytest -v` prints the rows as the test
ids, so the output reads as the table. A failing row shows the expected and
the actual table side by side.
"""

from __future__ import annotations

import asyncio
import random
import re
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import sharing_support as sh

from bms.image.v1 import image_pb2, sharing_pb2
from support.errors import RichError, decode, outcome
from support.matrix_tables import matrix_row
from support.services import ImageStub, SharingStub
from support.tokens import Metadata

pytestmark = pytest.mark.asyncio(loop_scope="module")

service, channel = sh.shared_service_fixtures()

ROLES = ("owner", "pending", "accepted", "rejected", "stranger", "admin")
MEMBER_ROLES = ("pending", "accepted", "rejected")

OK = "OK"
NF = "NOT_FOUND"
PD = "PERMISSION_DENIED"
FP = "FAILED_PRECONDITION"
LISTED, HIDDEN = "OK listed", "OK hidden"  # ListImages: is the image in the default listing
ALL, SELF = "OK all", "OK self"  # ListImageMembers: every member, or only the caller

#                   owner   pending  accepted rejected stranger admin
MATRIX: dict[str, tuple[str, ...]] = {
    "CreateImageMember": (OK, PD, PD, PD, NF, NF),
    "ListImageMembers": (ALL, SELF, SELF, SELF, NF, ALL),
    "GetImageMember": (OK, OK, OK, OK, NF, OK),
    "UpdateImageMember": (PD, OK, OK, OK, NF, NF),
    "DeleteImageMember": (OK, PD, PD, PD, NF, NF),
    "ReplicateImage": (FP, FP, OK, FP, NF, NF),
    "ListImages": (LISTED, HIDDEN, LISTED, HIDDEN, HIDDEN, HIDDEN),
    "GetImage": (OK, OK, OK, OK, NF, NF),
    "UpdateImage": (OK, PD, PD, PD, NF, NF),
    "DeleteImage": (OK, PD, PD, PD, NF, NF),
    "DeprecateImage": (PD, PD, PD, PD, NF, NF),
    "UploadImageData": (FP, PD, PD, PD, NF, NF),
    "DownloadImageData": (OK, FP, OK, FP, NF, NF),
}

NOT_ACCEPTED = "SHARED_IMAGE_NOT_ACCEPTED"
#: The RPCs by which a member would change the image or its members.
OWNER_ONLY = (
    "CreateImageMember",
    "DeleteImageMember",
    "UpdateImage",
    "DeleteImage",
    "UploadImageData",
)
#: The ErrorInfo reason of each failing cell; every NOT_FOUND is IMAGE_NOT_FOUND.
REASONS: dict[tuple[str, str], str] = {
    **{(rpc, r): "NOT_IMAGE_OWNER" for rpc in OWNER_ONLY for r in MEMBER_ROLES},
    **{("DeprecateImage", r): "ADMIN_REQUIRED" for r in ("owner", *MEMBER_ROLES)},
    **{
        (rpc, r): NOT_ACCEPTED
        for rpc in ("ReplicateImage", "DownloadImageData")
        for r in ("pending", "rejected")
    },
    ("UpdateImageMember", "owner"): "ONLY_MEMBER_ANSWERS",
    ("ReplicateImage", "owner"): "NOT_A_SHARED_IMAGE",
    ("UploadImageData", "owner"): "IMAGE_NOT_QUEUED",
}

CELL_WIDTH = max(len(cell) for row in MATRIX.values() for cell in row)
RPC_WIDTH = max(len(rpc) for rpc in MATRIX)


def table_row(rpc: str, cells: Sequence[str]) -> str:
    return matrix_row(rpc, ROLES, cells, CELL_WIDTH, RPC_WIDTH)


async def test_the_matrix_covers_every_rpc_of_both_services() -> None:
    sharing_rpcs = set(sharing_pb2.DESCRIPTOR.services_by_name["SharingService"].methods_by_name)
    image_rpcs = set(image_pb2.DESCRIPTOR.services_by_name["ImageService"].methods_by_name)
    # CreateImage has no image to act on yet: it is how the owner starts.
    assert set(MATRIX) == sharing_rpcs | (image_rpcs - {"CreateImage"})
    assert set(PROBES) == set(MATRIX)
    assert all(len(row) == len(ROLES) for row in MATRIX.values())


# -- one fresh scene per row: an image, its three members, and six callers -----------


@dataclass
class Scene:
    images: ImageStub
    sharing: SharingStub
    image: sh.Uploaded
    display_name: str
    project: dict[str, str]
    md: dict[str, Metadata]

    def member(self, role: str, image_name: str) -> str:
        """The membership a caller acts on: its own for members, else the
        pending/accepted one named by the probe."""
        return sh.member_name(image_name, self.project[role])

    def leaks(self, response: Any, error: RichError | None) -> list[str]:
        """What a reply tells about the image that its caller cannot see."""
        image = self.image.image
        found: list[str] = []
        if error is not None:
            said = error.everything()
            for secret in (self.display_name, image.sha256, image.description):
                if secret in said:
                    found.append(f"{secret!r} in {said[:300]!r}")
            if re.search(rf"\b{image.size_bytes}\b", said):
                found.append(f"the size {image.size_bytes} in {said[:300]!r}")
        for listed in response if isinstance(response, list) else []:
            if isinstance(listed, image_pb2.Image) and (
                listed.name == image.name or listed.display_name == self.display_name
            ):
                found.append(f"the image itself is listed: {listed.name}")
        return found


async def make_scene(images: ImageStub, sharing: SharingStub, projects: sh.Projects) -> Scene:
    project = {role: projects.name(role) for role in ROLES}
    md = {role: projects(role, admin=role == "admin") for role in ROLES}
    display_name = f"secret-golden-{uuid.uuid4().hex[:8]}"
    size = random.randrange(70_001, 90_001, 2)  # a size no other number in a reply has
    uploaded = await sh.create_active(
        images,
        md["owner"],
        size=size,
        display_name=display_name,
        description=f"classified {uuid.uuid4().hex}",
    )
    for role in ("pending", "accepted", "rejected"):
        created = await sh.share(sharing, md["owner"], uploaded.name, project[role])
        assert created.status == sh.PENDING
    await sh.answer(sharing, md["accepted"], uploaded.name, project["accepted"], sh.ACCEPTED)
    await sh.answer(sharing, md["rejected"], uploaded.name, project["rejected"], sh.REJECTED)
    return Scene(images, sharing, uploaded, display_name, project, md)


# -- probes: one call each, reduced to the label the matrix holds ---------------------

Probe = Callable[[Scene, str, str], Awaitable[tuple[str, Any, RichError | None]]]


def labelled(response: Any, error: RichError | None) -> tuple[str, Any, RichError | None]:
    return (error.code.name if error else OK), response, error


async def probe_create_member(scene: Scene, role: str, name: str) -> Any:
    newcomer = f"newcomer-{uuid.uuid4().hex[:8]}"
    response, error = await outcome(sh.share(scene.sharing, scene.md[role], name, newcomer))
    if response is not None:
        assert (response.member_project, response.status) == (newcomer, sh.PENDING)
    return labelled(response, error)


async def probe_list_members(scene: Scene, role: str, name: str) -> Any:
    response, error = await outcome(sh.list_members(scene.sharing, scene.md[role], name))
    if error:
        return error.code.name, None, error
    listed = [m.member_project for m in response]
    everyone = sorted(scene.project[r] for r in MEMBER_ROLES)
    if listed == everyone:
        return ALL, response, None
    if listed == [scene.project[role]]:
        return SELF, response, None
    return f"OK {listed}", response, None


async def probe_get_member(scene: Scene, role: str, name: str) -> Any:
    target = role if role in MEMBER_ROLES else "accepted"
    response, error = await outcome(
        scene.sharing.GetImageMember(
            sharing_pb2.GetImageMemberRequest(name=scene.member(target, name)),
            metadata=scene.md[role],
        )
    )
    if response is not None:
        assert response.member_project == scene.project[target]
    return labelled(response, error)


async def probe_update_member(scene: Scene, role: str, name: str) -> Any:
    # Members answer for themselves (pending accepts, accepted rejects,
    # rejected accepts); the others try to accept for the pending member.
    target = role if role in MEMBER_ROLES else "pending"
    status = sh.REJECTED if role == "accepted" else sh.ACCEPTED
    response, error = await outcome(
        scene.sharing.UpdateImageMember(
            sh.answer_request(scene.member(target, name), status), metadata=scene.md[role]
        )
    )
    if response is not None:
        assert (response.member_project, response.status) == (scene.project[target], status)
    return labelled(response, error)


async def probe_delete_member(scene: Scene, role: str, name: str) -> Any:
    target = role if role in MEMBER_ROLES else "accepted"
    response, error = await outcome(
        scene.sharing.DeleteImageMember(
            sharing_pb2.DeleteImageMemberRequest(name=scene.member(target, name)),
            metadata=scene.md[role],
        )
    )
    return labelled(response, error)


async def probe_replicate(scene: Scene, role: str, name: str) -> Any:
    response, error = await outcome(sh.replicate(scene.sharing, scene.md[role], name))
    if response is not None:
        assert response.owner_project == scene.project[role]
        assert response.type == sh.PRIVATE
        assert response.name != name
    return labelled(response, error)


async def probe_list_images(scene: Scene, role: str, name: str) -> Any:
    response, error = await outcome(sh.list_images(scene.images, scene.md[role]))
    if error:
        return error.code.name, None, error
    found = [image for image in response if image.name == name]
    if not found:
        return HIDDEN, response, None
    assert found[0].type == (sh.PRIVATE if role == "owner" else sh.SHARED)
    return LISTED, response, None


async def probe_get_image(scene: Scene, role: str, name: str) -> Any:
    response, error = await outcome(
        scene.images.GetImage(image_pb2.GetImageRequest(name=name), metadata=scene.md[role])
    )
    if response is not None:
        assert response.type == (sh.PRIVATE if role == "owner" else sh.SHARED)
        assert response.owner_project == scene.project["owner"]
    return labelled(response, error)


async def probe_update_image(scene: Scene, role: str, name: str) -> Any:
    request = image_pb2.UpdateImageRequest(
        image=image_pb2.Image(name=name, description=f"changed by {role}"),
        update_mask=sh.mask("description"),
    )
    response, error = await outcome(scene.images.UpdateImage(request, metadata=scene.md[role]))
    return labelled(response, error)


async def probe_delete_image(scene: Scene, role: str, name: str) -> Any:
    response, error = await outcome(
        scene.images.DeleteImage(image_pb2.DeleteImageRequest(name=name), metadata=scene.md[role])
    )
    return labelled(response, error)


async def probe_deprecate(scene: Scene, role: str, name: str) -> Any:
    response, error = await outcome(
        scene.images.DeprecateImage(
            image_pb2.DeprecateImageRequest(name=name), metadata=scene.md[role]
        )
    )
    return labelled(response, error)


async def probe_upload(scene: Scene, role: str, name: str) -> Any:
    requests = iter(sh.upload_requests(name, b"\x01" * 4096))
    response, error = await outcome(scene.images.UploadImageData(requests, metadata=scene.md[role]))
    return labelled(response, error)


async def probe_download(scene: Scene, role: str, name: str) -> Any:
    try:
        data, _, _ = await sh.download(scene.images, scene.md[role], name)
    except grpc.aio.AioRpcError as error:
        rich = decode(error)
        return rich.code.name, None, rich
    assert data == scene.image.data
    return OK, data, None


PROBES: dict[str, Probe] = {
    "CreateImageMember": probe_create_member,
    "ListImageMembers": probe_list_members,
    "GetImageMember": probe_get_member,
    "UpdateImageMember": probe_update_member,
    "DeleteImageMember": probe_delete_member,
    "ReplicateImage": probe_replicate,
    "ListImages": probe_list_images,
    "GetImage": probe_get_image,
    "UpdateImage": probe_update_image,
    "DeleteImage": probe_delete_image,
    "DeprecateImage": probe_deprecate,
    "UploadImageData": probe_upload,
    "DownloadImageData": probe_download,
}


def _without_id(error: RichError, image_id: str) -> tuple[str, str, str, str]:
    """What an error says, the image's id masked out."""
    hidden = "<id>"
    return (
        error.code.name,
        error.reason,
        error.message.replace(image_id, hidden),
        str(error.status).replace(image_id, hidden),
    )


async def check_cell(
    rpc: str,
    role: str,
    expected: str,
    images: ImageStub,
    sharing: SharingStub,
    projects: sh.Projects,
) -> tuple[str, list[str]]:
    """One cell on a scene of its own (the successful calls change the image
    or its members): the label the call got, and what is wrong with it."""
    probe = PROBES[rpc]
    scene = await make_scene(images, sharing, projects)
    label, response, error = await probe(scene, role, scene.image.name)
    if label != expected:
        detail = f": {error.reason}: {error.message}" if error else ""
        return label, [f"{role}: expected {expected}, got {label}{detail}"]
    problems: list[str] = []
    if error is not None:
        reason = REASONS.get((rpc, role), "IMAGE_NOT_FOUND" if label == NF else "")
        assert reason, f"no expected reason for {rpc} by {role}"
        if error.reason != reason:
            problems.append(f"{role}: expected reason {reason}, got {error.reason}")
        if reason == NOT_ACCEPTED:
            if "accept it first" not in error.message:
                problems.append(f"{role}: message does not say 'accept it first': {error.message}")
            violations = error.precondition_failure.violations if error.precondition_failure else []
            if [(v.type, v.subject) for v in violations] != [("MEMBER_STATUS", scene.image.name)]:
                problems.append(f"{role}: no MEMBER_STATUS PreconditionFailure: {violations}")
    if role == "stranger" or label in (NF, HIDDEN):
        # Nothing the caller may not see leaks, in a reply or an error...
        problems += [f"{role}: the reply leaks {leak}" for leak in scene.leaks(response, error)]
    if error is not None and label == NF:
        # ...and the error is the very one a non-existent image gets.
        ghost_id = str(uuid.uuid4())
        _, _, ghost = await probe(scene, role, f"images/{ghost_id}")
        assert ghost is not None, f"{rpc} by {role} of a non-existent image succeeded"
        image_id = scene.image.name.removeprefix("images/")
        if _without_id(error, image_id) != _without_id(ghost, ghost_id):
            problems.append(
                f"{role}: NOT_FOUND differs from a non-existent image's: "
                f"{error.message!r} vs {ghost.message!r}"
            )
    return label, problems


@pytest.mark.parametrize("rpc", list(MATRIX), ids=[table_row(r, c) for r, c in MATRIX.items()])
async def test_access_matrix(
    rpc: str, images: ImageStub, sharing: SharingStub, projects: sh.Projects
) -> None:
    cells = await asyncio.gather(
        *(
            check_cell(rpc, role, expected, images, sharing, projects)
            for role, expected in zip(ROLES, MATRIX[rpc], strict=True)
        )
    )
    actual = [label for label, _ in cells]
    problems = [problem for _, found in cells for problem in found]
    assert not problems, (
        "\n".join(problems)
        + "\nexpected: "
        + table_row(rpc, MATRIX[rpc])
        + "\nactual:   "
        + table_row(rpc, actual)
    )
