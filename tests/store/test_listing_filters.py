"""The listing statement (three index-driven sets merged in seq order, one
statement per shape of filter) against the reference semantics of the unit
tests' in-memory repository, on SQLite and PostgreSQL: for every filter and
caller, page after page, the same images in the same order."""

from __future__ import annotations

import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from bms_image.common.flavors import load_flavors
from bms_image.common.model import (
    Architecture,
    Caller,
    Image,
    ImageStatus,
    MemberStatus,
    OsType,
    Visibility,
)
from bms_image.common.staging import Staging
from bms_image.images.adapters.blobs.local import LocalBlobStore
from bms_image.images.adapters.catalog import seed
from bms_image.images.adapters.members import SqlMemberRepository
from bms_image.images.adapters.repository import SqlImageRepository
from bms_image.images.domain.query import ImageQuery, parse_filter
from bms_image.store.db import Database

sys.path.insert(0, str(Path(__file__).parent.parent / "unit"))
from unit_fakes import InMemoryImages

S4 = "physical.s4.large"
MODELS = {flavor.name: flavor.hardware_model for flavor in load_flavors()}

FILTERS = [
    "",
    "type = public",
    "type = private",
    "type = shared",
    "type != public",
    "type != shared",
    "owner_project = alpha",
    "owner_project != alpha",
    "owner_project = beta",
    "member_status = pending",
    "member_status = rejected",
    "member_status != accepted",
    "member_status = accepted AND type = shared",
    "member_status = accepted AND member_status = pending",  # no status: nothing
    "member_status != accepted AND member_status != pending AND member_status != rejected",
    "status = queued",
    "status != active",
    "os_type = windows",
    "os_distro = centos AND os_version = 7.6",
    "architecture = aarch64",
    'name = "a web 1"',
    'name = "a web*"',
    'name = "b*"',
    'name != "a*"',
    "tag = prod",
    "tag != prod",
    "protected = true",
    "deprecated = true",
    "deprecated = false",
    f"flavor = {S4}",
    f"flavor = {S4} AND type = shared",
    f"flavor = {S4} AND tag = prod AND status = active",
]


def _image(project: str | None, name: str, **fields: Any) -> Image:
    now = datetime.now(UTC)
    values: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "display_name": name,
        "visibility": Visibility.PRIVATE if project else Visibility.PUBLIC,
        "owner_project": project,
        "creator_project": project or "platform",
        "os_type": OsType.LINUX,
        "os_distro": "centos",
        "os_version": "7.6",
        "architecture": Architecture.X86_64,
        "hardware_model": MODELS[S4] if project else "",
        "status": ImageStatus.ACTIVE,
        "create_time": now,
        "update_time": now,
    }
    values.update(fields)
    return Image(**values)


async def _store(database: Database, tmp_path: Path) -> InMemoryImages:
    """A varied store, written through the real repositories, and the same
    rows (with the database's seqs) in the reference."""
    await seed(database, LocalBlobStore(tmp_path / "blobs"), Staging(tmp_path / "staging"), 0)
    images, members = SqlImageRepository(database), SqlMemberRepository(database)
    other_model = next(model for model in MODELS.values() if model != MODELS[S4])
    answers = (MemberStatus.ACCEPTED, MemberStatus.PENDING, MemberStatus.REJECTED, None)
    for index in range(12):
        tags = ["prod"] if index % 3 == 0 else ["dev", "eu"]
        own = await images.create_private(
            _image("alpha", f"a web {index}", tags=tags, protected=index % 4 == 0), 100
        )
        if index == 0:  # a member row of the owner itself: listed once, as its own
            await members.add(own.id, "alpha", 100)
            await members.set_status(own.id, "alpha", MemberStatus.ACCEPTED)
        shared = await images.create_private(
            _image(
                "beta",
                f"b db {index}",
                tags=tags,
                os_type=OsType.WINDOWS if index % 2 else OsType.LINUX,
                hardware_model=MODELS[S4] if index % 3 else other_model,
                status=ImageStatus.QUEUED if index % 5 == 0 else ImageStatus.ACTIVE,
            ),
            100,
        )
        answer = answers[index % 4]
        if answer is not None:
            await members.add(shared.id, "alpha", 100)
            if answer is not MemberStatus.PENDING:
                await members.set_status(shared.id, "alpha", answer)
        gone = await images.create_private(_image("alpha", f"a gone {index}"), 100)
        if index % 4 == 1:
            await images.update(gone.id, gone.revision, {"status": ImageStatus.DELETED})
        if index % 3 == 1:
            old = await images.create_private(_image("alpha", f"a old {index}"), 100)
            await images.update(old.id, old.revision, {"deprecated": True})
        await images.create_public(
            _image(
                None,
                f"pub {index}",
                supported_flavors=[S4] if index % 2 else sorted(MODELS)[:1],
                deprecated=index % 5 == 4,
                architecture=Architecture.AARCH64 if index % 6 == 5 else Architecture.X86_64,
            )
        )
    reference = InMemoryImages()
    every = await database.run(_all_ids)
    for image_id in every:
        image = await images.get(image_id)
        assert image is not None
        reference.rows[image_id] = image
    for image_id in every:
        for project in ("alpha", "beta"):
            member = await members.get(image_id, project)
            if member is not None:
                reference.shares[(image_id, project)] = member.status
    return reference


def _all_ids(connection: Any) -> list[str]:
    return [row[0] for row in connection.exec_driver_sql("SELECT id FROM images")]


async def _pages(repository: Any, caller: Caller, query: ImageQuery, limit: int) -> list[str]:
    names: list[str] = []
    after = 0
    for _ in range(1000):
        page, _ = await repository.list_visible(caller, query, after, limit)
        names += [entry.id for entry in page]
        if len(page) < limit:
            return names
        after = page[-1].seq
    raise AssertionError("pagination did not end")


def _query(text: str) -> ImageQuery:
    query = ImageQuery(parse_filter(text))
    for condition in query.values("flavor"):
        query.flavor = (condition.value, MODELS[condition.value])
    return query


@pytest.mark.asyncio
async def test_every_filter_lists_what_the_reference_lists(
    database: Database, tmp_path: Path
) -> None:
    reference = await _store(database, tmp_path)
    repository = SqlImageRepository(database)
    for caller in (Caller("alpha"), Caller("beta"), Caller("gamma")):
        for text in FILTERS:
            expected = await _pages(reference, caller, _query(text), 4)
            for limit in (1, 4, 1000):
                listed = await _pages(repository, caller, _query(text), limit)
                assert listed == expected, f"{caller.project}, {text!r}, pages of {limit}"
    # The store is varied enough for the comparison to mean something.
    assert len(await _pages(reference, Caller("alpha"), _query("type = shared"), 100)) == 3
    assert len(await _pages(reference, Caller("alpha"), _query("member_status = pending"), 9)) == 3
