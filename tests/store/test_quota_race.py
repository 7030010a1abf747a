"""The private-image quota and request_id idempotency under concurrent
CreateImage calls, through gRPC, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import grpc
from google.rpc import code_pb2, error_details_pb2
from race_support import (
    Service,
    detail,
    error_reason,
    list_all,
    private_image_request,
    rich_status,
    serving,
)
from sqlalchemy import func, select

from bms.image.v1 import image_pb2
from bms_image.images.adapters.tables import ImageRow

QUOTA = 50
PREFILLED = 45
RACERS = 20


async def _stored_private_images(service: Service, project: str) -> int:
    """Non-deleted private images of the project, counted in the database itself."""
    statement = (
        select(func.count())
        .select_from(ImageRow)
        .where(
            ImageRow.owner_project == project,
            ImageRow.visibility == "private",
            ImageRow.status != "deleted",
        )
    )
    return int(
        await service.running.database.run(
            lambda connection: connection.execute(statement).scalar_one()
        )
    )


async def _attempt(call: object) -> image_pb2.Image | grpc.aio.AioRpcError:
    try:
        return await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        return error


async def test_concurrent_creates_stop_exactly_at_the_quota(
    tmp_path: Path, database_url: str
) -> None:
    async with serving(tmp_path, database_url) as service:
        alpha = service.as_project("alpha")
        beta = service.as_project("beta")
        for index in range(PREFILLED):
            await service.images.CreateImage(
                private_image_request(f"prefill-{index}"), metadata=alpha
            )
        assert await _stored_private_images(service, "alpha") == PREFILLED

        requests = [private_image_request(f"race-{index}") for index in range(RACERS)]
        # Another project races alongside: its quota is its own.
        beta_requests = [private_image_request(f"beta-{index}") for index in range(3)]
        outcomes = await asyncio.gather(
            *(
                _attempt(service.stub(index).CreateImage(request, metadata=alpha))
                for index, request in enumerate(requests)
            ),
            *(
                _attempt(service.stub(index).CreateImage(request, metadata=beta))
                for index, request in enumerate(beta_requests)
            ),
        )
        alpha_outcomes, beta_outcomes = outcomes[:RACERS], outcomes[RACERS:]

        created = [o for o in alpha_outcomes if isinstance(o, image_pb2.Image)]
        failed = [o for o in alpha_outcomes if isinstance(o, grpc.aio.AioRpcError)]
        unexpected = [
            (f.code(), f.details())
            for f in failed
            if f.code() != grpc.StatusCode.RESOURCE_EXHAUSTED
        ]
        assert unexpected == []
        assert (len(created), len(failed)) == (QUOTA - PREFILLED, RACERS - (QUOTA - PREFILLED))
        assert len({image.name for image in created}) == len(created)
        assert all(isinstance(o, image_pb2.Image) for o in beta_outcomes), beta_outcomes

        for error in failed:
            status = rich_status(error)
            assert status.code == code_pb2.RESOURCE_EXHAUSTED
            quota = detail(status, error_details_pb2.QuotaFailure)
            assert isinstance(quota, error_details_pb2.QuotaFailure), status
            assert [v.subject for v in quota.violations] == ["projects/alpha"]
            info = detail(status, error_details_pb2.ErrorInfo)
            assert isinstance(info, error_details_pb2.ErrorInfo)
            assert info.reason == "IMAGE_QUOTA_EXCEEDED"
            assert info.metadata["limit"] == str(QUOTA)
            assert info.metadata["used"] == str(QUOTA)

        assert await _stored_private_images(service, "alpha") == QUOTA
        listed = await list_all(service, alpha, "type = private", page_size=13)
        assert len(listed) == QUOTA
        assert len({image.name for image in listed}) == QUOTA

        # A retry of a create that won a slot gets its image back, not a quota error.
        winner = requests[[isinstance(o, image_pb2.Image) for o in alpha_outcomes].index(True)]
        retried = await service.images.CreateImage(winner, metadata=alpha)
        assert retried.name in {image.name for image in created}

        # Full: one more fails; deleting one frees exactly one slot.
        try:
            await service.images.CreateImage(private_image_request("over"), metadata=alpha)
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error_reason(error) == "IMAGE_QUOTA_EXCEEDED"
        else:
            raise AssertionError("a 51st private image was created")

        await service.images.DeleteImage(
            image_pb2.DeleteImageRequest(name=created[0].name), metadata=alpha
        )
        assert await _stored_private_images(service, "alpha") == QUOTA - 1
        again = await service.images.CreateImage(
            private_image_request("after-delete"), metadata=alpha
        )
        assert again.status == image_pb2.IMAGE_STATUS_QUEUED
        assert await _stored_private_images(service, "alpha") == QUOTA


async def test_concurrent_creates_after_a_delete_fill_only_the_freed_slot(
    tmp_path: Path, database_url: str
) -> None:
    """Small quota, a full project, one delete, then a burst: one winner."""
    async with serving(tmp_path, database_url, private_image_quota=3) as service:
        alpha = service.as_project("alpha")
        names = [
            (await service.images.CreateImage(private_image_request(f"i{i}"), metadata=alpha)).name
            for i in range(3)
        ]
        await service.images.DeleteImage(
            image_pb2.DeleteImageRequest(name=names[1]), metadata=alpha
        )
        outcomes = await asyncio.gather(
            *(
                _attempt(
                    service.stub(i).CreateImage(private_image_request(f"b{i}"), metadata=alpha)
                )
                for i in range(10)
            )
        )
        codes = sorted("OK" if isinstance(o, image_pb2.Image) else o.code().name for o in outcomes)
        assert codes == ["OK"] + ["RESOURCE_EXHAUSTED"] * 9
        assert await _stored_private_images(service, "alpha") == 3


async def test_concurrent_creates_with_one_request_id_make_one_image(
    tmp_path: Path, database_url: str
) -> None:
    """A fresh project (no project row yet) and ten retries of one request
    arriving together: one image, and every call answers with it."""
    async with serving(tmp_path, database_url) as service:
        gamma = service.as_project("gamma")
        request = private_image_request("idempotent", request_id=str(uuid.uuid4()))
        outcomes = await asyncio.gather(
            *(_attempt(service.stub(i).CreateImage(request, metadata=gamma)) for i in range(10))
        )
        errors = [(o.code(), o.details()) for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
        assert errors == []
        names = {o.name for o in outcomes if isinstance(o, image_pb2.Image)}
        assert len(names) == 1
        assert await _stored_private_images(service, "gamma") == 1
        listed = await list_all(service, gamma, "type = private")
        assert [image.name for image in listed] == list(names)

        # The same request_id from another project is another request.
        delta = service.as_project("delta")
        other = await service.images.CreateImage(request, metadata=delta)
        assert other.name not in names
        assert other.owner_project == "delta"


async def test_concurrent_creates_with_one_request_id_on_a_full_project(
    tmp_path: Path, database_url: str
) -> None:
    """Retries of a request that took the last slot keep getting its image,
    while a different request in the same burst is refused for quota."""
    async with serving(tmp_path, database_url, private_image_quota=2) as service:
        alpha = service.as_project("alpha")
        await service.images.CreateImage(private_image_request("first"), metadata=alpha)
        last = private_image_request("last-slot")
        taken = await service.images.CreateImage(last, metadata=alpha)
        outcomes = await asyncio.gather(
            *(_attempt(service.stub(i).CreateImage(last, metadata=alpha)) for i in range(8)),
            _attempt(service.stub(0).CreateImage(private_image_request("extra"), metadata=alpha)),
        )
        retries, extra = outcomes[:-1], outcomes[-1]
        assert all(isinstance(o, image_pb2.Image) and o.name == taken.name for o in retries)
        assert isinstance(extra, grpc.aio.AioRpcError)
        assert extra.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await _stored_private_images(service, "alpha") == 2
