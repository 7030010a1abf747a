"""Use cases of SharingService: share, answer, stop sharing, replicate."""

from __future__ import annotations

import logging
import uuid
from dataclasses import replace
from datetime import UTC, datetime

from bms_image.common.errors import (
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    PreconditionViolation,
    QuotaExceeded,
    Unavailable,
    invalid_field,
)
from bms_image.common.model import (
    PROJECT_PATTERN,
    Caller,
    Image,
    ImageStatus,
    Member,
    MemberStatus,
    RequestMethod,
    Visibility,
)
from bms_image.common.paging import PageTokens, page_size_or_default
from bms_image.images.domain import rules
from bms_image.images.domain.images import ImageCatalog, replayed
from bms_image.images.domain.ports import BlobStore, ImageRepository, MemberRepository

log = logging.getLogger(__name__)

DEFAULT_MAX_MEMBERS = 256


def _member_not_found(image_id: str, project: str) -> NotFound:
    return NotFound("IMAGE_MEMBER_NOT_FOUND", f"images/{image_id}/members/{project} not found")


class Sharing:
    def __init__(
        self,
        catalog: ImageCatalog,
        images: ImageRepository,
        members: MemberRepository,
        blobs: BlobStore,
        page_tokens: PageTokens,
        max_members: int = DEFAULT_MAX_MEMBERS,
    ) -> None:
        self._catalog = catalog
        self._images = images
        self._members = members
        self._blobs = blobs
        self._tokens = page_tokens
        self._max_members = max_members

    async def _owned(self, caller: Caller, image_id: str, doing: str) -> Image:
        """The image if the caller owns it: NOT_FOUND when it cannot see it,
        PERMISSION_DENIED when it can (a member) but is not the owner."""
        image = await self._catalog.get(caller, image_id)
        if image.visibility is Visibility.PUBLIC:
            raise FailedPrecondition(
                "PUBLIC_IMAGE_NOT_SHAREABLE",
                f"images/{image_id} is public: every project sees it already",
                [PreconditionViolation("VISIBILITY", f"images/{image_id}", "public")],
            )
        if not rules.is_owner(caller, image):
            raise PermissionDenied(
                "NOT_IMAGE_OWNER",
                f"only the owner of images/{image_id} may {doing}; an image shared with you "
                "cannot be shared on: replicate it into your project first",
            )
        return image

    async def share(self, caller: Caller, image_id: str, project: str) -> Member:
        if not PROJECT_PATTERN.match(project):
            raise invalid_field(
                "member.member_project",
                f"{project[:80]!r} is not a project id (2-64 lower-case letters, digits, - or _)",
            )
        image = await self._owned(caller, image_id, "share it")
        if project == caller.project:
            raise invalid_field("member.member_project", "an image cannot be shared with its owner")
        if image.status is not ImageStatus.ACTIVE:
            raise FailedPrecondition(
                "IMAGE_NOT_ACTIVE",
                f"images/{image_id} is {image.status.value}; only active images can be shared",
                [PreconditionViolation("STATUS", f"images/{image_id}", image.status.value)],
            )
        return await self._members.add(image_id, project, self._max_members)

    async def unshare(self, caller: Caller, image_id: str, project: str) -> None:
        await self._owned(caller, image_id, "stop sharing it")
        if not await self._members.remove(image_id, project):
            raise _member_not_found(image_id, project)

    async def _readable(self, caller: Caller, image_id: str) -> tuple[Image, str | None]:
        """The image, and the one project whose membership the caller may see
        (None: all of them, for the owner and admins)."""
        if caller.is_admin:
            image = await self._images.get(image_id)
            if image is None or image.status is ImageStatus.DELETED:
                raise NotFound("IMAGE_NOT_FOUND", f"image images/{image_id} not found")
            return image, None
        image = await self._catalog.get(caller, image_id)
        return image, None if rules.is_owner(caller, image) else caller.project

    async def list(
        self, caller: Caller, image_id: str, page_size: int, page_token: str
    ) -> tuple[list[Member], str]:
        limit = page_size_or_default(page_size)
        _, only = await self._readable(caller, image_id)
        scope = f"members\n{caller.project}\n{image_id}"
        after = self._tokens.decode_text(page_token, scope)
        members = await self._members.list(image_id, after, limit + 1, only)
        page = members[:limit]
        more = len(members) > limit
        return page, self._tokens.encode_text(page[-1].project, scope) if more else ""

    async def get(self, caller: Caller, image_id: str, project: str) -> Member:
        _, only = await self._readable(caller, image_id)
        member = await self._members.get(image_id, project)
        if member is None or (only is not None and only != project):
            raise _member_not_found(image_id, project)
        return member

    async def answer(
        self, caller: Caller, image_id: str, project: str, status: MemberStatus | None
    ) -> Member:
        if status not in (MemberStatus.ACCEPTED, MemberStatus.REJECTED):
            raise invalid_field("member.status", "must be MEMBER_STATUS_ACCEPTED or _REJECTED")
        image = await self._catalog.get(caller, image_id)
        if project != caller.project:
            if rules.is_owner(caller, image):
                raise PermissionDenied(
                    "ONLY_MEMBER_ANSWERS",
                    f"only project {project} may accept or reject images/{image_id}",
                )
            raise _member_not_found(image_id, project)
        member = await self._members.set_status(image_id, project, status)
        if member is None:
            raise _member_not_found(image_id, project)
        return member

    async def replicate(
        self, caller: Caller, image_id: str, display_name: str = "", request_id: str = ""
    ) -> Image:
        """A copy of an image shared with the caller, in its own project. A
        retry with the same request_id returns the first call's replica (or
        REQUEST_ID_CONSUMED once it is killed or deleted), never an image a
        CreateImage made with that id."""
        if request_id:
            rules.require_request_id(request_id)
            earlier = await self._images.find_by_request_id(
                caller.project, RequestMethod.REPLICATE, request_id
            )
            if earlier is not None:
                return replayed(earlier)
        source, membership = await self._catalog.get_with_membership(caller, image_id)
        if source.visibility is Visibility.PUBLIC or rules.is_owner(caller, source):
            raise FailedPrecondition(
                "NOT_A_SHARED_IMAGE",
                f"images/{image_id} is not shared with you; only shared images are replicated",
            )
        rules.require_usable(caller, source, membership)
        if source.status is not ImageStatus.ACTIVE:
            raise FailedPrecondition(
                "IMAGE_NOT_ACTIVE", f"images/{image_id} is {source.status.value}, not active"
            )
        name = display_name or source.display_name
        rules.raise_if_invalid(rules.validate_display_name(name, "display_name"))
        now = datetime.now(UTC)
        draft = replace(
            source,
            id=str(uuid.uuid4()),
            display_name=name,
            owner_project=caller.project,
            creator_project=caller.project,
            request_id=request_id or None,
            request_method=RequestMethod.REPLICATE,
            status=ImageStatus.SAVING,
            status_reason=rules.replicating_reason(image_id),
            protected=False,
            source_server="",
            revision=1,
            seq=0,
            create_time=now,
            update_time=now,
        )
        created = await self._images.create_private(draft, self._catalog.private_image_quota)
        if created.id != draft.id:  # a concurrent retry with the same request_id won
            return replayed(created)
        try:
            await self._blobs.copy(source.id, created.id)
        except Exception as error:
            # What the store said (endpoints, paths) is for the log only.
            log.warning("copying images/%s to images/%s failed: %r", image_id, created.id, error)
            await self._images.transition(
                created.id,
                {ImageStatus.SAVING},
                {
                    "status": ImageStatus.KILLED,
                    "status_reason": "copying the bytes failed; replicate the image again",
                },
            )
            if isinstance(error, (Unavailable, QuotaExceeded)):
                raise  # retryable: UNAVAILABLE or RESOURCE_EXHAUSTED, not a precondition
            raise FailedPrecondition(
                "REPLICATION_FAILED", f"the bytes of images/{image_id} could not be copied"
            ) from error
        replica = await self._images.transition(
            created.id, {ImageStatus.SAVING}, {"status": ImageStatus.ACTIVE, "status_reason": ""}
        )
        if replica is None:
            raise NotFound("IMAGE_NOT_FOUND", f"images/{created.id} was deleted while copied")
        return replica
