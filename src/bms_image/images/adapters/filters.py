"""The filter compiler: a ListImages query (the caller, its parsed ImageQuery
and a page position) as one SQL statement over the images tables.

What a caller sees is the union of three sets, each walked in seq order by
an index of its own: public images (visibility, seq), the caller's own
(owner_project, seq) and the images shared with it (its member rows). The
statement takes at most a page from each, in seq order, and merges them, so
a page costs about the same at 1,000 images stored as at 100,000, and as
much on the last page as on the first (a single OR over the three would walk
every image in seq order until a page is found).

Statements are built once per shape of query (which fields, and the values
that change the SQL: types, member statuses, booleans) and bound at
execution: building one costs more than running it. The statement selects
only what a page needs to name its images (id, revision, seq) and to say
how the caller sees each (visibility, owner): the rest is read only for
images not rendered before (see SqlImageRepository.list_visible)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BindParameter,
    ColumnElement,
    CompoundSelect,
    Select,
    and_,
    bindparam,
    exists,
    false,
    func,
    not_,
    or_,
    select,
    true,
    union_all,
)

from bms_image.common.model import Caller, ImageStatus, MemberStatus, Visibility
from bms_image.images.adapters.rows import FLAVORS, IMAGES, MEMBERS, TAGS
from bms_image.images.domain.query import Condition, ImageQuery

#: The columns a listing returns, in this order (see ListedRow).
LISTED_COLUMNS = ("id", "revision", "seq", "visibility", "owner_project")
#: Fields whose value changes the statement itself rather than a bound value.
_SHAPING_FIELDS = frozenset({"type", "member_status", "protected", "deprecated"})


@dataclass(frozen=True)
class _Shape:
    """What a statement depends on besides its bound values."""

    conditions: tuple[tuple[str, bool, str | None], ...]
    member_statuses: frozenset[MemberStatus] | None
    asks_deprecated: bool


def listing(
    caller: Caller, query: ImageQuery, after_seq: int, limit: int
) -> tuple[CompoundSelect[Any] | Select[Any], dict[str, Any]]:
    """The statement listing the images the caller sees that match the query,
    after `after_seq`, in seq order, at most `limit` of them (the columns of
    LISTED_COLUMNS), and its bound values."""
    member_statuses = query.member_statuses()
    shape = _Shape(
        tuple((c.field, c.negate, _shaping_value(c)) for c in query.conditions),
        frozenset(member_statuses) if member_statuses is not None else None,
        query.asks_deprecated,
    )
    values: dict[str, Any] = {"project": caller.project, "after_seq": after_seq, "limit": limit}
    for index, condition in enumerate(query.conditions):
        if condition.field == "name" and condition.value.endswith("*"):
            prefix = condition.value[:-1]
            values[f"v{index}"], values[f"v{index}_length"] = prefix, len(prefix)
        elif condition.field not in _SHAPING_FIELDS:
            values[f"v{index}"] = condition.value
    if query.flavor is not None:
        values["flavor_name"], values["flavor_model"] = query.flavor
    return _statement(shape), values


def _shaping_value(condition: Condition) -> str | None:
    if condition.field in _SHAPING_FIELDS:
        return condition.value
    if condition.field == "name":
        return "prefix" if condition.value.endswith("*") else "exact"
    return None


class _Arm:
    """One of the three sets a caller sees."""

    PUBLIC = "public"
    OWN = "own"
    SHARED = "shared"


@functools.lru_cache(maxsize=512)
def _statement(shape: _Shape) -> CompoundSelect[Any] | Select[Any]:
    arms = _arms(shape)
    selects = [_arm_select(arm, shape) for arm in arms]
    if len(selects) == 1:
        return selects[0]
    merged = union_all(*(select(*s.subquery().c) for s in selects))
    return merged.order_by(merged.selected_columns.seq).limit(bindparam("limit"))


def _arms(shape: _Shape) -> list[str]:
    """The sets that can hold a match: a `type` condition rules some out (the
    clauses stay in the statement; this only spares walking an empty set)."""
    if shape.member_statuses is not None:
        return [_Arm.SHARED]
    arms = {_Arm.PUBLIC, _Arm.OWN, _Arm.SHARED}
    for field, negate, value in shape.conditions:
        if field == "type":
            named = {"public": _Arm.PUBLIC, "private": _Arm.OWN, "shared": _Arm.SHARED}[value or ""]
            arms = arms - {named} if negate else arms & {named}
    order = (_Arm.PUBLIC, _Arm.OWN, _Arm.SHARED)
    return [arm for arm in order if arm in arms] or [_Arm.PUBLIC]


def _arm_select(arm: str, shape: _Shape) -> Select[Any]:
    image = IMAGES.c
    columns = [image[name] for name in LISTED_COLUMNS]
    # The shared set is walked in seq order from the caller's member rows
    # (which carry their image's seq), the others from the images'.
    seq = MEMBERS.c.image_seq if arm == _Arm.SHARED else image.seq
    clauses: list[ColumnElement[bool]] = [
        seq > bindparam("after_seq"),
        image.status != ImageStatus.DELETED.value,
    ]
    if not shape.asks_deprecated:
        clauses.append(image.deprecated == false())
    project: BindParameter[str] = bindparam("project")
    statement = select(*columns)
    if arm == _Arm.PUBLIC:
        clauses.append(image.visibility == Visibility.PUBLIC.value)
    elif arm == _Arm.OWN:
        clauses += [image.owner_project == project, image.visibility != Visibility.PUBLIC.value]
    else:
        statuses = (
            shape.member_statuses
            if shape.member_statuses is not None
            else frozenset({MemberStatus.ACCEPTED})
        )
        statement = statement.select_from(
            MEMBERS.join(IMAGES, and_(image.seq == seq, image.id == MEMBERS.c.image_id))
        )
        clauses += [
            MEMBERS.c.project == project,
            # Equalities, not IN: an IN list is expanded at every execution.
            # No status at all (`member_status = a AND member_status = b`): none.
            or_(*(MEMBERS.c.status == status.value for status in sorted(statuses)))
            if statuses
            else false(),
        ]
        if shape.member_statuses is None:  # beside public and own: the others' images
            owner = _unindexed(image.owner_project)
            clauses += [
                _unindexed(image.visibility) != Visibility.PUBLIC.value,
                or_(image.owner_project.is_(None), owner != project),
            ]
    for index, (field, negate, value) in enumerate(shape.conditions):
        clauses.append(_condition_clause(arm, index, Condition(field, negate, value or "")))
    return statement.where(*clauses).order_by(seq).limit(bindparam("limit"))


def _unindexed(column: ColumnElement[str]) -> ColumnElement[str]:
    """The column's value in a form no index matches (`column || ''`): a
    filter condition must not lead SQLite, which has no statistics here, to
    walk the index of that column and sort every match instead of walking its
    set's own index in seq order, which finds a page at once."""
    return column.concat("")


def _condition_clause(arm: str, index: int, condition: Condition) -> ColumnElement[bool]:
    name, value = condition.field, condition.value
    image = IMAGES.c
    bound: BindParameter[str] = bindparam(f"v{index}")
    project: BindParameter[str] = bindparam("project")
    clause: ColumnElement[bool]
    visibility, owner = _unindexed(image.visibility), _unindexed(image.owner_project)
    if name == "type":
        clause = {
            "public": visibility == Visibility.PUBLIC.value,
            "private": and_(visibility == Visibility.PRIVATE.value, owner == project),
            "shared": and_(visibility == Visibility.PRIVATE.value, owner != project),
        }[value]
    elif name == "member_status":  # applied by the shared set's member rows
        return true()
    elif name in ("os_type", "os_distro", "os_version", "architecture", "status", "owner_project"):
        clause = _unindexed(image[name]) == bound
    elif name == "name":
        if value == "prefix":  # case-sensitive on both databases, unlike SQLite's LIKE
            length: BindParameter[int] = bindparam(f"v{index}_length")
            clause = func.substr(image.display_name, 1, length) == bound
        else:
            clause = image.display_name == bound
    elif name == "tag":
        clause = exists().where(TAGS.c.image_id == image.id, TAGS.c.tag == bound)
    elif name in ("protected", "deprecated"):
        clause = image[name] == (value == "true")
    elif name == "flavor":
        # Public images list their flavors; a private image runs on the
        # flavors of its hardware model.
        if arm == _Arm.PUBLIC:
            clause = exists().where(
                FLAVORS.c.image_id == image.id, FLAVORS.c.flavor == bindparam("flavor_name")
            )
        else:
            clause = and_(
                visibility == Visibility.PRIVATE.value,
                _unindexed(image.hardware_model) == bindparam("flavor_model"),
            )
    else:  # parse_filter admits only the fields above
        raise AssertionError(f"unhandled filter field {name}")
    return not_(clause) if condition.negate else clause
