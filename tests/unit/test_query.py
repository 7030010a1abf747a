"""domain.query.parse_filter: the ListImages filter language."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from bms_image.common.errors import InvalidArgument
from bms_image.common.model import MemberStatus
from bms_image.images.domain.query import (
    _ENUM_FIELDS,
    FILTER_FIELDS,
    MAX_FILTER_LENGTH,
    Condition,
    ImageQuery,
    parse_filter,
)

C = Condition

# Fast, deterministic and file-free: no example database under the repository.
PROPERTY = settings(
    max_examples=100,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


def refused(text: str, says: str = "") -> InvalidArgument:
    """parse_filter refuses `text` INVALID_FILTER, with a message that says `says`."""
    with pytest.raises(InvalidArgument) as caught:
        parse_filter(text)
    error = caught.value
    assert error.reason == "INVALID_FILTER"
    assert [v.field for v in error.violations] == ["filter"]
    assert error.violations[0].description
    assert says in error.message, error.message
    return error


# --- valid filters -----------------------------------------------------------


@pytest.mark.parametrize("text", ["", "   ", "\t\n "])
def test_empty_filter_has_no_conditions(text: str) -> None:
    assert parse_filter(text) == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("type = public", [C("type", False, "public")]),
        ("type=public", [C("type", False, "public")]),
        ("  type   =   public  ", [C("type", False, "public")]),
        ("type = PUBLIC", [C("type", False, "public")]),
        ('type = "Private"', [C("type", False, "private")]),
        ("status != active", [C("status", True, "active")]),
        ("os_distro!=centos", [C("os_distro", True, "centos")]),
        ("deprecated = TRUE", [C("deprecated", False, "true")]),
        ("protected = false", [C("protected", False, "false")]),
        ("architecture = aarch64", [C("architecture", False, "aarch64")]),
        ("os_type = windows", [C("os_type", False, "windows")]),
        ("name = Rocky*", [C("name", False, "Rocky*")]),
        ('name = "CentOS 7.6 64bit"', [C("name", False, "CentOS 7.6 64bit")]),
        ("name = CentOS", [C("name", False, "CentOS")]),  # free values keep their case
        ('name = "say \\"hi\\""', [C("name", False, 'say "hi"')]),
        ('name = "back\\\\slash"', [C("name", False, "back\\slash")]),
        ('name = "a\\xb"', [C("name", False, "axb")]),  # any escaped char stands for itself
        ('name = ""', [C("name", False, "")]),
        ('name = "="', [C("name", False, "=")]),
        ('name = "AND"', [C("name", False, "AND")]),
        ("tag = a:b", [C("tag", False, "a:b")]),
        ("owner_project = alpha", [C("owner_project", False, "alpha")]),
        ("flavor = physical.s4.large", [C("flavor", False, "physical.s4.large")]),
        ("flavor = flavors/physical.s4.large", [C("flavor", False, "physical.s4.large")]),
        ('flavor = "flavors/physical.s4.large"', [C("flavor", False, "physical.s4.large")]),
        (
            "type = public AND flavor = physical.s4.large AND os_type = linux",
            [
                C("type", False, "public"),
                C("flavor", False, "physical.s4.large"),
                C("os_type", False, "linux"),
            ],
        ),
        (
            'os_distro != centos AND name = "x y" AND tag = lts AND tag != beta',
            [
                C("os_distro", True, "centos"),
                C("name", False, "x y"),
                C("tag", False, "lts"),
                C("tag", True, "beta"),
            ],
        ),
    ],
)
def test_valid_filters(text: str, expected: list[Condition]) -> None:
    assert parse_filter(text) == expected


def test_image_query_helpers() -> None:
    query = ImageQuery(parse_filter("tag = a AND tag = b AND name = x"))
    assert [c.value for c in query.values("tag")] == ["a", "b"]
    assert query.values("os_type") == []
    assert not query.asks_deprecated
    assert ImageQuery(parse_filter("deprecated = false")).asks_deprecated


def test_filter_of_max_length_is_accepted_and_one_more_refused() -> None:
    prefix = 'name = "'
    fits = prefix + "x" * (MAX_FILTER_LENGTH - len(prefix) - 1) + '"'
    assert len(fits) == MAX_FILTER_LENGTH
    assert parse_filter(fits)[0].value == "x" * (MAX_FILTER_LENGTH - len(prefix) - 1)
    too_long = fits[:-1] + 'x"'
    refused(too_long, says="1025")


# --- refused filters ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("colour = red", "unknown field"),
        ("Type = public", "unknown field"),  # field names are case-sensitive
        ('"type" = public', "unknown field"),  # a quoted word is a value, never a field
        ("display_name = x", "unknown field"),
        ("type = everything", "type must be one of"),
        ("type = publik", "type must be one of"),
        ("status = deleted", "status must be one of"),  # deleted images are never listed
        ("protected = yes", "protected must be one of"),
        ("architecture = x86", "architecture must be one of"),
        ("type = public os_type = linux", "expected AND"),
        ("type = public and os_type = linux", "expected AND"),  # AND is upper case
        ("type = public OR type = private", "expected AND"),
        ('type = public "AND" os_type = linux', "expected AND"),
        ("type = public AND", "each condition"),
        ("type = public AND AND os_type = linux", "each condition"),
        ("AND type = public", "each condition"),
        ("type = public AND os_type", "each condition"),
        ("type = public AND os_type =", "each condition"),
        ("type =", "each condition"),
        ("type", "each condition"),
        ("= public", "each condition"),
        ("type public", "each condition"),
        ("name ~ x", "each condition"),
        ("name < x", "each condition"),
        ('name "=" x', "each condition"),
        ('name = "unterminated', "cannot read"),
        ('name = "ends with escape\\"', "cannot read"),
        ("name = a!b", "cannot read"),
        ("name ! = x", "cannot read"),
        ("flavor != physical.s4.large", "only `=`"),
        ("flavor != flavors/physical.s4.large", "only `=`"),
        ("flavor = a AND flavor = b", "at most one flavor"),
        ("flavor = a AND type = public AND flavor = a", "at most one flavor"),
    ],
)
def test_refused_filters(text: str, hint: str) -> None:
    refused(text, says=hint)


def test_unknown_field_error_lists_the_fields() -> None:
    message = refused("colour = red").message
    for name in FILTER_FIELDS:
        assert name in message


# --- injection-looking input ---------------------------------------------------

INJECTIONS_AS_VALUES = [
    ("name = \"x' OR '1'='1\"", "x' OR '1'='1"),
    ('name = "\'; DROP TABLE images; --"', "'; DROP TABLE images; --"),
    ('name = "a\\" OR 1=1 --"', 'a" OR 1=1 --'),
    ("tag = %", "%"),
    ("name = _*", "_*"),
    ('name = "%\' --"', "%' --"),
    ("owner_project = beta'--", "beta'--"),
    ('os_distro = "centos) OR (1=1"', "centos) OR (1=1"),
]


@pytest.mark.parametrize(("text", "value"), INJECTIONS_AS_VALUES)
def test_injection_strings_are_plain_values(text: str, value: str) -> None:
    [condition] = parse_filter(text)
    assert condition.value == value
    assert condition.negate is False


@pytest.mark.parametrize(
    "text",
    [
        "name = x'; DROP TABLE images; --",
        "name = 1 OR 1 = 1",
        "owner_project = alpha OR owner_project = beta",
        "type = public; DELETE FROM images",
        "type = 'public' --",
        "1 = 1",
        "type = public UNION SELECT * FROM images",
        "name = a\x00 AND type = public OR 1=1",
    ],
)
def test_injection_strings_are_refused_cleanly(text: str) -> None:
    refused(text)


# --- properties --------------------------------------------------------------

WORDS = [
    "type", "name", "flavor", "status", "tag", "deprecated", "owner_project",
    "=", "!=", "!", "==", "AND", "and", "OR", "public", "private", "deleted",
    '"', '\\', '"x y"', '"a\\"b"', "x*", "flavors/x", "'", ";", "--", "(", ")",
    "\x00", "\n", "\t", " ", "%", "ü",
]  # fmt: skip


def parses_or_refuses(text: str) -> None:
    try:
        conditions = parse_filter(text)
    except InvalidArgument as error:
        assert error.reason == "INVALID_FILTER"
        assert [v.field for v in error.violations] == ["filter"]
        return
    assert isinstance(conditions, list)
    for condition in conditions:
        assert isinstance(condition, Condition)
        assert condition.field in FILTER_FIELDS
        allowed = _ENUM_FIELDS.get(condition.field)
        if allowed is not None:
            assert condition.value in allowed
        if condition.field == "flavor":
            assert not condition.negate
    assert len([c for c in conditions if c.field == "flavor"]) <= 1


@PROPERTY
@given(st.text(max_size=200))
def test_any_text_parses_or_is_refused(text: str) -> None:
    parses_or_refuses(text)


@PROPERTY
@given(st.lists(st.sampled_from(WORDS), max_size=20).map(" ".join))
def test_filter_like_text_parses_or_is_refused(text: str) -> None:
    parses_or_refuses(text)


@PROPERTY
@given(st.lists(st.sampled_from(WORDS), max_size=20).map("".join))
def test_glued_filter_like_text_parses_or_is_refused(text: str) -> None:
    parses_or_refuses(text)


@pytest.mark.parametrize(
    "text",
    [
        "x" * (MAX_FILTER_LENGTH + 1),
        " " * (MAX_FILTER_LENGTH + 1),
        "type = public AND " * 60,
        '"' * 5000,
    ],
)
def test_too_long_text_is_always_refused(text: str) -> None:
    assert len(text) > MAX_FILTER_LENGTH
    refused(text, says="at most")


BARE_CHARS = "abcXYZ019._:*/-"


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@st.composite
def conditions_and_text(draw: st.DrawFn) -> tuple[list[Condition], str]:
    """Conditions and a filter that spells them (quoted or bare, any spacing)."""
    count = draw(st.integers(min_value=1, max_value=5))
    conditions: list[Condition] = []
    terms: list[str] = []
    used_flavor = False
    for _ in range(count):
        fields = [f for f in FILTER_FIELDS if not (f == "flavor" and used_flavor)]
        name = draw(st.sampled_from(fields))
        used_flavor = used_flavor or name == "flavor"
        negate = name != "flavor" and draw(st.booleans())
        allowed = _ENUM_FIELDS.get(name)
        if allowed is not None:
            value = draw(st.sampled_from(sorted(allowed)))
            spelled = draw(st.sampled_from([value, value.upper(), value.capitalize()]))
        else:
            value = draw(st.text(max_size=12))
            spelled = value
        if allowed is not None or draw(st.booleans()):
            written = _quote(spelled)
        else:
            bare = draw(st.text(alphabet=BARE_CHARS, min_size=1, max_size=12))
            value = spelled = written = bare
        if name == "flavor" and value.startswith("flavors/"):
            value = value.removeprefix("flavors/")
        space = draw(st.sampled_from(["", " ", "  ", "\t"]))
        terms.append(f"{name}{space}{'!=' if negate else '='}{space}{written}")
        conditions.append(Condition(name, negate, value))
    return conditions, "  AND  ".join(terms)


@PROPERTY
@given(conditions_and_text())
def test_written_conditions_parse_back(case: tuple[list[Condition], str]) -> None:
    conditions, text = case
    assume(len(text) <= MAX_FILTER_LENGTH)
    assert parse_filter(text) == conditions


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", None),
        ("type = shared", None),
        ("member_status = pending", {MemberStatus.PENDING}),
        ("member_status = ACCEPTED", {MemberStatus.ACCEPTED}),
        ("member_status != rejected", {MemberStatus.PENDING, MemberStatus.ACCEPTED}),
        ("member_status != rejected AND member_status != pending", {MemberStatus.ACCEPTED}),
        ("member_status = pending AND member_status = accepted", set()),
    ],
)
def test_member_statuses(text: str, expected: set[MemberStatus] | None) -> None:
    assert ImageQuery(parse_filter(text)).member_statuses() == expected


def test_member_status_values_are_checked() -> None:
    refused("member_status = maybe", says="member_status must be one of")
