"""Transport limits (issue 14, item 6): streams per HTTP/2 connection and RPCs
per process. What gRPC does, found by these tests: a call beyond the streams
of one connection waits until one ends (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS;
the client queues it), while a call beyond the process's RPCs is refused at
once with RESOURCE_EXHAUSTED. Open calls are held by UploadImageData streams
that send nothing: each is a running RPC on the server, waiting for its first
message."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from bms.image.v1 import image_pb2, image_pb2_grpc
from bms_image.common.config import Settings
from bms_image.common.serving import MAX_METADATA_BYTES, RunningService, server_options
from bms_image.images.adapters.catalog import public_image_id
from bms_image.processes import start
from support.services import make_settings
from support.tokens import Metadata, bearer

CENTOS = f"images/{public_image_id('centos-7.6-x86_64')}"
GET_CENTOS = image_pb2.GetImageRequest(name=CENTOS)


def _metadata(service: RunningService, project: str = "alpha") -> Metadata:
    return bearer(service.authority.issue(project))


@asynccontextmanager
async def _serving(tmp_path: Path, **overrides: object) -> AsyncIterator[RunningService]:
    running = await start(make_settings(tmp_path, **overrides))
    try:
        yield running
    finally:
        await running.stop(0)


@asynccontextmanager
async def _channel(service: RunningService) -> AsyncIterator[image_pb2_grpc.ImageServiceStub]:
    """A channel with an HTTP/2 connection of its own (channels of one process
    to one address share connections unless told not to), whose settings
    exchange is done: one call has gone through it."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    async with grpc.aio.insecure_channel(service.address, options=options) as channel:
        stub = image_pb2_grpc.ImageServiceStub(channel)
        await stub.GetImage(GET_CENTOS, metadata=_metadata(service), timeout=30)
        yield stub


def _held(stub: image_pb2_grpc.ImageServiceStub, md: Metadata) -> Any:
    """An UploadImageData call that sends nothing: it stays open until cancelled."""
    return stub.UploadImageData(metadata=md)


async def _until(probe: Any, want: grpc.StatusCode, attempts: int = 600) -> grpc.StatusCode:
    """Calls probe() until it ends with `want` (OK for a success); the code it
    ended with last. A hang guard, not a timing assertion."""
    code = grpc.StatusCode.UNKNOWN
    for _ in range(attempts):
        try:
            await probe()
            code = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as error:
            code = error.code()
        if code == want:
            return code
        await asyncio.sleep(0.05)
    return code


@asynccontextmanager
async def _crowded(
    tmp_path: Path, held_calls: int, **overrides: object
) -> AsyncIterator[tuple[Any, Any, Metadata, list[Any]]]:
    """A service with `overrides`, two channels with a connection each, and
    `held_calls` open calls on the first: (first, second, metadata, held).
    The calls still held at the end are cancelled."""
    async with (
        _serving(tmp_path, **overrides) as service,
        _channel(service) as first,
        _channel(service) as second,
    ):
        md = _metadata(service)
        held = [_held(first, md) for _ in range(held_calls)]
        # Each held call has sent its headers before the test goes on: on a
        # loaded machine the calls' tasks may not have run yet otherwise.
        await asyncio.gather(*(call.wait_for_connection() for call in held))
        try:
            yield first, second, md, held
        finally:
            for call in held:
                call.cancel()


async def test_rpcs_beyond_the_process_limit_are_refused_with_resource_exhausted(
    tmp_path: Path,
) -> None:
    async with _crowded(tmp_path, 4, max_concurrent_rpcs=4) as (_holder, prober, md, held):

        async def probe() -> None:
            await prober.GetImage(GET_CENTOS, metadata=md, timeout=30)

        assert await _until(probe, grpc.StatusCode.RESOURCE_EXHAUSTED) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        # Refusals do not wear the bound down (gRPC's own limiter drifted:
        # each refused call lowered its count).
        for _ in range(20):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await probe()
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "BMS_IMAGE_MAX_CONCURRENT_RPCS" in (refused.value.details() or "")

        held.pop().cancel()  # one RPC ends: a new one is served again
        assert await _until(probe, grpc.StatusCode.OK) == grpc.StatusCode.OK


async def test_calls_beyond_the_streams_of_a_connection_wait_for_one_to_end(
    tmp_path: Path,
) -> None:
    async with _crowded(tmp_path, 2, max_streams_per_connection=2) as (crowded, other, md, held):
        waiting = asyncio.ensure_future(crowded.GetImage(GET_CENTOS, metadata=md, timeout=60))
        # Another connection is not held up: its calls are answered while
        # the third call of the crowded one still waits for a stream.
        for _ in range(5):
            await other.GetImage(GET_CENTOS, metadata=md, timeout=30)
        assert not waiting.done()

        # One held stream ends (an upload without metadata is refused):
        # the waiting call gets its stream.
        ended = held.pop()
        await ended.done_writing()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await ended
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        image = await asyncio.wait_for(waiting, 60)
        assert image.name == CENTOS


async def test_300_open_streams_on_one_channel_under_a_limit_of_400(tmp_path: Path) -> None:
    """What the benchmark does with 1,000 WatchServer streams and the default
    limit (2,048), at a smaller scale: every stream of one channel runs at
    once, and the channel still takes new calls."""
    async with (
        _serving(tmp_path, max_streams_per_connection=400) as service,
        _channel(service) as stub,
    ):
        md = _metadata(service)
        held = [_held(stub, md) for _ in range(300)]
        try:
            image = await stub.GetImage(GET_CENTOS, metadata=md, timeout=60)
            assert image.name == CENTOS
            assert not any(call.done() for call in held)
        finally:
            for call in held:
                call.cancel()


async def test_headers_over_the_metadata_limit_are_refused_every_time(tmp_path: Path) -> None:
    """8 KiB of headers at most, refused always above it (gRPC's own defaults
    refuse at random between 8 and 16 KiB)."""
    async with _serving(tmp_path) as service, _channel(service) as stub:
        md = _metadata(service)
        under = (*md, ("x-padding", "a" * (MAX_METADATA_BYTES // 2)))
        over = (*md, ("x-padding", "a" * (MAX_METADATA_BYTES + 1000)))
        for _ in range(10):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.GetImage(GET_CENTOS, metadata=over, timeout=30)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "metadata" in (refused.value.details() or "")
            assert (await stub.GetImage(GET_CENTOS, metadata=under, timeout=30)).name == CENTOS


def test_the_defaults_keep_the_benchmarks_working() -> None:
    settings = Settings()
    options = dict(server_options(settings))
    assert options["grpc.max_concurrent_streams"] == settings.max_streams_per_connection >= 1000
    assert settings.max_concurrent_rpcs >= 2 * settings.max_streams_per_connection
    assert options["grpc.max_metadata_size"] >= 8 * 1024


def test_the_limits_come_from_the_environment() -> None:
    settings = Settings.from_env(
        environ={
            "BMS_IMAGE_MAX_STREAMS_PER_CONNECTION": "64",
            "BMS_IMAGE_MAX_CONCURRENT_RPCS": "500",
        }
    )
    assert (settings.max_streams_per_connection, settings.max_concurrent_rpcs) == (64, 500)
    assert dict(server_options(settings))["grpc.max_concurrent_streams"] == 64


@pytest.mark.parametrize("name", ["max_concurrent_rpcs", "max_streams_per_connection"])
async def test_a_limit_below_one_is_refused_at_start(tmp_path: Path, name: str) -> None:
    with pytest.raises(RuntimeError, match=f"BMS_IMAGE_{name.upper()} must be at least 1"):
        await start(make_settings(tmp_path, **{name: 0}))
