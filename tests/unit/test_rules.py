"""domain.rules: visibility, ownership, etags, the state machine, the quota
statuses and the field validators."""

from __future__ import annotations

import pytest
from unit_fakes import ADMIN, ALPHA, BETA, make_image

from bms_image.common.errors import (
    Aborted,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from bms_image.common.model import (
    PROJECT_PATTERN,
    Caller,
    ImageStatus,
    ImageType,
    MemberStatus,
    Visibility,
)
from bms_image.images.domain import rules

ALPHA_ADMIN = Caller("alpha", frozenset({"admin"}))

PUBLIC = make_image(visibility=Visibility.PUBLIC, owner_project=None, hardware_model="")
PRIVATE = make_image()  # owned by alpha
S = ImageStatus


def fields(violations: list[FieldViolation]) -> list[str]:
    """The violated fields, without the `image.` of request paths."""
    return [v.field.removeprefix("image.") for v in violations]


# --- callers ---------------------------------------------------------------


def test_admin_role_makes_admin() -> None:
    assert ADMIN.is_admin
    assert not ALPHA.is_admin
    assert not Caller("alpha", frozenset({"administrator", "Admin"})).is_admin


# --- visibility ------------------------------------------------------------


@pytest.mark.parametrize("caller", [ALPHA, BETA, ADMIN])
def test_public_image_is_visible_to_every_project(caller: Caller) -> None:
    assert rules.is_visible(caller, PUBLIC)
    assert rules.require_visible(caller, PUBLIC, PUBLIC.id) is PUBLIC


def test_private_image_is_visible_to_its_owner_only() -> None:
    assert rules.is_visible(ALPHA, PRIVATE)
    assert not rules.is_visible(BETA, PRIVATE)
    assert not rules.is_visible(ADMIN, PRIVATE), "admin of another project sees no private image"


@pytest.mark.parametrize("membership", list(MemberStatus))
def test_private_image_is_visible_to_a_member_whatever_its_answer(
    membership: MemberStatus,
) -> None:
    assert rules.is_visible(BETA, PRIVATE, membership)
    assert rules.require_visible(BETA, PRIVATE, PRIVATE.id, membership) is PRIVATE


@pytest.mark.parametrize("visibility", list(Visibility))
@pytest.mark.parametrize("caller", [ALPHA, BETA, ADMIN])
def test_deleted_image_is_visible_to_nobody(visibility: Visibility, caller: Caller) -> None:
    image = make_image(visibility=visibility, status=ImageStatus.DELETED)
    assert not rules.is_visible(caller, image)
    assert not rules.is_visible(caller, image, MemberStatus.ACCEPTED)
    with pytest.raises(NotFound) as caught:
        rules.require_visible(caller, image, image.id)
    assert caught.value.reason == "IMAGE_NOT_FOUND"


def test_require_visible_hides_missing_and_foreign_images_alike() -> None:
    for image in (None, PRIVATE):
        with pytest.raises(NotFound) as caught:
            rules.require_visible(BETA, image, PRIVATE.id)
        assert caught.value.reason == "IMAGE_NOT_FOUND"
        assert PRIVATE.id in caught.value.message


def test_image_type_for() -> None:
    assert rules.image_type_for(ALPHA, PUBLIC) is ImageType.PUBLIC
    assert rules.image_type_for(ADMIN, PUBLIC) is ImageType.PUBLIC
    assert rules.image_type_for(ALPHA, PRIVATE) is ImageType.PRIVATE
    assert rules.image_type_for(BETA, PRIVATE) is ImageType.SHARED


# --- who may change what ---------------------------------------------------


def test_owner_may_modify_its_private_image() -> None:
    rules.require_can_modify(ALPHA, PRIVATE)
    rules.require_can_modify(ALPHA_ADMIN, PRIVATE)


@pytest.mark.parametrize("caller", [BETA, ADMIN])
def test_other_project_may_not_modify_a_private_image(caller: Caller) -> None:
    with pytest.raises(PermissionDenied) as caught:
        rules.require_can_modify(caller, PRIVATE)
    assert caught.value.reason == "NOT_IMAGE_OWNER"


@pytest.mark.parametrize("caller", [ALPHA, BETA])
def test_only_admin_may_modify_a_public_image(caller: Caller) -> None:
    with pytest.raises(PermissionDenied) as caught:
        rules.require_can_modify(caller, PUBLIC)
    assert caught.value.reason == "PUBLIC_IMAGE_READ_ONLY"
    rules.require_can_modify(ADMIN, PUBLIC)


def test_require_etag() -> None:
    image = make_image(revision=3)
    assert image.etag == '"3"'
    rules.require_etag(image, "")  # no etag: unconditional
    rules.require_etag(image, '"3"')
    for stale in ('"2"', '"4"', "3", "*"):
        with pytest.raises(Aborted) as caught:
            rules.require_etag(image, stale)
        assert caught.value.reason == "ETAG_MISMATCH"


def test_require_deletable() -> None:
    rules.require_deletable(make_image(protected=False))
    with pytest.raises(FailedPrecondition) as caught:
        rules.require_deletable(make_image(protected=True))
    assert caught.value.reason == "IMAGE_PROTECTED"
    assert [v.type for v in caught.value.violations] == ["PROTECTED"]


# --- state machine ---------------------------------------------------------

#: The state machine as documented on ImageStatus in image.proto. (Its
#: "QUEUED|SAVING -> QUEUED" line is read as: an interrupted upload leaves a
#: QUEUED image QUEUED, which is no transition.)
DOCUMENTED = {
    S.QUEUED: {S.SAVING, S.DELETED},
    S.SAVING: {S.ACTIVE, S.KILLED, S.QUEUED, S.DELETED},
    S.ACTIVE: {S.DEACTIVATED, S.DELETED},
    S.DEACTIVATED: {S.ACTIVE, S.DELETED},
    S.KILLED: {S.DELETED},
    S.DELETED: set(),
}


def test_transitions_are_exactly_the_documented_ones() -> None:
    assert set(rules.ALLOWED_TRANSITIONS) == set(ImageStatus)
    for current in ImageStatus:
        for target in ImageStatus:
            expected = target in DOCUMENTED[current]
            assert rules.can_transition(current, target) is expected, (current, target)


@pytest.mark.parametrize(
    ("current", "target"),
    [
        (S.QUEUED, S.ACTIVE),  # data must be uploaded first
        (S.QUEUED, S.KILLED),
        (S.KILLED, S.ACTIVE),
        (S.ACTIVE, S.QUEUED),
        (S.DEACTIVATED, S.SAVING),
        (S.DELETED, S.ACTIVE),
        (S.DELETED, S.QUEUED),
        (S.DELETED, S.DELETED),
    ],
)
def test_require_transition_refuses(current: ImageStatus, target: ImageStatus) -> None:
    with pytest.raises(FailedPrecondition) as caught:
        rules.require_transition(make_image(status=current), target)
    assert caught.value.reason == "IMAGE_STATUS_CONFLICT"
    assert caught.value.violations and caught.value.violations[0].type == "STATUS"


def test_deleted_is_terminal_and_reachable_from_every_other_status() -> None:
    assert rules.ALLOWED_TRANSITIONS[S.DELETED] == frozenset()
    for current in set(ImageStatus) - {S.DELETED}:
        rules.require_transition(make_image(status=current), S.DELETED)


def test_quota_counts_live_images_and_frees_killed_and_deleted() -> None:
    assert rules.QUOTA_COUNTED_STATUSES == {S.QUEUED, S.SAVING, S.ACTIVE, S.DEACTIVATED}
    assert S.KILLED not in rules.QUOTA_COUNTED_STATUSES
    assert S.DELETED not in rules.QUOTA_COUNTED_STATUSES


# --- validators ------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "x" * 128, "CentOS 7.6 64bit", "Ünïcode 名前", " padded "])
def test_display_name_valid(name: str) -> None:
    assert rules.validate_display_name(name) == []


@pytest.mark.parametrize(
    ("name", "word"),
    [
        ("", "required"),
        ("   ", "required"),
        ("x" * 129, "129 characters"),
        ("x" * 1000, "1000 characters"),
    ],
)
def test_display_name_invalid(name: str, word: str) -> None:
    violations = rules.validate_display_name(name, "image.display_name")
    assert [v.field for v in violations] == ["image.display_name"]
    assert word in violations[0].description


@pytest.mark.parametrize("char", ["\x00", "\x01", "\t", "\n", "\r", "\x1b", "\x1f", "\x7f"])
def test_display_name_refuses_ascii_control_characters(char: str) -> None:
    violations = rules.validate_display_name(f"bad{char}name")
    assert fields(violations) == ["display_name"]
    assert "control" in violations[0].description


@pytest.mark.parametrize("char", ["\x85", "\x9b"])
def test_display_name_refuses_c1_control_characters(char: str) -> None:
    # U+0080..U+009F are control characters too (Unicode category Cc); U+009B
    # is the 8-bit CSI that starts terminal escape sequences.
    violations = rules.validate_display_name(f"bad{char}name")
    assert fields(violations) == ["display_name"]


def test_description_limit() -> None:
    assert rules.validate_description("") == []
    assert rules.validate_description("d" * 1024) == []
    assert fields(rules.validate_description("d" * 1025)) == ["description"]


def test_tags_valid() -> None:
    assert rules.validate_tags([]) == []
    assert rules.validate_tags([f"t{i}" for i in range(10)]) == []
    assert rules.validate_tags(["a", "A.b_c-d:e", "9", "x" * 64]) == []


def test_tags_at_most_ten() -> None:
    violations = rules.validate_tags([f"t{i}" for i in range(11)])
    assert fields(violations) == ["tags"]
    assert "11" in violations[0].description


@pytest.mark.parametrize("tag", ["", "x" * 65, "with space", "slash/y", "quote'", "ümlaut"])
def test_tag_pattern(tag: str) -> None:
    assert fields(rules.validate_tags(["ok", tag])) == ["tags[1]"]


def test_tag_with_trailing_newline_is_refused() -> None:
    # `$` also matches before a final "\n", so TAG_PATTERN.match("a\n") succeeds.
    assert fields(rules.validate_tags(["ok", "a\n"])) == ["tags[1]"]


def test_duplicate_tags() -> None:
    violations = rules.validate_tags(["a", "b", "a"])
    assert fields(violations) == ["tags"]
    assert "repeat" in violations[0].description
    assert rules.validate_tags(["a", "A"]) == [], "tags are case-sensitive"


def test_tags_report_every_problem() -> None:
    tags = ["bad tag", *(["dup"] * 10)]
    assert sorted(fields(rules.validate_tags(tags))) == ["tags", "tags", "tags[0]"]


@pytest.mark.parametrize(
    ("value", "ok"), [(-1, False), (0, False), (1, True), (40, True), (1024, True), (1025, False)]
)
def test_min_disk_gb_bounds(value: int, ok: bool) -> None:
    violations = rules.validate_min_disk_gb(value)
    assert (violations == []) is ok
    if not ok:
        assert fields(violations) == ["min_disk_gb"]


@pytest.mark.parametrize(
    ("pattern", "good", "bad"),
    [
        (
            rules.OS_WORD_PATTERN,
            ["centos", "7.6", "windows-server", "12sp3"],
            ["", "CentOS", "-x", "a b", "x" * 33],
        ),
        (PROJECT_PATTERN, ["alpha", "p-1", "a_b", "ab"], ["a", "Alpha", "-ab", "x" * 65]),
    ],
    ids=["os_word", "project"],
)
def test_word_patterns(pattern: object, good: list[str], bad: list[str]) -> None:
    for value in good:
        assert rules.validate_word("f", value, pattern, "hint") == [], value  # type: ignore[arg-type]
    for value in bad:
        assert fields(rules.validate_word("f", value, pattern, "hint")) == ["f"], value  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("pattern", "value"),
    [
        (rules.OS_WORD_PATTERN, "centos\n"),
        (PROJECT_PATTERN, "alpha\n"),
    ],
    ids=["os_word", "project"],
)
def test_word_patterns_refuse_trailing_newline(pattern: object, value: str) -> None:
    violations = rules.validate_word("f", value, pattern, "hint")  # type: ignore[arg-type]
    assert fields(violations) == ["f"]


def test_raise_if_invalid() -> None:
    rules.raise_if_invalid([])
    violations = [FieldViolation("a", "is bad"), FieldViolation("b", "is worse")]
    with pytest.raises(InvalidArgument) as caught:
        rules.raise_if_invalid(violations, reason="CUSTOM")
    assert caught.value.reason == "CUSTOM"
    assert caught.value.violations == violations
    assert "a is bad" in caught.value.message and "b is worse" in caught.value.message


def test_require_usable() -> None:
    for caller, image in ((ALPHA, PUBLIC), (BETA, PUBLIC), (ALPHA, PRIVATE)):
        rules.require_usable(caller, image, None)
    rules.require_usable(BETA, PRIVATE, MemberStatus.ACCEPTED)
    for membership in (None, MemberStatus.PENDING, MemberStatus.REJECTED):
        with pytest.raises(FailedPrecondition) as caught:
            rules.require_usable(BETA, PRIVATE, membership)
        assert caught.value.reason == "SHARED_IMAGE_NOT_ACCEPTED"


# --- who writes a capture image's bytes ----------------------------------------


def test_only_the_provisioner_writes_a_capture_image() -> None:
    capture = make_image(source_server="servers/s1")
    for caller in (ALPHA, ALPHA_ADMIN, Caller("alpha", service="image-service")):
        with pytest.raises(FailedPrecondition) as caught:
            rules.require_bytes_writer(caller, capture)
        assert caught.value.reason == "IMAGE_BYTES_FROM_CAPTURE"
        assert "servers/s1" in caught.value.message
    rules.require_bytes_writer(Caller("alpha", service="provisioner"), capture)
    rules.require_bytes_writer(ALPHA, PRIVATE)  # an ordinary image takes the owner's bytes
