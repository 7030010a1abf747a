"""The member limit and concurrent sharing, on SQLite and on PostgreSQL: the
limit holds under concurrency, one project is one member however many
shares race, and share/unshare/answer races end in a documented state."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sharing_support as sh
from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bms.image.v1 import image_pb2, sharing_pb2
from support.errors import Code, expect_error, outcome
from support.services import Serving, make_settings, serving

MAX_MEMBERS = 5


@pytest.fixture
async def limited(tmp_path: Path, database_url: str) -> AsyncIterator[Serving]:
    """A service on the test's database allowing 5 members per image."""
    settings = make_settings(tmp_path, database_url=database_url, max_image_members=MAX_MEMBERS)
    async with serving(settings) as running:
        yield running


async def test_the_member_limit_holds_and_is_a_quota_failure(limited: Serving) -> None:
    images, sharing, projects = limited.images, limited.sharing, limited.projects
    owner = projects("alpha")
    image = await sh.create_active(images, owner)
    members = [projects.name(f"m{i}") for i in range(MAX_MEMBERS)]
    for project in members:
        await sh.share(sharing, owner, image.name, project)

    rich = await expect_error(
        sh.share(sharing, owner, image.name, projects.name("sixth")),
        Code.RESOURCE_EXHAUSTED,
        "IMAGE_MEMBER_QUOTA_EXCEEDED",
    )
    assert rich.quota_failure is not None
    assert [v.subject for v in rich.quota_failure.violations] == [image.name]
    assert rich.info.metadata["limit"] == str(MAX_MEMBERS)

    listed = await sh.list_members(sharing, owner, image.name, page_size=2)
    assert [m.member_project for m in listed] == sorted(members)
    # At the limit, sharing again with a member is still the idempotent no-op...
    again = await sh.share(sharing, owner, image.name, members[0])
    assert again == listed[[m.member_project for m in listed].index(members[0])]
    # ...and stopping to share with one makes room for another.
    await sh.unshare(sharing, owner, image.name, members[0])
    sixth = await sh.share(sharing, owner, image.name, projects.name("sixth"))
    assert sixth.status == sh.PENDING
    assert len(await sh.list_members(sharing, owner, image.name)) == MAX_MEMBERS


async def test_concurrent_shares_with_one_project_make_one_member(limited: Serving) -> None:
    images, sharing, projects = limited.images, limited.sharing, limited.projects
    owner = projects("alpha")
    image = await sh.create_active(images, owner)
    beta = projects.name("beta")

    outcomes = await sh.gather_outcomes(
        sh.share(sharing, owner, image.name, beta) for _ in range(20)
    )

    errors = [error.code.name for _, error in outcomes if error]
    assert errors == [], errors
    members = {response.SerializeToString(deterministic=True) for response, _ in outcomes}
    assert len(members) == 1, "every call returned the same member"
    listed = await sh.list_members(sharing, owner, image.name)
    assert [m.member_project for m in listed] == [beta]
    assert listed[0].status == sh.PENDING


async def test_concurrent_shares_of_ten_projects_stop_at_the_limit(limited: Serving) -> None:
    images, sharing, projects = limited.images, limited.sharing, limited.projects
    owner = projects("alpha")
    image = await sh.create_active(images, owner)
    candidates = [projects.name(f"p{i}") for i in range(10)]

    outcomes = await sh.gather_outcomes(sh.share(sharing, owner, image.name, p) for p in candidates)

    shared = sorted(response.member_project for response, error in outcomes if error is None)
    refused = [error for _, error in outcomes if error is not None]
    assert len(shared) == MAX_MEMBERS, [e.message for e in refused]
    assert len(refused) == 10 - MAX_MEMBERS
    for error in refused:
        assert (error.code, error.reason) == (
            Code.RESOURCE_EXHAUSTED,
            "IMAGE_MEMBER_QUOTA_EXCEEDED",
        )
        assert error.quota_failure is not None
    listed = await sh.list_members(sharing, owner, image.name)
    assert [m.member_project for m in listed] == shared


async def test_racing_share_and_unshare_end_in_a_documented_state(limited: Serving) -> None:
    """Shares always succeed; an unshare succeeds or finds nothing (NOT_FOUND);
    afterwards the project is a member once (PENDING) or not at all, and the
    member's view agrees."""
    images, sharing, projects = limited.images, limited.sharing, limited.projects
    owner, member = projects("alpha"), projects("beta")
    image = await sh.create_active(images, owner)
    beta = projects.name("beta")

    for round_number in range(8):
        calls = []
        for index in range(6):
            if (index + round_number) % 2:
                calls.append(sh.unshare(sharing, owner, image.name, beta))
            else:
                calls.append(sh.share(sharing, owner, image.name, beta))
        outcomes = await sh.gather_outcomes(calls)

        for (_, error), index in zip(outcomes, range(6), strict=True):
            is_unshare = bool((index + round_number) % 2)
            if error is None:
                continue
            assert is_unshare, f"a share failed: {error.code.name} {error.message}"
            assert (error.code, error.reason) == (Code.NOT_FOUND, "IMAGE_MEMBER_NOT_FOUND"), (
                f"an unshare failed with {error.code.name}: {error.message}"
            )
        listed = await sh.list_members(sharing, owner, image.name)
        assert [m.member_project for m in listed] in ([], [beta]), listed
        response, error = await outcome(
            sharing.GetImageMember(
                sharing_pb2.GetImageMemberRequest(name=sh.member_name(image.name, beta)),
                metadata=member,
            )
        )
        if listed:
            assert error is None and response.status == sh.PENDING
            assert image.name in await sh.names_listed(images, member, "member_status = pending")
        else:
            assert error is not None and error.code == Code.NOT_FOUND
            assert image.name not in await sh.names_listed(
                images, member, "member_status = pending"
            )


async def test_racing_answer_and_unshare_end_in_a_documented_state(limited: Serving) -> None:
    """Members accept while the owner stops sharing with them: each answer
    succeeds or finds nothing (NOT_FOUND), each unshare succeeds, and no
    project is a member afterwards. Never an INTERNAL error. Five races a
    round, the unshares staggered across the answer's read-then-write."""
    images, sharing, projects = limited.images, limited.sharing, limited.projects
    owner = projects("alpha")
    image = await sh.create_active(images, owner)
    racers = [f"r{i}" for i in range(MAX_MEMBERS)]

    async def unshare_after(project: str, delay: float) -> None:
        await asyncio.sleep(delay)
        await sh.unshare(sharing, owner, image.name, project)

    for round_number in range(10):
        for racer in racers:
            await sh.share(sharing, owner, image.name, projects.name(racer))
        calls = []
        for index, racer in enumerate(racers):
            project = projects.name(racer)
            delay = ((round_number * len(racers) + index) % 10) * 0.0005
            calls += [
                sh.answer(sharing, projects(racer), image.name, project, sh.ACCEPTED),
                unshare_after(project, delay),
            ]
        outcomes = await sh.gather_outcomes(calls)

        for (accepted, answer_error), (_, unshare_error) in zip(
            outcomes[::2], outcomes[1::2], strict=True
        ):
            assert unshare_error is None, f"{unshare_error.code.name}: {unshare_error.message}"
            if answer_error is None:
                assert accepted.status == sh.ACCEPTED
                continue
            # Unshared first: the image is gone for the racer (IMAGE_NOT_FOUND),
            # or the membership went between two reads (IMAGE_MEMBER_NOT_FOUND).
            assert answer_error.code == Code.NOT_FOUND, answer_error.message
            assert answer_error.reason in ("IMAGE_NOT_FOUND", "IMAGE_MEMBER_NOT_FOUND")
        assert await sh.list_members(sharing, owner, image.name) == []


async def _wait_for_a_blocked_statement(engine: AsyncEngine, is_sqlite: bool) -> None:
    """Until a statement of the service waits for the lock our transaction
    holds: visible in pg_stat_activity on PostgreSQL; on SQLite (which cannot
    show it) a pause long enough for the call to reach its write."""
    if is_sqlite:
        await asyncio.sleep(0.5)
        return
    async with engine.connect() as watcher:
        for _ in range(100):
            waiting = await watcher.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND datname = current_database() AND query ILIKE '%image_members%'"
                )
            )
            await watcher.commit()
            if waiting:
                return
            await asyncio.sleep(0.05)


async def test_an_answer_while_an_unshare_commits_is_not_found(
    limited: Serving, database_url: str
) -> None:
    """The member answers while the owner's DeleteImageMember is between its
    DELETE and its COMMIT (here: the same DELETE, run and held open on a
    second connection, then committed). The member then no longer has the
    image: the answer must be NOT_FOUND, not an INTERNAL error. This is the
    race of the test above, made deterministic."""
    images, sharing, projects = limited.images, limited.sharing, limited.projects
    owner, member = projects("alpha"), projects("beta")
    image = await sh.create_active(images, owner)
    beta = projects.name("beta")
    await sh.share(sharing, owner, image.name, beta)
    image_id = image.name.removeprefix("images/")

    # Another client's connection: through aiosqlite on SQLite (a test-only
    # dependency; the service itself runs SQLite on the sqlite3 driver).
    url = make_url(database_url)
    if url.drivername == "sqlite":
        url = url.set(drivername="sqlite+aiosqlite")
    engine = create_async_engine(url)
    try:
        async with engine.connect() as unsharing:
            # SqlMemberRepository.remove's statement, its transaction still open.
            deleted = await unsharing.execute(
                text("DELETE FROM image_members WHERE image_id = :image AND project = :project"),
                {"image": image_id, "project": beta},
            )
            assert deleted.rowcount == 1
            answering = asyncio.create_task(
                outcome(sh.answer(sharing, member, image.name, beta, sh.ACCEPTED))
            )
            await _wait_for_a_blocked_statement(engine, database_url.startswith("sqlite"))
            assert not answering.done(), "the answer did not wait for the unshare"
            await unsharing.commit()
        response, error = await asyncio.wait_for(answering, 30)
    finally:
        await engine.dispose()

    assert error is not None, f"the answer succeeded on a deleted membership: {response}"
    assert error.code == Code.NOT_FOUND, f"{error.code.name}: {error.message}"
    assert error.reason in ("IMAGE_NOT_FOUND", "IMAGE_MEMBER_NOT_FOUND")
    assert await sh.list_members(sharing, owner, image.name) == []
    await expect_error(
        images.GetImage(image_pb2.GetImageRequest(name=image.name), metadata=member),
        Code.NOT_FOUND,
        "IMAGE_NOT_FOUND",
    )


async def test_concurrent_replicates_with_one_request_id_make_one_copy(limited: Serving) -> None:
    images, sharing, projects = limited.images, limited.sharing, limited.projects
    owner, member = projects("alpha"), projects("beta")
    beta = projects.name("beta")
    image = await sh.create_active(images, owner, size=256 * 1024)
    await sh.share(sharing, owner, image.name, beta)
    await sh.answer(sharing, member, image.name, beta, sh.ACCEPTED)
    request_id = str(uuid.uuid4())

    outcomes = await sh.gather_outcomes(
        sh.replicate(sharing, member, image.name, request_id=request_id) for _ in range(8)
    )

    errors = [f"{e.code.name}: {e.message}" for _, e in outcomes if e]
    assert errors == []
    assert len({response.name for response, _ in outcomes}) == 1
    copies = await sh.names_listed(images, member, "type = private")
    assert copies == [outcomes[0][0].name]
    for _ in range(100):  # a racing retry may return the copy while its bytes are copied
        got = await images.GetImage(image_pb2.GetImageRequest(name=copies[0]), metadata=member)
        if got.status == sh.ACTIVE:
            break
        await asyncio.sleep(0.05)
    assert got.status == sh.ACTIVE and got.sha256 == image.sha256
