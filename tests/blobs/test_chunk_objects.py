"""The ChunkObjects contract, checked against every backend (the `backend`
fixture is LocalChunkObjects and S3ChunkObjects in turn), then what only the
local one has: temporary files, fsyncs, and its place beside the blobs."""

from __future__ import annotations

import os
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bms_image.common.errors import Unavailable
from bms_image.common.staging import fsync_directory
from bms_image.images.adapters.blobs.local import LocalBlobStore
from bms_image.images.adapters.blobs.s3 import S3BlobStore
from bms_image.images.adapters.chunks import objects as objects_module
from bms_image.images.adapters.chunks.chunking import CHUNK_BYTES, chunk_id, object_name
from bms_image.images.adapters.chunks.objects import ChunkMissing, ChunkObjects, LocalChunkObjects
from bms_image.images.adapters.chunks.s3 import S3ChunkObjects


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(size * 7919 + seed).randbytes(size)


def item(data: bytes, generation: int = 0) -> tuple[str, bytes]:
    """(object name, bytes) as the chunk store names them."""
    return object_name(chunk_id(data), f"{generation:016x}"), data


def items(count: int, size: int = 1000) -> list[tuple[str, bytes]]:
    return [item(payload(size, seed)) for seed in range(count)]


@dataclass
class Backend:
    objects: ChunkObjects
    #: A new instance on the same directory or bucket, as after a restart.
    reopen: Callable[[], AbstractAsyncContextManager[ChunkObjects]]


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Each backend in turn, empty. (A plain fixture: it asks for the async
    s3_store only when the S3 backend's turn comes.)"""
    if request.param == "local":
        root = tmp_path / "blobs" / "chunks"

        @asynccontextmanager
        async def reopen_local() -> AsyncIterator[ChunkObjects]:
            yield LocalChunkObjects(root)

        return Backend(LocalChunkObjects(root), reopen_local)
    store: S3BlobStore = request.getfixturevalue("s3_store")

    @asynccontextmanager
    async def reopen_s3() -> AsyncIterator[ChunkObjects]:
        async with S3BlobStore(
            store.bucket,
            endpoint_url=store.endpoint_url,
            access_key="testing",
            secret_key="testing",
            prefix=store.prefix,
        ) as fresh:
            yield S3ChunkObjects(fresh)

    return Backend(S3ChunkObjects(store), reopen_s3)


@pytest.fixture
def objects(backend: Backend) -> ChunkObjects:
    return backend.objects


async def test_put_then_get_round_trips(objects: ChunkObjects) -> None:
    stored = [item(b""), item(b"x"), item(payload(CHUNK_BYTES)), item(payload(12345))]

    await objects.put(stored)

    for name, data in stored:
        assert await objects.get(name) == data


async def test_put_replaces_an_object_of_the_same_name(objects: ChunkObjects) -> None:
    name, _ = item(b"old")

    await objects.put([(name, b"old")])
    await objects.put([(name, b"new, and longer")])

    assert await objects.get(name) == b"new, and longer"
    assert await objects.names() == [name]


async def test_a_put_of_several_objects_is_durable(backend: Backend) -> None:
    """What a put returned for is there for a new instance (a restart)."""
    stored = items(20)

    await backend.objects.put(stored)

    async with backend.reopen() as reopened:
        assert await reopened.names() == sorted(name for name, _ in stored)
        for name, data in stored:
            assert await reopened.get(name) == data


async def test_a_failed_put_leaves_each_object_whole_or_absent(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Atomic per object: the second object's write fails; every object is
    afterwards either all its bytes or missing (never a prefix of them), the
    object that failed is missing, and one stored before is unchanged."""
    objects = backend.objects
    before = item(b"stored before")
    await objects.put([before])
    stored = items(10, size=CHUNK_BYTES)
    calls = 0

    if isinstance(objects, LocalChunkObjects):
        real_replace = os.replace

        def failing_replace(source: Any, target: Any) -> None:
            nonlocal calls
            calls += 1
            if calls == 2:
                raise OSError("injected failure")
            real_replace(source, target)

        monkeypatch.setattr(os, "replace", failing_replace)
        expected: type[Exception] = OSError
        failed = stored[1][0]
    else:
        assert isinstance(objects, S3ChunkObjects)
        client = objects.store._s3
        real_put = client.put_object
        failed_keys: list[str] = []

        async def failing_put(**kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == 2:
                failed_keys.append(kwargs["Key"])
                raise ConnectionResetError("injected failure")
            return await real_put(**kwargs)

        monkeypatch.setattr(client, "put_object", failing_put)
        expected = Unavailable
        failed = ""

    with pytest.raises(expected):
        await objects.put(stored)
    monkeypatch.undo()

    if not failed:
        failed = failed_keys[0].rsplit("/", 1)[1]
    listed = await objects.names()
    assert failed not in listed
    for name, data in stored:
        try:
            assert await objects.get(name) == data, "whole"
            assert name in listed
        except ChunkMissing:
            assert name not in listed
    with pytest.raises(ChunkMissing):
        await objects.get(failed)
    assert await objects.get(before[0]) == before[1]


async def test_names_lists_exactly_what_was_put(objects: ChunkObjects) -> None:
    assert await objects.names() == []
    stored = items(30)
    # Names that share their first two hex digits land in one folder.
    same_folder = [item(b"same", generation) for generation in range(3)]

    await objects.put(stored[:10])
    await objects.put(stored[10:] + same_folder)

    assert await objects.names() == sorted(name for name, _ in stored + same_folder)


async def test_delete(objects: ChunkObjects) -> None:
    stored = items(5)
    await objects.put(stored)

    await objects.delete([stored[0][0], stored[3][0]])

    assert await objects.names() == sorted(name for name, _ in [*stored[1:3], stored[4]])
    with pytest.raises(ChunkMissing):
        await objects.get(stored[0][0])
    assert await objects.get(stored[1][0]) == stored[1][1]


async def test_delete_ignores_missing_names_and_an_empty_list(objects: ChunkObjects) -> None:
    stored = items(2)
    await objects.put(stored)

    await objects.delete([item(b"never stored")[0], stored[0][0], stored[0][0]])
    await objects.delete([])

    assert await objects.names() == [stored[1][0]]


async def test_exists_says_which_objects_are_there(objects: ChunkObjects) -> None:
    stored = items(2)
    await objects.put(stored)
    await objects.delete([stored[0][0]])

    assert not await objects.exists(stored[0][0])
    assert await objects.exists(stored[1][0])
    assert not await objects.exists(item(b"never stored")[0])
    assert objects.requests["HEAD"] >= 3


async def test_a_missing_object_is_chunk_missing(objects: ChunkObjects) -> None:
    name, _ = item(b"never stored")

    with pytest.raises(ChunkMissing, match=name):
        await objects.get(name)


async def test_an_empty_put_is_no_error(objects: ChunkObjects) -> None:
    await objects.put([])

    assert await objects.names() == []


@pytest.mark.parametrize("name", ["", "ab/cd", ".tmp-x", "..", "../escape"])
async def test_invalid_names_are_refused(objects: ChunkObjects, name: str) -> None:
    with pytest.raises(ValueError, match="invalid chunk object name"):
        await objects.put([(name, b"data")])
    with pytest.raises(ValueError, match="invalid chunk object name"):
        await objects.get(name)
    with pytest.raises(ValueError, match="invalid chunk object name"):
        await objects.delete([name])
    assert await objects.names() == []


async def test_an_invalid_name_refuses_the_whole_put(objects: ChunkObjects) -> None:
    with pytest.raises(ValueError):
        await objects.put([item(b"valid"), ("in/valid", b"data")])

    assert await objects.names() == []


async def test_ping(objects: ChunkObjects) -> None:
    await objects.ping()


# -- local only --------------------------------------------------------------


def temp_files(root: Path) -> list[Path]:
    return sorted(root.glob("*/.tmp-*"))


async def test_local_temp_files_of_a_crashed_put_are_not_listed(tmp_path: Path) -> None:
    """A crash between writing and renaming leaves `.tmp-` files: never
    listed, and removed once old enough to belong to no put in progress."""
    objects = LocalChunkObjects(tmp_path / "chunks")
    stored = item(b"stored")
    await objects.put([stored])
    folder = tmp_path / "chunks" / stored[0][:2]
    young = folder / ".tmp-young"
    old = folder / ".tmp-old"
    young.write_bytes(b"a put in progress")
    old.write_bytes(b"a crashed put")
    an_hour_and_more_ago = time.time() - 3700
    os.utime(old, (an_hour_and_more_ago, an_hour_and_more_ago))

    assert await objects.names() == [stored[0]]
    assert young.exists(), "a put in progress keeps its file"
    assert not old.exists(), "a crash's leftover is swept"


async def test_local_failed_put_leaves_no_temp_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = LocalChunkObjects(tmp_path / "chunks")
    real_write = os.write
    writes = 0

    def failing_write(fd: int, data: Any) -> int:
        nonlocal writes
        writes += 1
        if writes == 3:
            raise OSError("injected failure")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", failing_write)
    with pytest.raises(OSError, match="injected"):
        await objects.put(items(5))
    monkeypatch.undo()

    assert temp_files(tmp_path / "chunks") == []
    assert await objects.names() == []


async def test_local_put_fsyncs_every_file_then_every_folder_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Durable: each file's bytes are fsynced before its rename, and each
    folder touched after the renames, so a power cut after put returns keeps
    every object."""
    objects = LocalChunkObjects(tmp_path / "chunks")
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def recording_fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if not os.path.isdir(path):  # fsync_directory's own fsync is recorded apart
            events.append(("fsync", path))
        real_fsync(fd)

    def recording_replace(source: Any, target: Any) -> None:
        events.append(("replace", str(source)))
        real_replace(source, target)

    def recording_fsync_directory(directory: Path) -> None:
        events.append(("fsync_directory", str(directory)))
        fsync_directory(directory)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    monkeypatch.setattr(objects_module, "fsync_directory", recording_fsync_directory)
    stored = [item(b"same", 0), item(b"same", 1), item(b"other")]

    await objects.put(stored)
    monkeypatch.undo()

    kinds = [kind for kind, _ in events]
    assert kinds.count("fsync") == 3
    fsynced = {path for kind, path in events if kind == "fsync"}
    replaced = [path for kind, path in events if kind == "replace"]
    assert set(replaced) == fsynced, "every renamed file was fsynced"
    assert max(i for i, k in enumerate(kinds) if k == "fsync") < kinds.index("replace")
    folders = [path for kind, path in events if kind == "fsync_directory"]
    assert sorted(folders) == sorted({str(tmp_path / "chunks" / name[:2]) for name, _ in stored})
    assert min(i for i, k in enumerate(kinds) if k == "fsync_directory") > max(
        i for i, k in enumerate(kinds) if k == "replace"
    )


async def test_local_chunk_objects_are_apart_from_the_blobs(tmp_path: Path) -> None:
    """LocalChunkObjects lives in <blobs root>/chunks/: the blob store lists
    only `*.blob` files of its root, and the chunk objects only their own
    folders, so neither sees (or sweeps) the other's files."""
    blobs = LocalBlobStore(tmp_path / "blobs")
    objects = LocalChunkObjects(tmp_path / "blobs" / "chunks")
    source = tmp_path / "upload"
    source.write_bytes(b"a blob")
    await blobs.put_file(f"image-{uuid.uuid4()}", source)
    blob_keys = await blobs.keys()
    stored = items(5)

    await objects.put(stored)

    assert await blobs.keys() == blob_keys
    assert await objects.names() == sorted(name for name, _ in stored)
    await objects.delete([name for name, _ in stored])
    assert await blobs.keys() == blob_keys
    # A blob store opened on the same root (a restart) leaves chunks/ alone.
    await objects.put(stored)
    reopened = LocalBlobStore(tmp_path / "blobs")
    assert await reopened.keys() == blob_keys
    assert await objects.names() == sorted(name for name, _ in stored)
