"""Structured logs: one JSON object per line carrying the call's request id
(the caller's, or a generated one sent back in trailing metadata) and
project; never a token or the user's data."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from bms.image.v1 import image_pb2, provisioning_pb2
from bms_image.common.serving import RunningService
from bms_image.common.telemetry.logs import configure_logging, request_id_from
from bms_image.images.adapters.catalog import public_image_id
from bms_image.images.domain.images import ImageCatalog
from support.server_requests import create_servers
from support.services import ImageStub, ProvisioningStub
from support.tokens import bearer

CENTOS = f"images/{public_image_id('centos-7.6-x86_64')}"
MISSING = "images/00000000-0000-0000-0000-000000000000"
SECRET_USER_DATA = "#cloud-config\nchpasswd: {list: 'root:hunter2-do-not-log'}\n"


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """The root logger writing JSON at DEBUG into a buffer; restored after."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    buffer = io.StringIO()
    configure_logging("DEBUG", "json", buffer)
    yield buffer
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def records(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines() if line.strip()]


def trailing(call_error: grpc.aio.AioRpcError) -> dict[str, str]:
    return {key: value for key, value in call_error.trailing_metadata() or ()}


@pytest.fixture
def alpha(service: RunningService) -> str:
    """A token of project alpha."""
    return service.authority.issue("alpha")


async def failed_get_image(
    images: ImageStub, token: str, name: str, request_id: str
) -> grpc.aio.AioRpcError:
    """The error of GetImage(`name`) sent with `token` and `request_id`."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await images.GetImage(
            image_pb2.GetImageRequest(name=name),
            metadata=bearer(token, ("x-request-id", request_id)),
        )
    return caught.value


async def test_a_failed_call_is_logged_with_the_callers_request_id_and_project(
    images: ImageStub, alpha: str, json_log: io.StringIO
) -> None:
    error = await failed_get_image(images, alpha, MISSING, "req-4242")
    assert trailing(error)["x-request-id"] == "req-4242"
    mine = [r for r in records(json_log) if r.get("request_id") == "req-4242"]
    assert mine, json_log.getvalue()
    line = mine[-1]
    assert line["project"] == "alpha"
    assert line["rpc"] == "/bms.image.v1.ImageService/GetImage"
    assert line["level"] == "INFO" and "NOT_FOUND" in line["message"]
    assert {"time", "name", "message"} <= line.keys()


async def test_without_a_request_id_one_is_generated_and_returned(
    images: ImageStub, alpha: str, json_log: io.StringIO
) -> None:
    call = images.GetImage(
        image_pb2.GetImageRequest(name=CENTOS),
        metadata=bearer(alpha, ("x-request-id", "bad id <script>")),
    )
    await call
    returned = {key: value for key, value in await call.trailing_metadata()}
    generated = returned["x-request-id"]
    assert generated != "bad id <script>" and len(generated) == 32
    assert any(r.get("request_id") == generated for r in records(json_log))


async def test_tokens_and_user_data_never_reach_the_log(
    images: ImageStub, provisioning: ProvisioningStub, alpha: str, json_log: io.StringIO
) -> None:
    stream = provisioning.CreateServers(
        create_servers("quiet", user_data=SECRET_USER_DATA), metadata=bearer(alpha)
    )
    stages = [event.stage async for event in stream]
    with pytest.raises(grpc.aio.AioRpcError):  # a refused token is not echoed either
        await images.ListImages(
            image_pb2.ListImagesRequest(),
            metadata=(("authorization", f"Bearer {alpha}tampered"),),
        )
    assert stages[-1] == provisioning_pb2.PROVISIONING_STAGE_ACTIVE
    text = json_log.getvalue()
    assert "CreateServers OK" in text, "the call was logged"
    assert alpha not in text and alpha.split(".")[1] not in text
    assert "hunter2" not in text


def test_request_ids_are_taken_only_when_sane() -> None:
    assert request_id_from("abc-123_4.5:6") == "abc-123_4.5:6"
    for hostile in ("", "x" * 129, "a b", "id\nforged-line", None):
        generated = request_id_from(hostile)
        assert generated != hostile and len(generated) == 32


def test_an_unknown_log_format_is_refused() -> None:
    with pytest.raises(RuntimeError, match="text or json"):
        configure_logging("INFO", "yaml")


async def test_an_internal_error_names_its_request_id_to_the_caller_and_in_the_log(
    images: ImageStub, alpha: str, json_log: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(self: ImageCatalog, caller: object, image_id: str) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(ImageCatalog, "describe", broken)
    error = await failed_get_image(images, alpha, CENTOS, "req-boom")
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "req-boom" in (error.details() or "")
    assert "disk on fire" not in (error.details() or ""), "no internals to the caller"
    assert trailing(error)["x-request-id"] == "req-boom"
    logged = [r for r in records(json_log) if r.get("request_id") == "req-boom"]
    assert any(r["level"] == "ERROR" and "GetImage" in r["message"] for r in logged), logged
