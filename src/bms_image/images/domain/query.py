"""The ListImages filter: a small AIP-160 subset, `field op value` terms joined
by `AND`, parsed into a typed ImageQuery that images/adapters/filters.py
turns into SQL."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from bms_image.common.errors import FieldViolation, InvalidArgument
from bms_image.common.model import (
    Architecture,
    ImageStatus,
    ImageType,
    MemberStatus,
    OsType,
    Visibility,
)

MAX_FILTER_LENGTH = 1024
#: Conditions of one filter: every field twice (`!=` ranges) fits, and the
#: SQL a filter becomes stays small.
MAX_FILTER_CONDITIONS = 32

# Every alternative of _TOKEN consumes what only it can match (a quote opens
# a quoted string, `=` and `!` start an operator, anything else is a word), so
# no match backtracks: reading a filter is linear in its (bounded) length.

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<quoted>"(?:[^"\\]|\\.)*")
      | (?P<op>!=|=)
      | (?P<word>[^\s"=!]+)
    )""",
    re.VERBOSE,
)


@dataclass(frozen=True)
class ListedImage:
    """An image as a listing names it: enough to tell how the caller sees it
    and whether it was rendered before (every change bumps the revision)."""

    id: str
    revision: int
    seq: int
    visibility: Visibility
    owner_project: str | None


@dataclass(frozen=True)
class Condition:
    field: str
    negate: bool
    value: str


@dataclass
class ImageQuery:
    """Typed conditions, every one of which an image must satisfy."""

    conditions: list[Condition] = field(default_factory=list)
    #: Set by a `flavor` condition: (flavor name, its hardware model).
    flavor: tuple[str, str] | None = None

    def values(self, name: str) -> list[Condition]:
        return [c for c in self.conditions if c.field == name]

    @property
    def asks_deprecated(self) -> bool:
        return any(c.field == "deprecated" for c in self.conditions)

    def member_statuses(self) -> set[MemberStatus] | None:
        """The answers of the caller that `member_status` conditions select;
        None without such conditions (then only accepted shared images are
        listed, beside public and own ones)."""
        conditions = self.values("member_status")
        if not conditions:
            return None
        allowed = set(MemberStatus)
        for condition in conditions:
            status = MemberStatus(condition.value)
            allowed = allowed - {status} if condition.negate else allowed & {status}
        return allowed


_ENUM_FIELDS: dict[str, set[str]] = {
    "type": {t.value for t in ImageType},
    "os_type": {t.value for t in OsType},
    "architecture": {a.value for a in Architecture},
    "status": {s.value for s in ImageStatus if s is not ImageStatus.DELETED},
    "protected": {"true", "false"},
    "deprecated": {"true", "false"},
    "member_status": {m.value for m in MemberStatus},
}
_FREE_FIELDS = {"os_distro", "os_version", "name", "tag", "owner_project", "flavor"}
FILTER_FIELDS = sorted(set(_ENUM_FIELDS) | _FREE_FIELDS)


def _bad(description: str) -> InvalidArgument:
    return InvalidArgument(
        "INVALID_FILTER", f"filter: {description}", [FieldViolation("filter", description)]
    )


def _tokens(text: str) -> list[str]:
    tokens: list[str] = []
    position = 0
    while position < len(text):
        if text[position:].strip() == "":
            break
        match = _TOKEN.match(text, position)
        if match is None or match.end() == position:
            raise _bad(f"cannot read the filter at character {position + 1}")
        quoted = match.group("quoted")
        if quoted is not None:
            tokens.append("\x00" + re.sub(r"\\(.)", r"\1", quoted[1:-1]))
        else:
            tokens.append(match.group("op") or match.group("word"))
        position = match.end()
    return tokens


def parse_filter(text: str) -> list[Condition]:
    """Parses `a = b AND c != "d e"`; raises InvalidArgument saying what to fix."""
    if len(text) > MAX_FILTER_LENGTH:
        raise _bad(f"is {len(text)} characters; at most {MAX_FILTER_LENGTH} are allowed")
    if "\x00" in text:
        raise _bad("must not contain NUL characters")
    tokens = _tokens(text)
    conditions: list[Condition] = []
    index = 0
    while index < len(tokens):
        if conditions:
            if tokens[index] != "AND":
                raise _bad(
                    f"expected AND between conditions, found {tokens[index].lstrip(chr(0))!r}"
                )
            index += 1
        term = tokens[index : index + 3]
        if len(term) < 3 or term[1] not in ("=", "!="):
            raise _bad("each condition must be `field = value` or `field != value`")
        name, op, raw_value = term
        if name.startswith("\x00") or name not in FILTER_FIELDS:
            raise _bad(
                f"unknown field {name.lstrip(chr(0))!r}; use one of {', '.join(FILTER_FIELDS)}"
            )
        value = raw_value[1:] if raw_value.startswith("\x00") else raw_value
        allowed = _ENUM_FIELDS.get(name)
        if allowed is not None:
            value = value.lower()
            if value not in allowed:
                raise _bad(f"{name} must be one of {', '.join(sorted(allowed))}, not {value!r}")
        if name == "flavor" and value.startswith("flavors/"):
            value = value.removeprefix("flavors/")
        if name == "flavor" and op == "!=":
            raise _bad("flavor supports only `=`")
        conditions.append(Condition(name, op == "!=", value))
        if len(conditions) > MAX_FILTER_CONDITIONS:
            raise _bad(f"has more than {MAX_FILTER_CONDITIONS} conditions")
        index += 3
    if len([c for c in conditions if c.field == "flavor"]) > 1:
        raise _bad("give at most one flavor condition")
    return conditions
