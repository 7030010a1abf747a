"""The rules of the catalog: who sees and changes what, valid values, the
image state machine and what counts against the private-image quota."""

from __future__ import annotations

import re
import unicodedata
import uuid

from bms_image.common.errors import (
    Aborted,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    PreconditionViolation,
    QuotaExceeded,
    QuotaViolation,
)
from bms_image.common.model import (
    PROVISIONER_IDENTITY,
    Caller,
    Image,
    ImageStatus,
    ImageType,
    MemberStatus,
    Visibility,
)
from bms_image.images.domain.query import ListedImage

DISPLAY_NAME_MAX = 128
DESCRIPTION_MAX = 1024
MAX_TAGS = 10
TAG_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,64}\Z")
MIN_DISK_GB_RANGE = range(1, 1025)
OS_WORD_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,31}\Z")

#: Statuses whose private images hold a quota slot. Killed and deleted images free theirs.
QUOTA_COUNTED_STATUSES = frozenset(
    {ImageStatus.QUEUED, ImageStatus.SAVING, ImageStatus.ACTIVE, ImageStatus.DEACTIVATED}
)


def image_quota_exceeded(project: str, used: int, quota_limit: int) -> QuotaExceeded:
    """A private image refused: the project already holds `used` counted
    images of its `quota_limit` (the repository counts them atomically with the insert)."""
    return QuotaExceeded(
        "IMAGE_QUOTA_EXCEEDED",
        f"project {project} already has {used} of its {quota_limit} private images; "
        "delete one to make room",
        [QuotaViolation(f"projects/{project}", f"private images: limit {quota_limit}")],
        {"limit": str(quota_limit), "used": str(used)},
    )


def member_quota_exceeded(image_id: str, count: int, limit: int) -> QuotaExceeded:
    """A share refused: the image already has `count` members, its `limit`."""
    return QuotaExceeded(
        "IMAGE_MEMBER_QUOTA_EXCEEDED",
        f"images/{image_id} is already shared with {count} projects, the limit; "
        "stop sharing with one first",
        [QuotaViolation(f"images/{image_id}", f"members per image: limit {limit}")],
        {"limit": str(limit)},
    )


#: The image state machine: status -> statuses it may move to.
ALLOWED_TRANSITIONS: dict[ImageStatus, frozenset[ImageStatus]] = {
    ImageStatus.QUEUED: frozenset({ImageStatus.SAVING, ImageStatus.DELETED}),
    ImageStatus.SAVING: frozenset(
        {ImageStatus.ACTIVE, ImageStatus.KILLED, ImageStatus.QUEUED, ImageStatus.DELETED}
    ),
    ImageStatus.ACTIVE: frozenset({ImageStatus.DEACTIVATED, ImageStatus.DELETED}),
    ImageStatus.DEACTIVATED: frozenset({ImageStatus.ACTIVE, ImageStatus.DELETED}),
    ImageStatus.KILLED: frozenset({ImageStatus.DELETED}),
    ImageStatus.DELETED: frozenset(),
}


#: The status_reason of a replica whose bytes are being copied: it names the
#: source, and tells recovery after a crash that no client will resume it.
REPLICATING = "replicating images/"


def replicating_reason(source_id: str) -> str:
    return REPLICATING + source_id


def bytes_come_from_a_client(image: Image) -> bool:
    """Whether an unfinished image waits for a client that can resume its
    upload; captures and replicas are written by the service itself, so
    when their writer is cut off nothing will ever finish them."""
    return not image.source_server and not image.status_reason.startswith(REPLICATING)


def require_bytes_writer(caller: Caller, image: Image) -> None:
    """A capture image's bytes are its server's disk, and only the
    provisioner sends them (with its service identity, for the owner): an
    owner's own upload would make an image that claims to be a server's
    disk, and its plug-ins, out of anything."""
    if image.source_server and caller.service != PROVISIONER_IDENTITY:
        raise FailedPrecondition(
            "IMAGE_BYTES_FROM_CAPTURE",
            f"images/{image.id} is the capture of {image.source_server}: its bytes come from "
            "the server's disk, sent by the provisioner, never from an upload; upload into an "
            "image created without source_server",
            [PreconditionViolation("SOURCE", f"images/{image.id}", image.source_server)],
        )


def can_transition(current: ImageStatus, target: ImageStatus) -> bool:
    return target in ALLOWED_TRANSITIONS[current]


def require_transition(image: Image, target: ImageStatus) -> None:
    if not can_transition(image.status, target):
        raise FailedPrecondition(
            "IMAGE_STATUS_CONFLICT",
            f"image {image.id} is {image.status.value} and cannot become {target.value}",
            [PreconditionViolation("STATUS", f"images/{image.id}", f"status is {image.status}")],
        )


def is_visible(caller: Caller, image: Image, membership: MemberStatus | None = None) -> bool:
    """Public images, the caller's own, and images shared with it, whatever its
    answer (a pending member must see what it is asked to accept). Deleted
    images are visible to nobody."""
    if image.status is ImageStatus.DELETED:
        return False
    if image.visibility is Visibility.PUBLIC:
        return True
    return image.owner_project == caller.project or membership is not None


def is_owner(caller: Caller, image: Image) -> bool:
    return image.visibility is Visibility.PRIVATE and image.owner_project == caller.project


def require_usable(caller: Caller, image: Image, membership: MemberStatus | None) -> None:
    """Deploying or copying a shared image needs the member to have accepted it."""
    if image.visibility is Visibility.PUBLIC or is_owner(caller, image):
        return
    if membership is not MemberStatus.ACCEPTED:
        state = membership.value if membership else "not shared"
        raise FailedPrecondition(
            "SHARED_IMAGE_NOT_ACCEPTED",
            f"images/{image.id} was shared with project {caller.project} and is {state}; "
            "accept it first (UpdateImageMember status ACCEPTED)",
            [PreconditionViolation("MEMBER_STATUS", f"images/{image.id}", state)],
        )


def image_type_for(caller: Caller, image: Image | ListedImage) -> ImageType:
    if image.visibility is Visibility.PUBLIC:
        return ImageType.PUBLIC
    if image.owner_project == caller.project:
        return ImageType.PRIVATE
    return ImageType.SHARED


def require_visible(
    caller: Caller, image: Image | None, image_id: str, membership: MemberStatus | None = None
) -> Image:
    if image is None or not is_visible(caller, image, membership):
        raise NotFound("IMAGE_NOT_FOUND", f"image images/{image_id} not found")
    return image


def require_can_modify(caller: Caller, image: Image) -> None:
    """Owners change private images; only admins change public ones."""
    if image.visibility is Visibility.PUBLIC:
        if not caller.is_admin:
            raise PermissionDenied(
                "PUBLIC_IMAGE_READ_ONLY",
                f"images/{image.id} is a public image; only a platform admin may change it",
            )
    elif image.owner_project != caller.project:
        raise PermissionDenied(
            "NOT_IMAGE_OWNER",
            f"images/{image.id} belongs to another project; only its owner may change it",
        )


def require_etag(image: Image, etag: str) -> None:
    if etag and etag != image.etag:
        raise Aborted(
            "ETAG_MISMATCH",
            f"images/{image.id} changed since it was read (etag {etag}, now {image.etag}); "
            "read it again and retry",
        )


def require_deletable(image: Image) -> None:
    if image.protected:
        raise FailedPrecondition(
            "IMAGE_PROTECTED",
            f"images/{image.id} is protected; clear `protected` with UpdateImage first",
            [PreconditionViolation("PROTECTED", f"images/{image.id}", "image is protected")],
        )


def validate_display_name(value: str, field: str = "display_name") -> list[FieldViolation]:
    if not value or not value.strip():
        return [FieldViolation(field, "is required (1 to 128 characters)")]
    if len(value) > DISPLAY_NAME_MAX:
        return [FieldViolation(field, f"is {len(value)} characters; at most 128 are allowed")]
    if any(unicodedata.category(ch) == "Cc" for ch in value):
        return [FieldViolation(field, "must not contain control characters")]
    return []


def validate_description(value: str, field: str = "image.description") -> list[FieldViolation]:
    if len(value) > DESCRIPTION_MAX:
        return [FieldViolation(field, f"is {len(value)} characters; at most 1024")]
    if "\x00" in value:
        return [FieldViolation(field, "must not contain NUL characters")]
    return []


def validate_tags(tags: list[str], field: str = "image.tags") -> list[FieldViolation]:
    violations: list[FieldViolation] = []
    if len(tags) > MAX_TAGS:
        violations.append(FieldViolation(field, f"has {len(tags)} tags; at most 10 are allowed"))
    for index, tag in enumerate(tags):
        if not TAG_PATTERN.match(tag):
            violations.append(
                FieldViolation(
                    f"{field}[{index}]",
                    "must be 1 to 64 characters of letters, digits, '.', '_', '-' and ':'",
                )
            )
    if len(set(tags)) != len(tags):
        violations.append(FieldViolation(field, "must not repeat a tag"))
    return violations


def validate_min_disk_gb(value: int, field: str = "image.min_disk_gb") -> list[FieldViolation]:
    if value not in MIN_DISK_GB_RANGE:
        return [FieldViolation(field, f"is {value}; must be between 1 and 1024")]
    return []


def validate_word(
    field: str, value: str, pattern: re.Pattern[str], hint: str
) -> list[FieldViolation]:
    if not pattern.match(value):
        return [FieldViolation(field, f"{value!r} is not valid: {hint}")]
    return []


def require_request_id(request_id: str) -> None:
    """Idempotency keys are UUIDs in canonical form, so one key has one spelling."""
    try:
        canonical = str(uuid.UUID(request_id))
    except ValueError:
        canonical = ""
    if canonical != request_id:
        raise InvalidArgument(
            "INVALID_REQUEST_ID",
            "request_id must be a UUID in canonical lower-case form, e.g. from `uuidgen`",
            [FieldViolation("request_id", "must be a canonical UUID")],
        )


def raise_if_invalid(violations: list[FieldViolation], reason: str = "INVALID_IMAGE") -> None:
    if violations:
        summary = "; ".join(f"{v.field} {v.description}" for v in violations)
        raise InvalidArgument(reason, f"invalid request: {summary}", violations)
