"""Concurrent UpdateImage/DeleteImage calls on one image, through gRPC, on
SQLite and PostgreSQL: no update is lost, and etags make stale writers fail."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
from race_support import (
    Service,
    error_reason,
    private_image_request,
    serving,
    update_request,
)

from bms.image.v1 import image_pb2

WRITERS = 10


def _revision(image: image_pb2.Image) -> int:
    return int(image.etag.strip('"'))


async def _attempt(call: Any) -> image_pb2.Image | grpc.aio.AioRpcError:
    try:
        return await call  # type: ignore[no-any-return]
    except grpc.aio.AioRpcError as error:
        return error


async def _new_image(service: Service, project: str) -> image_pb2.Image:
    return await service.images.CreateImage(
        private_image_request("contended"), metadata=service.as_project(project)
    )


def _split(
    outcomes: list[image_pb2.Image | grpc.aio.AioRpcError],
) -> tuple[dict[int, image_pb2.Image], dict[int, grpc.aio.AioRpcError]]:
    done = {i: o for i, o in enumerate(outcomes) if isinstance(o, image_pb2.Image)}
    failed = {i: o for i, o in enumerate(outcomes) if isinstance(o, grpc.aio.AioRpcError)}
    return done, failed


def _assert_only_concurrency_aborts(failed: dict[int, grpc.aio.AioRpcError]) -> None:
    """Writers without an etag may give up after their retries, but only so."""
    for error in failed.values():
        assert error.code() == grpc.StatusCode.ABORTED, (error.code(), error.details())
        assert error_reason(error) == "CONCURRENT_UPDATE"


async def test_concurrent_updates_of_the_same_fields_lose_nothing(
    tmp_path: Path, database_url: str
) -> None:
    """Ten writers set tags and description together: every success is one
    revision, and the stored image is exactly the last success (tags and
    description from the same call, no tag rows mixed from two calls)."""
    async with serving(tmp_path, database_url) as service:
        alpha = service.as_project("alpha")
        image = await _new_image(service, "alpha")
        assert _revision(image) == 1
        # Overlapping sets: a writer keeps some tag rows of the one before it.
        tag_sets = [[f"w{i}", "shared", f"w{(i + 1) % WRITERS}"] for i in range(WRITERS)]
        outcomes = await asyncio.gather(
            *(
                _attempt(
                    service.stub(i).UpdateImage(
                        update_request(image.name, tags=tag_sets[i], description=f"writer {i}"),
                        metadata=alpha,
                    )
                )
                for i in range(WRITERS)
            )
        )
        done, failed = _split(outcomes)
        _assert_only_concurrency_aborts(failed)
        assert done, "no concurrent update succeeded"

        revisions = sorted(_revision(result) for result in done.values())
        assert revisions == list(range(2, 2 + len(done))), "two updates got one revision"
        for i, result in done.items():
            assert list(result.tags) == tag_sets[i]
            assert result.description == f"writer {i}"

        final = await service.images.GetImage(
            image_pb2.GetImageRequest(name=image.name), metadata=alpha
        )
        assert _revision(final) == 1 + len(done)
        last = max(done, key=lambda i: _revision(done[i]))
        assert list(final.tags) == tag_sets[last]
        assert final.description == f"writer {last}"


#: (field, value written by writer i) for updates of distinct fields.
_FIELDS: list[tuple[str, Any]] = [
    ("description", lambda i: f"description by {i}"),
    ("tags", lambda i: [f"tag-{i}", "common"]),
    ("display_name", lambda i: f"name by {i}"),
    ("min_disk_gb", lambda i: 50 + i),
    ("protected", lambda i: i % 2 == 0),
]


async def test_concurrent_updates_of_different_fields_lose_nothing(
    tmp_path: Path, database_url: str
) -> None:
    """Each writer changes one field (two writers per field): every field ends
    with the value of its last successful writer, so no writer overwrote
    another's field with what it had read before."""
    async with serving(tmp_path, database_url) as service:
        alpha = service.as_project("alpha")
        image = await _new_image(service, "alpha")
        plan = [(_FIELDS[i % len(_FIELDS)][0], _FIELDS[i % len(_FIELDS)][1](i)) for i in range(10)]
        outcomes = await asyncio.gather(
            *(
                _attempt(
                    service.stub(i).UpdateImage(
                        update_request(image.name, **{field: value}), metadata=alpha
                    )
                )
                for i, (field, value) in enumerate(plan)
            )
        )
        done, failed = _split(outcomes)
        _assert_only_concurrency_aborts(failed)
        assert done

        final = await service.images.GetImage(
            image_pb2.GetImageRequest(name=image.name), metadata=alpha
        )
        assert _revision(final) == 1 + len(done)
        assert sorted(_revision(r) for r in done.values()) == list(range(2, 2 + len(done)))
        for field, _ in _FIELDS:
            writers = [i for i in done if plan[i][0] == field]
            stored = getattr(final, field)
            stored = list(stored) if field == "tags" else stored
            if writers:
                last = max(writers, key=lambda i: _revision(done[i]))
                assert stored == plan[last][1], field
            else:
                assert stored == (list(image.tags) if field == "tags" else getattr(image, field))


async def test_concurrent_updates_with_the_current_etag_let_exactly_one_win(
    tmp_path: Path, database_url: str
) -> None:
    async with serving(tmp_path, database_url) as service:
        alpha = service.as_project("alpha")
        image = await _new_image(service, "alpha")
        outcomes = await asyncio.gather(
            *(
                _attempt(
                    service.stub(i).UpdateImage(
                        update_request(image.name, etag=image.etag, description=f"d{i}"),
                        metadata=alpha,
                    )
                )
                for i in range(WRITERS)
            )
        )
        done, failed = _split(outcomes)
        assert len(done) == 1
        assert len(failed) == WRITERS - 1
        for error in failed.values():
            assert error.code() == grpc.StatusCode.ABORTED
            assert error_reason(error) in {"ETAG_MISMATCH", "CONCURRENT_UPDATE"}
        (winner,) = done
        final = await service.images.GetImage(
            image_pb2.GetImageRequest(name=image.name), metadata=alpha
        )
        assert final.etag == done[winner].etag == '"2"'
        assert final.description == f"d{winner}"


async def test_stale_etag_is_aborted(tmp_path: Path, database_url: str) -> None:
    async with serving(tmp_path, database_url) as service:
        alpha = service.as_project("alpha")
        image = await _new_image(service, "alpha")
        stale = image.etag
        fresh = await service.images.UpdateImage(
            update_request(image.name, etag=stale, description="first"), metadata=alpha
        )
        assert fresh.etag != stale

        for request in (
            update_request(image.name, etag=stale, description="second"),
            update_request(image.name, etag=stale, tags=["x"]),
        ):
            try:
                await service.images.UpdateImage(request, metadata=alpha)
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.ABORTED
                assert error_reason(error) == "ETAG_MISMATCH"
            else:
                raise AssertionError("an update with a stale etag succeeded")
        try:
            await service.images.DeleteImage(
                image_pb2.DeleteImageRequest(name=image.name, etag=stale), metadata=alpha
            )
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.ABORTED
            assert error_reason(error) == "ETAG_MISMATCH"
        else:
            raise AssertionError("a delete with a stale etag succeeded")

        final = await service.images.GetImage(
            image_pb2.GetImageRequest(name=image.name), metadata=alpha
        )
        assert (final.etag, final.description, list(final.tags)) == (fresh.etag, "first", [])
        await service.images.DeleteImage(
            image_pb2.DeleteImageRequest(name=image.name, etag=fresh.etag), metadata=alpha
        )


async def test_concurrent_deletes_and_updates_leave_one_deletion(
    tmp_path: Path, database_url: str
) -> None:
    """Deletes racing each other and updates: the image is deleted once; a
    loser sees NOT_FOUND or ABORTED, never a second deletion or an INTERNAL."""
    async with serving(tmp_path, database_url, private_image_quota=1) as service:
        alpha = service.as_project("alpha")
        image = await _new_image(service, "alpha")
        deletes = [
            service.stub(i).DeleteImage(
                image_pb2.DeleteImageRequest(name=image.name), metadata=alpha
            )
            for i in range(5)
        ]
        updates = [
            service.stub(i).UpdateImage(
                update_request(image.name, description=f"u{i}"), metadata=alpha
            )
            for i in range(5)
        ]
        outcomes = await asyncio.gather(*(_attempt(c) for c in [*deletes, *updates]))
        delete_outcomes = outcomes[:5]
        deleted = [o for o in delete_outcomes if not isinstance(o, grpc.aio.AioRpcError)]
        assert len(deleted) == 1, delete_outcomes
        for outcome in outcomes:
            if isinstance(outcome, grpc.aio.AioRpcError):
                assert outcome.code() in {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ABORTED}, (
                    outcome.code(),
                    outcome.details(),
                )
        # The quota slot (limit 1) is free again exactly once.
        await service.images.CreateImage(private_image_request("next"), metadata=alpha)


async def test_concurrent_updates_without_etag_all_succeed(
    tmp_path: Path, database_url: str
) -> None:
    """UpdateImage without an etag is last-writer-wins: the API promises
    ABORTED only for a stale etag, so contention alone must not fail a call.

    Fails today: ImageCatalog._change retries a lost compare-and-set only
    _UPDATE_RETRIES (5) times, without backoff, so of 20 simultaneous writers
    about 2 on SQLite and about 14 on PostgreSQL end with ABORTED
    CONCURRENT_UPDATE. (With the retry budget raised it passes.)"""
    async with serving(tmp_path, database_url) as service:
        alpha = service.as_project("alpha")
        image = await _new_image(service, "alpha")
        writers = 20
        outcomes = await asyncio.gather(
            *(
                _attempt(
                    service.stub(i).UpdateImage(
                        update_request(image.name, description=f"writer {i}"), metadata=alpha
                    )
                )
                for i in range(writers)
            )
        )
        done, failed = _split(outcomes)
        reasons = sorted(f"{e.code().name} {error_reason(e)}" for e in failed.values())
        assert reasons == [], f"{len(failed)} of {writers} updates without an etag failed"
        assert len(done) == writers
        final = await service.images.GetImage(
            image_pb2.GetImageRequest(name=image.name), metadata=alpha
        )
        assert _revision(final) == 1 + writers
