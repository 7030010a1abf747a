"""What only S3ChunkObjects has, against a real S3 protocol server (moto):
the objects' keys beside the blobs, concurrent PUTs with Content-MD5, the
requests counted per kind, DeleteObjects batches and their per-key errors,
and the fixed-text errors of a store that cannot be reached. The contract
both backends share is in test_chunk_objects.py."""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bms_image.common.errors import Unavailable
from bms_image.images.adapters.blobs.s3 import BlobStoreRefused, S3BlobStore
from bms_image.images.adapters.blobs.store import store_unavailable
from bms_image.images.adapters.chunks.chunking import CHUNK_BYTES, chunk_id, object_name
from bms_image.images.adapters.chunks.objects import ChunkMissing
from bms_image.images.adapters.chunks.s3 import S3ChunkObjects


def item(data: bytes, generation: int = 0) -> tuple[str, bytes]:
    return object_name(chunk_id(data), f"{generation:016x}"), data


def items(count: int) -> list[tuple[str, bytes]]:
    return [item(f"chunk {i}".encode()) for i in range(count)]


async def raw_object_keys(store: S3BlobStore) -> list[str]:
    response = await store._s3.list_objects_v2(Bucket=store.bucket)
    return sorted(entry["Key"] for entry in response.get("Contents", []))


async def put_blob(store: S3BlobStore, key: str, data: bytes, tmp_path: Path) -> None:
    source = tmp_path / f"{key}.src"
    source.write_bytes(data)
    await store.put_file(key, source)


@pytest.fixture
def objects(s3_store: S3BlobStore) -> S3ChunkObjects:
    return S3ChunkObjects(s3_store)


async def test_objects_live_under_the_chunks_sub_prefix(
    objects: S3ChunkObjects, s3_store: S3BlobStore
) -> None:
    stored = items(3)

    await objects.put(stored)

    assert await raw_object_keys(s3_store) == sorted(
        f"images/chunks/{name[:2]}/{name}" for name, _ in stored
    )


async def test_blob_keys_do_not_list_chunk_objects(
    objects: S3ChunkObjects, s3_store: S3BlobStore, tmp_path: Path
) -> None:
    """The chunk store shares the blob store's prefix: its objects must never
    look like blobs (or a sweep of orphaned blobs would delete them)."""
    await put_blob(s3_store, "image-1", b"a blob", tmp_path)
    stored = items(5)

    await objects.put(stored)

    assert await s3_store.keys() == ["image-1"]
    assert await objects.names() == sorted(name for name, _ in stored)
    await objects.delete([name for name, _ in stored])
    assert await s3_store.keys() == ["image-1"]
    assert await raw_object_keys(s3_store) == ["images/image-1"]


async def test_blob_store_refuses_the_key_of_the_chunks_sub_prefix(
    s3_store: S3BlobStore, tmp_path: Path
) -> None:
    source = tmp_path / "upload"
    source.write_bytes(b"data")

    with pytest.raises(ValueError, match="invalid blob key"):
        await s3_store.put_file("chunks", source)
    await put_blob(s3_store, "chunks-not-the-sub-prefix", b"data", tmp_path)
    assert await s3_store.keys() == ["chunks-not-the-sub-prefix"]


async def test_names_skips_objects_that_are_not_chunk_objects(
    objects: S3ChunkObjects, s3_store: S3BlobStore
) -> None:
    """Folder markers (web consoles create them), hidden or misplaced
    objects under chunks/ are no chunk objects, and blobs are not either."""
    stored = item(b"stored")
    await objects.put([stored])
    name = stored[0]
    misplaced = f"images/chunks/zz/{name}"
    for foreign in [
        "images/chunks/",
        f"images/chunks/{name[:2]}/",
        f"images/chunks/{name[:2]}/.hidden",
        f"images/chunks/{name}",
        misplaced,
        f"images/chunks/{name[:2]}/deeper/{name}",
        "images/chunks-else/ab/abc",
        f"other/chunks/{name[:2]}/{name}",
    ]:
        await s3_store._s3.put_object(Bucket=s3_store.bucket, Key=foreign, Body=b"foreign")

    assert await objects.names() == [name]


async def test_names_paginates(
    objects: S3ChunkObjects, s3_store: S3BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(s3_store, "list_page_size", 3)
    stored = items(10)
    await objects.put(stored)
    objects.requests.clear()

    assert await objects.names() == sorted(name for name, _ in stored)
    assert objects.requests == Counter({"LIST": 4})


async def test_requests_are_counted_per_kind(
    objects: S3ChunkObjects, s3_store: S3BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(s3_store, "delete_batch_size", 2)
    stored = items(5)

    await objects.put(stored)
    await objects.put([])
    await objects.get(stored[0][0])
    with pytest.raises(ChunkMissing):
        await objects.get(item(b"never stored")[0])
    await objects.names()
    await objects.delete([name for name, _ in stored])
    await objects.delete([])
    await objects.ping()

    assert objects.requests == Counter({"PUT": 5, "GET": 2, "LIST": 1, "DELETE": 3, "HEAD": 1})


async def test_delete_sends_batches_of_delete_batch_size(
    objects: S3ChunkObjects, s3_store: S3BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(s3_store, "delete_batch_size", 4)
    client = s3_store._s3
    real_delete = client.delete_objects
    batches: list[int] = []

    async def recording_delete(**kwargs: Any) -> Any:
        batches.append(len(kwargs["Delete"]["Objects"]))
        return await real_delete(**kwargs)

    monkeypatch.setattr(client, "delete_objects", recording_delete)
    stored = items(10)
    await objects.put(stored)

    await objects.delete([name for name, _ in stored])

    assert batches == [4, 4, 2]
    assert await objects.names() == []


def test_delete_batch_size_is_s3s_maximum() -> None:
    assert S3BlobStore.delete_batch_size == 1000


@pytest.mark.parametrize(
    ("code", "expected"),
    [("AccessDenied", BlobStoreRefused), ("InternalError", Unavailable), ("SlowDown", Unavailable)],
)
async def test_delete_fails_on_a_per_key_error(
    objects: S3ChunkObjects,
    s3_store: S3BlobStore,
    monkeypatch: pytest.MonkeyPatch,
    code: str,
    expected: type[Exception],
) -> None:
    """DeleteObjects answers 200 with a list of the keys it could not
    delete; those errors must not pass silently."""
    stored = items(2)
    await objects.put(stored)

    async def partly_failing_delete(**kwargs: Any) -> Any:
        first = kwargs["Delete"]["Objects"][0]["Key"]
        return {"Errors": [{"Key": first, "Code": code, "Message": "injected"}]}

    monkeypatch.setattr(s3_store._s3, "delete_objects", partly_failing_delete)

    with pytest.raises(expected):
        await objects.delete([name for name, _ in stored])


async def test_delete_ignores_a_per_key_no_such_key(
    objects: S3ChunkObjects, s3_store: S3BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def answering_no_such_key(**kwargs: Any) -> Any:
        keys = [entry["Key"] for entry in kwargs["Delete"]["Objects"]]
        return {"Errors": [{"Key": key, "Code": "NoSuchKey"} for key in keys]}

    monkeypatch.setattr(s3_store._s3, "delete_objects", answering_no_such_key)

    await objects.delete([item(b"gone")[0]])


async def test_put_runs_put_concurrency_requests_at_once(
    s3_store: S3BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = s3_store._s3
    real_put = client.put_object
    in_flight = 0
    most = 0

    async def slow_put(**kwargs: Any) -> Any:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            await asyncio.sleep(0.01)
            return await real_put(**kwargs)
        finally:
            in_flight -= 1

    monkeypatch.setattr(client, "put_object", slow_put)
    for concurrency in (8, 3, 1):
        objects = S3ChunkObjects(s3_store, put_concurrency=concurrency)
        most = 0
        stored = items(20)

        await objects.put(stored)

        assert most == concurrency
        assert objects.requests["PUT"] == 20
        assert await objects.names() == sorted(name for name, _ in stored)


def test_put_concurrency_must_be_positive(s3_store: S3BlobStore) -> None:
    with pytest.raises(ValueError, match="put_concurrency"):
        S3ChunkObjects(s3_store, put_concurrency=0)


async def test_a_failed_put_cancels_the_puts_in_flight(
    objects: S3ChunkObjects, s3_store: S3BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One PUT failing fails the put with the translated error (not an
    exception group), and the other PUTs stop: no new one starts."""
    client = s3_store._s3
    real_put = client.put_object
    started = 0
    hanging = asyncio.Event()

    async def failing_put(**kwargs: Any) -> Any:
        nonlocal started
        started += 1
        if started == 1:
            raise ConnectionResetError("injected failure")
        await hanging.wait()  # stalled connections
        return await real_put(**kwargs)

    monkeypatch.setattr(client, "put_object", failing_put)

    with pytest.raises(Unavailable, match="cannot be reached"):
        await objects.put(items(20))

    # The workers still hashing their first object when the failure came
    # never sent it.
    assert 1 <= started <= objects.put_concurrency
    monkeypatch.undo()
    hanging.set()
    await asyncio.sleep(0.05)
    assert await objects.names() == []


async def test_puts_carry_content_md5_and_no_signed_payload_or_crc(
    objects: S3ChunkObjects, s3_store: S3BlobStore
) -> None:
    sent: list[dict[str, str]] = []

    def record(request: Any, **kwargs: Any) -> None:
        sent.append(
            {
                name.lower(): value.decode() if isinstance(value, bytes) else value
                for name, value in request.headers.items()
            }
        )

    s3_store._s3.meta.events.register("before-send.s3.PutObject", record)
    await objects.put([item(b"small"), item(bytes(CHUNK_BYTES))])

    assert len(sent) == 2
    for lowered in sent:
        assert "content-md5" in lowered
        assert lowered["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"
        assert not any(name.startswith("x-amz-checksum") for name in lowered)


async def test_get_of_a_missing_object_under_another_generation_is_chunk_missing(
    objects: S3ChunkObjects,
) -> None:
    """A chunk stored again after it was freed has a new generation: the old
    generation's name finds nothing, although the chunk id is the same."""
    data = b"stored twice"
    await objects.put([item(data, generation=2)])

    with pytest.raises(ChunkMissing):
        await objects.get(item(data, generation=1)[0])
    assert await objects.get(item(data, generation=2)[0]) == data


@pytest.mark.parametrize(
    "name",
    [
        "",
        "x",
        "chunks",
        "chunks/",
        "chunks/.hidden",
        "chunks//x",
        ".bms-image-deployment",
        "a/../b",
    ],
)
async def test_the_store_refuses_names_outside_a_sub_prefix(
    s3_store: S3BlobStore, name: str
) -> None:
    """The object methods never reach a blob, the deployment marker, or
    anything outside the prefix."""
    with pytest.raises(ValueError, match="invalid object name"):
        await s3_store.put_object(name, b"data")
    with pytest.raises(ValueError, match="invalid object name"):
        await s3_store.get_object(name)
    with pytest.raises(ValueError, match="invalid object name"):
        await s3_store.delete_objects([name])
    assert await raw_object_keys(s3_store) == []


async def test_list_object_keys_needs_a_sub_prefix(s3_store: S3BlobStore) -> None:
    for sub_prefix in ["", "chunks", "/", ".hidden/"]:
        with pytest.raises(ValueError):
            await s3_store.list_object_keys(sub_prefix)


# -- a store that cannot be reached -----------------------------------------


@pytest.fixture
async def unreachable(isolated_aws_config: None) -> AsyncIterator[S3ChunkObjects]:
    """Chunk objects on a loopback port nobody listens on (connections are
    refused at once); one attempt per request keeps the test fast."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with S3BlobStore(
        "bucket",
        endpoint_url=f"http://127.0.0.1:{port}",
        access_key="testing",
        secret_key="testing",
        max_attempts=1,
    ) as store:
        yield S3ChunkObjects(store)


async def test_an_unreachable_store_is_unavailable_with_a_fixed_text(
    unreachable: S3ChunkObjects,
) -> None:
    name, data = item(b"data")
    expected = store_unavailable()
    calls = [
        unreachable.put([(name, data)]),
        unreachable.get(name),
        unreachable.delete([name]),
        unreachable.names(),
        unreachable.ping(),
    ]

    for call in calls:
        with pytest.raises(Unavailable) as raised:
            await call
        assert raised.value.reason == expected.reason
        assert str(raised.value) == str(expected)  # no host, port or key
        assert "127.0.0.1" not in str(raised.value)
    assert unreachable.requests == Counter({"PUT": 1, "GET": 1, "DELETE": 1, "LIST": 0, "HEAD": 1})


def test_max_attempts_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        S3BlobStore("bucket", max_attempts=0)


@pytest.mark.parametrize("attempts", [1, 3])
async def test_an_overloaded_store_gets_exactly_max_attempts_tries(
    attempts: int, isolated_aws_config: None
) -> None:
    """BMS_IMAGE_S3_MAX_ATTEMPTS: a store that answers 503 to everything is
    asked `attempts` times per request, the first try included (botocore's
    own `max_attempts` counts only the retries), then the call is
    UNAVAILABLE."""
    tries = 0

    async def overloaded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal tries
        while await reader.readline() not in (b"\r\n", b""):
            pass  # the request's head (HEAD has no body)
        tries += 1
        writer.write(b"HTTP/1.1 503 Slow Down\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(overloaded, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with S3BlobStore(
            "bucket",
            endpoint_url=f"http://127.0.0.1:{port}",
            access_key="testing",
            secret_key="testing",
            max_attempts=attempts,
        ) as store:
            with pytest.raises(Unavailable):
                await S3ChunkObjects(store).ping()
    finally:
        server.close()
        await server.wait_closed()
    assert tries == attempts
