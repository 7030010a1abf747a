"""The filter compiler: a ListImages query (the caller, its parsed ImageQuery
and a page position) as one SQL statement over the images tables."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, Select, and_, exists, false, func, not_, or_, select, true

from bms_image.common.model import Caller, ImageStatus, MemberStatus, Visibility
from bms_image.images.adapters.rows import FLAVORS, IMAGES, MEMBERS, TAGS
from bms_image.images.domain.query import Condition, ImageQuery


def listing(caller: Caller, query: ImageQuery, after_seq: int, limit: int) -> Select[Any]:
    """The images the caller sees that match the query, after `after_seq`, in
    seq order, at most `limit` of them."""
    image = IMAGES.c
    clauses: list[ColumnElement[bool]] = [
        image.seq > after_seq,
        image.status != ImageStatus.DELETED.value,
        _visible(caller, query),
    ]
    if not query.asks_deprecated:
        clauses.append(image.deprecated == false())
    clauses += [_condition_clause(caller, c, query) for c in query.conditions]
    return select(IMAGES).where(*clauses).order_by(image.seq).limit(limit)


def _visible(caller: Caller, query: ImageQuery) -> ColumnElement[bool]:
    """Public, own and accepted shared images; only shared ones, with the
    caller's answers asked for, under `member_status` conditions."""
    image = IMAGES.c
    member_statuses = query.member_statuses()
    shared_with_caller = exists().where(
        MEMBERS.c.image_id == image.id,
        MEMBERS.c.project == caller.project,
        MEMBERS.c.status.in_(
            [
                s.value
                for s in ({MemberStatus.ACCEPTED} if member_statuses is None else member_statuses)
            ]
        ),
    )
    if member_statuses is not None:
        return shared_with_caller
    return or_(
        image.visibility == Visibility.PUBLIC.value,
        image.owner_project == caller.project,
        shared_with_caller,
    )


def _condition_clause(
    caller: Caller, condition: Condition, query: ImageQuery
) -> ColumnElement[bool]:
    name, value = condition.field, condition.value
    image = IMAGES.c
    clause: ColumnElement[bool]
    if name == "type":
        clause = {
            "public": image.visibility == Visibility.PUBLIC.value,
            "private": and_(
                image.visibility == Visibility.PRIVATE.value,
                image.owner_project == caller.project,
            ),
            "shared": and_(
                image.visibility == Visibility.PRIVATE.value,
                image.owner_project != caller.project,
            ),
        }[value]
    elif name == "member_status":  # applied by the visibility clause
        return true()
    elif name in ("os_type", "os_distro", "os_version", "architecture", "status", "owner_project"):
        clause = image[name] == value
    elif name == "name":
        if value.endswith("*"):  # case-sensitive on both databases, unlike SQLite's LIKE
            prefix = value[:-1]
            clause = func.substr(image.display_name, 1, len(prefix)) == prefix
        else:
            clause = image.display_name == value
    elif name == "tag":
        clause = exists().where(TAGS.c.image_id == image.id, TAGS.c.tag == value)
    elif name in ("protected", "deprecated"):
        clause = image[name] == (value == "true")
    elif name == "flavor":
        assert query.flavor is not None
        flavor_name, hardware_model = query.flavor
        # `visibility || ''` keeps the OR from being run as a multi-index OR
        # plus a sort of every match (SQLite's choice without statistics):
        # walking seq in order finds a page of a dense listing at once.
        visibility = image.visibility.concat("")
        clause = or_(
            and_(
                visibility == Visibility.PUBLIC.value,
                exists().where(FLAVORS.c.image_id == image.id, FLAVORS.c.flavor == flavor_name),
            ),
            and_(visibility == Visibility.PRIVATE.value, image.hardware_model == hardware_model),
        )
    else:  # parse_filter admits only the fields above
        raise AssertionError(f"unhandled filter field {name}")
    return not_(clause) if condition.negate else clause
