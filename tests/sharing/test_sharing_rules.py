"""The rules of sharing: what can be shared and with whom, idempotent
shares, changing one's answer, how shared images are listed for the
recipient, and that they do not count against the recipient's quota."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
import sharing_support as sh

from bms.image.v1 import image_pb2, sharing_pb2
from support.errors import Code, expect_error, expect_invalid
from support.services import ImageStub, SharingStub, make_settings, serving
from support.tokens import Metadata

pytestmark = pytest.mark.asyncio(loop_scope="module")

service, channel = sh.shared_service_fixtures()


@dataclass
class Offer:
    """alpha's ACTIVE image, to be shared with beta."""

    sharing: SharingStub
    owner: Metadata  # alpha's call metadata
    member: Metadata  # beta's
    image: sh.Uploaded
    beta: str  # beta's project name

    async def share(self) -> sharing_pb2.ImageMember:
        return await sh.share(self.sharing, self.owner, self.image.name, self.beta)

    async def answer(self, status: int) -> sharing_pb2.ImageMember:
        return await sh.answer(self.sharing, self.member, self.image.name, self.beta, status)


@pytest_asyncio.fixture(loop_scope="module")
async def offer(images: ImageStub, sharing: SharingStub, projects: sh.Projects) -> Offer:
    owner = projects("alpha")
    image = await sh.create_active(images, owner)
    return Offer(sharing, owner, projects("beta"), image, projects.name("beta"))


# -- what can be shared ----------------------------------------------------------


@pytest.mark.parametrize("admin", [False, True], ids=["project", "admin"])
async def test_a_public_image_cannot_be_shared(
    images: ImageStub, sharing: SharingStub, projects: sh.Projects, admin: bool
) -> None:
    caller = projects("alpha", admin=admin)
    public = await sh.list_images(images, caller, "type = public")
    assert public, "the seeded catalog has public images"

    rich = await expect_error(
        sh.share(sharing, caller, public[0].name, projects.name("beta")),
        Code.FAILED_PRECONDITION,
        "PUBLIC_IMAGE_NOT_SHAREABLE",
    )

    assert rich.precondition_failure is not None
    assert [v.subject for v in rich.precondition_failure.violations] == [public[0].name]


@pytest.mark.parametrize("state", ["queued", "killed"])
async def test_an_image_that_is_not_active_cannot_be_shared(
    images: ImageStub, sharing: SharingStub, projects: sh.Projects, state: str
) -> None:
    owner = projects("alpha")
    image = await sh.create_queued(images, owner)
    if state == "killed":  # an upload whose declared size is wrong kills the image
        requests = [
            image_pb2.UploadImageDataRequest(
                metadata=image_pb2.UploadImageDataMetadata(name=image.name, size_bytes=10)
            ),
            image_pb2.UploadImageDataRequest(chunk=b"\x01" * 9),
        ]
        await expect_error(
            images.UploadImageData(iter(requests), metadata=owner), Code.INVALID_ARGUMENT
        )

    rich = await expect_error(
        sh.share(sharing, owner, image.name, projects.name("beta")),
        Code.FAILED_PRECONDITION,
        "IMAGE_NOT_ACTIVE",
    )

    assert rich.precondition_failure is not None
    assert rich.precondition_failure.violations[0].type == "STATUS"
    assert await sh.list_members(sharing, owner, image.name) == []


@pytest.mark.parametrize(
    "answered", [sh.PENDING, sh.ACCEPTED, sh.REJECTED], ids=["pending", "accepted", "rejected"]
)
async def test_an_image_shared_with_you_cannot_be_shared_on(
    images: ImageStub, sharing: SharingStub, projects: sh.Projects, answered: int
) -> None:
    """The service rule: a member that sees the image gets PERMISSION_DENIED
    and is told to replicate it instead."""
    owner, member = projects("alpha"), projects("beta")
    image = await sh.create_active(images, owner)
    await sh.share(sharing, owner, image.name, projects.name("beta"))
    if answered != sh.PENDING:
        await sh.answer(sharing, member, image.name, projects.name("beta"), answered)

    rich = await expect_error(
        sh.share(sharing, member, image.name, projects.name("gamma")),
        Code.PERMISSION_DENIED,
        "NOT_IMAGE_OWNER",
    )

    assert "replicate" in rich.message
    assert [m.member_project for m in await sh.list_members(sharing, owner, image.name)] == [
        projects.name("beta")
    ]


async def test_a_replica_of_a_shared_image_can_be_shared_on(
    images: ImageStub, sharing: SharingStub, projects: sh.Projects
) -> None:
    owner, member, third = projects("alpha"), projects("beta"), projects("gamma")
    image = await sh.create_active(images, owner)
    await sh.share(sharing, owner, image.name, projects.name("beta"))
    await sh.answer(sharing, member, image.name, projects.name("beta"), sh.ACCEPTED)
    copy = await sh.replicate(sharing, member, image.name)

    shared_on = await sh.share(sharing, member, copy.name, projects.name("gamma"))
    await sh.answer(sharing, third, copy.name, projects.name("gamma"), sh.ACCEPTED)

    assert shared_on.image == copy.name
    seen = await images.GetImage(image_pb2.GetImageRequest(name=copy.name), metadata=third)
    assert (seen.type, seen.owner_project) == (sh.SHARED, projects.name("beta"))
    data, _, _ = await sh.download(images, third, copy.name)
    assert data == image.data


@pytest.mark.parametrize(
    "project",
    ["<own>", "Bad Project", "", "x", "a" * 100, "-leading-dash", "UPPER", "images/x"],
    ids=[
        "own-project",
        "space-and-upper",
        "empty",
        "one-char",
        "100-chars",
        "dash",
        "upper",
        "slash",
    ],
)
async def test_sharing_with_the_owner_or_a_malformed_project_is_invalid(
    images: ImageStub, sharing: SharingStub, projects: sh.Projects, project: str
) -> None:
    owner = projects("alpha")
    image = await sh.create_active(images, owner)
    target = projects.name("alpha") if project == "<own>" else project

    rich = await expect_invalid(
        sh.share(sharing, owner, image.name, target), "member.member_project"
    )

    assert "a" * 100 not in rich.message, "a long id is not echoed whole"
    assert await sh.list_members(sharing, owner, image.name) == []


async def test_a_64_character_project_id_is_valid(
    images: ImageStub, sharing: SharingStub, projects: sh.Projects
) -> None:
    owner = projects("alpha")
    image = await sh.create_active(images, owner)
    longest = "p" + "0123456789abcdef" * 3 + "x" * 15
    assert len(longest) == 64

    member = await sh.share(sharing, owner, image.name, longest)

    assert member.member_project == longest
    assert member.name == sh.member_name(image.name, longest)


async def test_sharing_twice_returns_the_same_member(sharing: SharingStub, offer: Offer) -> None:
    image, beta = offer.image, offer.beta

    first = await offer.share()
    again = await offer.share()

    assert again == first
    assert first.name == sh.member_name(image.name, beta)
    assert (first.image, first.member_project, first.status) == (image.name, beta, sh.PENDING)
    assert await sh.list_members(sharing, offer.owner, image.name) == [first]

    accepted = await offer.answer(sh.ACCEPTED)
    unchanged = await offer.share()

    assert unchanged == accepted, "sharing again leaves an answered member as it is"
    assert unchanged.status == sh.ACCEPTED
    assert await sh.list_members(sharing, offer.owner, image.name) == [accepted]


# -- answers ---------------------------------------------------------------------


async def test_a_member_changes_its_answer_both_ways(
    images: ImageStub, sharing: SharingStub, offer: Offer
) -> None:
    pending = await offer.share()

    previous = pending
    for status in (sh.REJECTED, sh.ACCEPTED, sh.REJECTED, sh.ACCEPTED):
        changed = await offer.answer(status)
        assert changed.status == status
        assert changed.create_time == pending.create_time
        assert changed.update_time.ToDatetime() >= previous.update_time.ToDatetime()
        got = await sharing.GetImageMember(
            sharing_pb2.GetImageMemberRequest(name=changed.name), metadata=offer.owner
        )
        assert got == changed, "the owner sees the member's answer"
        error = await sh.download_error(images, offer.member, offer.image.name)
        if status == sh.ACCEPTED:
            assert error is None
        else:
            assert error is not None and error.reason == "SHARED_IMAGE_NOT_ACCEPTED"
        previous = changed


async def test_an_answer_must_be_accepted_or_rejected_and_name_only_status(
    sharing: SharingStub, offer: Offer
) -> None:
    member = offer.member
    await offer.share()
    name = sh.member_name(offer.image.name, offer.beta)

    for status in (sh.PENDING, sharing_pb2.MEMBER_STATUS_UNSPECIFIED):
        await expect_invalid(
            sharing.UpdateImageMember(sh.answer_request(name, status), metadata=member),
            "member.status",
        )
    for paths in ([], ["status", "member_project"], ["member_project"]):
        request = sharing_pb2.UpdateImageMemberRequest(
            member=sharing_pb2.ImageMember(name=name, status=sh.ACCEPTED),
            update_mask=sh.mask(*paths),
        )
        await expect_invalid(sharing.UpdateImageMember(request, metadata=member), "update_mask")

    got = await sharing.GetImageMember(
        sharing_pb2.GetImageMemberRequest(name=name), metadata=member
    )
    assert got.status == sh.PENDING, "no failed answer changed anything"


async def test_a_member_sees_only_its_own_membership(
    images: ImageStub, sharing: SharingStub, projects: sh.Projects
) -> None:
    owner, beta, gamma = projects("alpha"), projects("beta"), projects("gamma")
    image = await sh.create_active(images, owner)
    for project in ("gamma", "beta", "delta"):
        await sh.share(sharing, owner, image.name, projects.name(project))

    everyone = sorted(projects.name(p) for p in ("beta", "gamma", "delta"))
    assert [m.member_project for m in await sh.list_members(sharing, owner, image.name)] == everyone
    paged = await sh.list_members(sharing, owner, image.name, page_size=1)
    assert [m.member_project for m in paged] == everyone, "pages follow the project order"
    assert [m.member_project for m in await sh.list_members(sharing, beta, image.name)] == [
        projects.name("beta")
    ]
    await expect_error(
        sharing.GetImageMember(
            sharing_pb2.GetImageMemberRequest(
                name=sh.member_name(image.name, projects.name("gamma"))
            ),
            metadata=beta,
        ),
        Code.NOT_FOUND,
        "IMAGE_MEMBER_NOT_FOUND",
    )
    await expect_error(
        sh.answer(sharing, beta, image.name, projects.name("gamma"), sh.ACCEPTED),
        Code.NOT_FOUND,
        "IMAGE_MEMBER_NOT_FOUND",
    )
    got = await sharing.GetImageMember(
        sharing_pb2.GetImageMemberRequest(name=sh.member_name(image.name, projects.name("gamma"))),
        metadata=gamma,
    )
    assert got.status == sh.PENDING, "beta's attempt left gamma's answer alone"


async def test_stopping_to_share_with_a_non_member_is_not_found(
    images: ImageStub, sharing: SharingStub, projects: sh.Projects
) -> None:
    owner = projects("alpha")
    image = await sh.create_active(images, owner)

    await expect_error(
        sh.unshare(sharing, owner, image.name, projects.name("beta")),
        Code.NOT_FOUND,
        "IMAGE_MEMBER_NOT_FOUND",
    )


# -- the recipient's listings ------------------------------------------------------


async def test_the_recipient_lists_shared_images_by_its_answer(
    images: ImageStub, sharing: SharingStub, projects: sh.Projects
) -> None:
    owner, member = projects("alpha"), projects("beta")
    beta = projects.name("beta")
    shared: dict[str, str] = {}
    for state in ("pending", "accepted", "rejected"):
        image = await sh.create_active(images, owner, display_name=f"shared-{state}")
        await sh.share(sharing, owner, image.name, beta)
        shared[state] = image.name
    await sh.answer(sharing, member, shared["accepted"], beta, sh.ACCEPTED)
    await sh.answer(sharing, member, shared["rejected"], beta, sh.REJECTED)
    own = await sh.create_queued(images, member, display_name="beta-own")
    ours = set(shared.values()) | {own.name}

    async def listed(filter_text: str = "") -> list[str]:
        return [n for n in await sh.names_listed(images, member, filter_text) if n in ours]

    assert await listed() == [shared["accepted"], own.name]
    assert await listed("type = shared") == [shared["accepted"]]
    assert await listed("type = private") == [own.name]
    assert await listed("member_status = accepted") == [shared["accepted"]]
    assert await listed("member_status = pending") == [shared["pending"]]
    assert await listed("member_status = rejected") == [shared["rejected"]]
    assert await listed("type = shared AND member_status = pending") == [shared["pending"]]
    assert await listed("member_status != accepted") == [shared["pending"], shared["rejected"]]
    assert await listed("flavor = physical.s4.large") == [shared["accepted"], own.name]
    assert await listed(f"owner_project = {projects.name('alpha')}") == [shared["accepted"]]

    accepted = [i for i in await sh.list_images(images, member, "type = shared")]
    assert [i.name for i in accepted] == [shared["accepted"]]
    assert accepted[0].type == sh.SHARED
    assert accepted[0].owner_project == projects.name("alpha")
    assert accepted[0].status == sh.ACTIVE
    assert accepted[0].display_name == "shared-accepted"
    assert accepted[0].supported_flavors == ["flavors/physical.s4.large"]
    for image in await sh.list_images(images, member, "member_status = pending"):
        assert (image.type, image.owner_project) == (sh.SHARED, projects.name("alpha"))

    # The owner's listing is unaffected by its members' answers.
    owned = await sh.names_listed(images, owner, "type = private")
    assert set(shared.values()) <= set(owned)
    assert own.name not in owned
    for image in await sh.list_images(images, owner, "type = private"):
        assert image.type == sh.PRIVATE


async def test_a_shared_image_counts_against_nobody_but_its_owner(tmp_path: Path) -> None:
    """Quota 2: a recipient with 2 own images still accepts shares and sees
    them, but cannot replicate one (RESOURCE_EXHAUSTED + QuotaFailure) until
    it frees a slot."""
    async with serving(make_settings(tmp_path, private_image_quota=2)) as service:
        images, sharing, projects = service.images, service.sharing, service.projects
        owner, member = projects("alpha"), projects("beta")
        beta = projects.name("beta")
        originals = [await sh.create_active(images, owner, display_name=f"os-{i}") for i in (1, 2)]
        own = [await sh.create_queued(images, member, display_name=f"mine-{i}") for i in (1, 2)]
        await expect_error(
            sh.create_queued(images, member), Code.RESOURCE_EXHAUSTED, "IMAGE_QUOTA_EXCEEDED"
        )

        for original in originals:
            await sh.share(sharing, owner, original.name, beta)
            accepted = await sh.answer(sharing, member, original.name, beta, sh.ACCEPTED)
            assert accepted.status == sh.ACCEPTED
        listed = await sh.names_listed(images, member, "type = shared")
        assert listed == [o.name for o in originals]

        rich = await expect_error(
            sh.replicate(sharing, member, originals[0].name),
            Code.RESOURCE_EXHAUSTED,
            "IMAGE_QUOTA_EXCEEDED",
        )
        assert rich.quota_failure is not None
        assert [v.subject for v in rich.quota_failure.violations] == [f"projects/{beta}"]
        assert await sh.names_listed(images, member, "type = private") == [i.name for i in own]

        # The owner's slots are its own two originals: the shares took none of beta's.
        await images.DeleteImage(image_pb2.DeleteImageRequest(name=own[0].name), metadata=member)
        copy = await sh.replicate(sharing, member, originals[0].name)
        assert (copy.owner_project, copy.status, copy.type) == (beta, sh.ACTIVE, sh.PRIVATE)
        await expect_error(
            sh.replicate(sharing, member, originals[1].name),
            Code.RESOURCE_EXHAUSTED,
            "IMAGE_QUOTA_EXCEEDED",
        )
