"""The BlobStore contract, checked against every backend (the `store` fixture
is LocalBlobStore and S3BlobStore in turn), then what only S3 has: multipart
uploads that must leave nothing behind when they fail, server-side multipart
copies, and sharing a bucket with other objects."""

from __future__ import annotations

import asyncio
import hashlib
import random
from pathlib import Path
from typing import Any

import pytest

from bms_image.common.errors import Unavailable
from bms_image.images.adapters.blobs import local as local_module
from bms_image.images.adapters.blobs.local import LocalBlobStore
from bms_image.images.adapters.blobs.s3 import (
    MAX_PARTS,
    MIN_PART_BYTES,
    BlobStoreRefused,
    S3BlobStore,
    part_size_for,
)
from bms_image.images.adapters.blobs.store import BlobNotFound, BlobStore

CHUNK = 64 * 1024
PART_BYTES = MIN_PART_BYTES  # as the s3_store fixture configures it
MULTIPART_SIZE = 12 * 1024 * 1024 + 12345  # three parts: 5 MiB, 5 MiB, the rest


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(size * 7919 + seed).randbytes(size)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_file(directory: Path, data: bytes, name: str = "upload") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(data)
    return path


async def put(store: BlobStore, key: str, data: bytes, tmp_path: Path) -> None:
    await store.put_file(key, write_file(tmp_path / "src", data, f"{key}.src"))


async def read_all(store: BlobStore, key: str, offset: int = 0, chunk: int = CHUNK) -> bytes:
    chunks = [c async for c in store.read(key, offset, chunk)]
    assert all(chunks), "no empty chunks"
    assert all(len(c) == chunk for c in chunks[:-1]), "every chunk but the last is full"
    assert not chunks or len(chunks[-1]) <= chunk
    return b"".join(chunks)


# -- the contract, for every backend ----------------------------------------


@pytest.mark.parametrize(
    "size",
    [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, PART_BYTES, PART_BYTES + 1, MULTIPART_SIZE],
    ids=["0", "1", "chunk-1", "chunk", "chunk+1", "part", "part+1", "multipart"],
)
async def test_put_file_then_read_round_trips(store: BlobStore, tmp_path: Path, size: int) -> None:
    data = payload(size)
    await put(store, "blob", data, tmp_path)

    assert await store.size("blob") == size
    assert sha256(await read_all(store, "blob")) == sha256(data)


async def test_read_from_an_offset(store: BlobStore, tmp_path: Path) -> None:
    data = payload(MULTIPART_SIZE)
    await put(store, "blob", data, tmp_path)

    for offset in [1, CHUNK - 1, CHUNK, PART_BYTES + 3, MULTIPART_SIZE - 1]:
        assert sha256(await read_all(store, "blob", offset)) == sha256(data[offset:]), offset


@pytest.mark.parametrize("size", [0, 10])
async def test_read_at_or_past_the_end_yields_nothing(
    store: BlobStore, tmp_path: Path, size: int
) -> None:
    await put(store, "blob", payload(size), tmp_path)

    assert await read_all(store, "blob", size) == b""
    assert await read_all(store, "blob", size + 5) == b""


async def test_read_honours_the_chunk_size(store: BlobStore, tmp_path: Path) -> None:
    data = payload(1000)
    await put(store, "blob", data, tmp_path)

    chunks = [c async for c in store.read("blob", 0, 300)]

    assert [len(c) for c in chunks] == [300, 300, 300, 100]
    assert b"".join(chunks) == data


async def test_an_abandoned_read_does_not_disturb_the_store(
    store: BlobStore, tmp_path: Path
) -> None:
    data = payload(4 * CHUNK)
    await put(store, "blob", data, tmp_path)

    for _ in range(3):
        reader = store.read("blob", 0, CHUNK)
        assert await anext(reader) == data[:CHUNK]
        await reader.aclose()  # what a client hanging up mid-download does

    assert await read_all(store, "blob") == data


async def test_missing_blob_raises_blob_not_found(store: BlobStore) -> None:
    with pytest.raises(BlobNotFound):
        await read_all(store, "missing")
    with pytest.raises(BlobNotFound):
        await read_all(store, "missing", 10)
    with pytest.raises(BlobNotFound):
        await store.size("missing")
    with pytest.raises(BlobNotFound):
        await store.copy("missing", "target")
    assert await store.keys() == []


@pytest.mark.parametrize(
    ("first", "second"),
    [(10, 3), (3, PART_BYTES + 1), (PART_BYTES + 1, PART_BYTES + 2), (CHUNK, 0)],
    ids=["smaller", "grows-to-multipart", "multipart-to-multipart", "to-empty"],
)
async def test_put_file_replaces_an_existing_blob(
    store: BlobStore, tmp_path: Path, first: int, second: int
) -> None:
    await put(store, "blob", payload(first, seed=1), tmp_path)
    replacement = payload(second, seed=2)

    await put(store, "blob", replacement, tmp_path)

    assert await store.size("blob") == second
    assert sha256(await read_all(store, "blob")) == sha256(replacement)
    assert await store.keys() == ["blob"]


@pytest.mark.parametrize("size", [0, 1000, PART_BYTES + 1])
async def test_copy(store: BlobStore, tmp_path: Path, size: int) -> None:
    data = payload(size)
    await put(store, "source", data, tmp_path)

    await store.copy("source", "target")

    assert sha256(await read_all(store, "target")) == sha256(data)
    assert sha256(await read_all(store, "source")) == sha256(data)
    assert await store.keys() == ["source", "target"]


async def test_copy_replaces_the_target_and_is_independent_of_the_source(
    store: BlobStore, tmp_path: Path
) -> None:
    await put(store, "source", b"new bytes", tmp_path)
    await put(store, "target", b"old bytes, longer", tmp_path)

    await store.copy("source", "target")
    await store.delete("source")

    assert await read_all(store, "target") == b"new bytes"


async def test_copy_onto_itself_keeps_the_blob(store: BlobStore, tmp_path: Path) -> None:
    await put(store, "blob", b"same", tmp_path)

    await store.copy("blob", "blob")

    assert await read_all(store, "blob") == b"same"


async def test_delete(store: BlobStore, tmp_path: Path) -> None:
    await put(store, "doomed", b"x" * 100, tmp_path)
    await put(store, "kept", b"y" * 100, tmp_path)

    await store.delete("doomed")

    with pytest.raises(BlobNotFound):
        await store.size("doomed")
    assert await store.keys() == ["kept"]
    assert await read_all(store, "kept") == b"y" * 100


async def test_delete_of_a_missing_blob_is_no_error(store: BlobStore, tmp_path: Path) -> None:
    await store.delete("never-there")
    await put(store, "once", b"1", tmp_path)
    await store.delete("once")
    await store.delete("once")

    assert await store.keys() == []


async def test_keys_lists_every_blob_sorted(store: BlobStore, tmp_path: Path) -> None:
    assert await store.keys() == []
    names = ["img-c", "img-a", "0f9e-uuid-like", "img-b"]
    for name in names:
        await put(store, name, name.encode(), tmp_path)

    assert await store.keys() == sorted(names)


async def test_ping(store: BlobStore) -> None:
    await store.ping()


@pytest.mark.parametrize("key", ["", "a/b", ".hidden", "../escape"])
async def test_invalid_keys_are_refused(store: BlobStore, tmp_path: Path, key: str) -> None:
    with pytest.raises(ValueError, match="invalid blob key"):
        await store.put_file(key, write_file(tmp_path, b"data"))
    with pytest.raises(ValueError, match="invalid blob key"):
        await store.size(key)


async def test_a_failed_put_file_keeps_the_previous_blob(
    store: BlobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = payload(1000)
    await put(store, "blob", old, tmp_path)

    class Injected(Exception):
        pass

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise Injected

    if isinstance(store, LocalBlobStore):
        monkeypatch.setattr(local_module.os, "replace", fail)
    else:
        assert isinstance(store, S3BlobStore)
        monkeypatch.setattr(store._s3, "upload_part", fail)
    source = write_file(tmp_path, payload(PART_BYTES + 1, seed=3))

    with pytest.raises(Injected):
        await store.put_file("blob", source)

    monkeypatch.undo()
    assert await read_all(store, "blob") == old
    assert await store.keys() == ["blob"]
    assert source.exists(), "the source survives a failed put_file, for a retry"


# -- S3 only -----------------------------------------------------------------


async def raw_object_keys(store: S3BlobStore) -> list[str]:
    """Every object in the store's bucket, under the prefix or not."""
    response = await store._s3.list_objects_v2(Bucket=store.bucket)
    return sorted(entry["Key"] for entry in response.get("Contents", []))


async def pending_uploads(store: S3BlobStore) -> list[Any]:
    response = await store._s3.list_multipart_uploads(Bucket=store.bucket)
    uploads: list[Any] = response.get("Uploads", [])
    return uploads


async def test_s3_objects_live_under_the_prefix(s3_store: S3BlobStore, tmp_path: Path) -> None:
    await put(s3_store, "blob", b"data", tmp_path)

    assert await raw_object_keys(s3_store) == ["images/blob"]


async def test_s3_put_file_consumes_the_source_like_the_local_store(
    s3_store: S3BlobStore, tmp_path: Path
) -> None:
    for size in (10, PART_BYTES + 1):
        source = write_file(tmp_path, payload(size))
        await s3_store.put_file("blob", source)
        assert not source.exists()


async def test_s3_multipart_upload_uses_parts_of_part_bytes(
    s3_store: S3BlobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = s3_store._s3
    real_upload_part = client.upload_part
    part_sizes: list[int] = []

    async def counting_upload_part(**kwargs: Any) -> Any:
        part_sizes.append(len(kwargs["Body"]))
        return await real_upload_part(**kwargs)

    monkeypatch.setattr(client, "upload_part", counting_upload_part)

    await put(s3_store, "blob", payload(MULTIPART_SIZE), tmp_path)

    assert part_sizes == [PART_BYTES, PART_BYTES, MULTIPART_SIZE - 2 * PART_BYTES]


async def test_s3_uploads_carry_content_md5_and_no_signed_payload_or_crc(
    s3_store: S3BlobStore, tmp_path: Path
) -> None:
    """What keeps uploads off the event loop and compatible with S3 clones:
    the body is not SHA-256 signed (hashing it would block the loop), no
    botocore >= 1.36 CRC/aws-chunked extras are sent, and a Content-MD5 lets
    the server verify the bytes (moto does not check it; S3, RGW, MinIO and
    OBS do)."""
    sent: list[dict[str, str]] = []

    def record(request: Any, **kwargs: Any) -> None:
        sent.append(
            {
                name.lower(): value.decode() if isinstance(value, bytes) else value
                for name, value in request.headers.items()
            }
        )

    s3_store._s3.meta.events.register("before-send.s3.PutObject", record)
    s3_store._s3.meta.events.register("before-send.s3.UploadPart", record)
    await put(s3_store, "small", b"small", tmp_path)
    await put(s3_store, "large", payload(PART_BYTES + 1), tmp_path)

    assert len(sent) == 3  # one PutObject, two UploadPart
    for lowered in sent:
        assert "content-md5" in lowered
        assert lowered["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"
        assert not any(name.startswith("x-amz-checksum") for name in lowered)
        assert "aws-chunked" not in lowered.get("content-encoding", "")


@pytest.mark.parametrize(
    ("failing_call", "failing_part"),
    [("upload_part", 1), ("upload_part", 3), ("complete_multipart_upload", 0)],
    ids=["first-part", "last-part", "complete"],
)
async def test_s3_failed_multipart_upload_leaves_no_object_and_no_upload(
    s3_store: S3BlobStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    failing_call: str,
    failing_part: int,
) -> None:
    client = s3_store._s3
    real_upload_part = client.upload_part

    async def upload_part_failing_at_one(**kwargs: Any) -> Any:
        if kwargs["PartNumber"] == failing_part:
            raise ConnectionResetError("injected failure")
        return await real_upload_part(**kwargs)

    async def failing_complete(**kwargs: Any) -> Any:
        raise ConnectionResetError("injected failure")

    if failing_call == "upload_part":
        monkeypatch.setattr(client, "upload_part", upload_part_failing_at_one)
    else:
        monkeypatch.setattr(client, "complete_multipart_upload", failing_complete)
    source = write_file(tmp_path, payload(MULTIPART_SIZE))

    with pytest.raises(Unavailable, match="cannot be reached"):  # retryable, fixed text
        await s3_store.put_file("blob", source)

    with pytest.raises(BlobNotFound):
        await s3_store.size("blob")
    assert await raw_object_keys(s3_store) == []
    assert await pending_uploads(s3_store) == []
    assert await s3_store.incomplete_uploads() == []
    assert source.exists()


async def test_s3_cancelled_multipart_upload_is_aborted(
    s3_store: S3BlobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = s3_store._s3
    real_upload_part = client.upload_part
    second_part_started = asyncio.Event()

    async def hanging_upload_part(**kwargs: Any) -> Any:
        if kwargs["PartNumber"] == 2:
            second_part_started.set()
            await asyncio.Event().wait()  # a stalled connection
        return await real_upload_part(**kwargs)

    monkeypatch.setattr(client, "upload_part", hanging_upload_part)
    upload = asyncio.create_task(
        s3_store.put_file("blob", write_file(tmp_path, payload(PART_BYTES + 1)))
    )
    await asyncio.wait_for(second_part_started.wait(), 10)
    assert len(await pending_uploads(s3_store)) == 1

    upload.cancel()
    with pytest.raises(asyncio.CancelledError):
        await upload

    assert await pending_uploads(s3_store) == []
    assert await raw_object_keys(s3_store) == []


async def test_s3_large_copy_uses_upload_part_copy(
    s3_store: S3BlobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Objects over 5 GiB need UploadPartCopy; the limit is lowered here so
    that a 12 MiB object takes that path."""
    monkeypatch.setattr(s3_store, "max_single_copy_bytes", PART_BYTES)
    monkeypatch.setattr(s3_store, "copy_part_bytes", PART_BYTES)
    client = s3_store._s3
    real_upload_part_copy = client.upload_part_copy
    ranges: list[str] = []

    async def recording_upload_part_copy(**kwargs: Any) -> Any:
        ranges.append(kwargs["CopySourceRange"])
        return await real_upload_part_copy(**kwargs)

    monkeypatch.setattr(client, "upload_part_copy", recording_upload_part_copy)
    data = payload(MULTIPART_SIZE)
    await put(s3_store, "source", data, tmp_path)

    await s3_store.copy("source", "target")

    last = MULTIPART_SIZE - 1
    assert ranges == [
        f"bytes=0-{PART_BYTES - 1}",
        f"bytes={PART_BYTES}-{2 * PART_BYTES - 1}",
        f"bytes={2 * PART_BYTES}-{last}",
    ]
    assert sha256(await read_all(s3_store, "target")) == sha256(data)
    assert await pending_uploads(s3_store) == []


async def test_s3_failed_multipart_copy_leaves_no_object_and_no_upload(
    s3_store: S3BlobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(s3_store, "max_single_copy_bytes", PART_BYTES)
    monkeypatch.setattr(s3_store, "copy_part_bytes", PART_BYTES)
    await put(s3_store, "source", payload(MULTIPART_SIZE), tmp_path)

    async def failing_upload_part_copy(**kwargs: Any) -> Any:
        raise ConnectionResetError("injected failure")

    monkeypatch.setattr(s3_store._s3, "upload_part_copy", failing_upload_part_copy)

    with pytest.raises(Unavailable, match="cannot be reached"):  # retryable, fixed text
        await s3_store.copy("source", "target")

    assert await raw_object_keys(s3_store) == ["images/source"]
    assert await pending_uploads(s3_store) == []


async def test_s3_keys_ignores_foreign_objects(s3_store: S3BlobStore, tmp_path: Path) -> None:
    client = s3_store._s3
    for foreign in ["images/", "images/nested/object", "elsewhere", "images-not-ours"]:
        await client.put_object(Bucket=s3_store.bucket, Key=foreign, Body=b"foreign")
    await put(s3_store, "blob", b"ours", tmp_path)

    assert await s3_store.keys() == ["blob"]


async def test_s3_keys_paginates(
    s3_store: S3BlobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(s3_store, "list_page_size", 7)
    client = s3_store._s3
    real_list = client.list_objects_v2
    pages = 0

    async def counting_list(**kwargs: Any) -> Any:
        nonlocal pages
        pages += 1
        return await real_list(**kwargs)

    monkeypatch.setattr(client, "list_objects_v2", counting_list)
    names = [f"blob-{i:02d}" for i in range(20)]
    await asyncio.gather(
        *(
            client.put_object(Bucket=s3_store.bucket, Key="images/" + name, Body=b"")
            for name in names
        )
    )

    assert await s3_store.keys() == names
    assert pages == 3


async def test_s3_stores_with_different_prefixes_share_a_bucket(
    s3_store: S3BlobStore, s3_endpoint: str, tmp_path: Path
) -> None:
    await put(s3_store, "blob", b"images", tmp_path)
    async with S3BlobStore(
        s3_store.bucket,
        endpoint_url=s3_endpoint,
        access_key="testing",
        secret_key="testing",
        prefix="other/",
    ) as other:
        await put(other, "blob", b"other", tmp_path)

        assert await other.keys() == ["blob"]
        assert await read_all(other, "blob") == b"other"
        await other.delete("blob")
    assert await read_all(s3_store, "blob") == b"images"


async def test_s3_abort_incomplete_uploads_sweeps_what_a_crash_left(
    s3_store: S3BlobStore,
) -> None:
    client = s3_store._s3
    await client.create_multipart_upload(Bucket=s3_store.bucket, Key="images/crashed")

    # moto reports every upload as initiated on 2010-11-10, so "too young to
    # abort" needs an age limit longer than that.
    assert await s3_store.abort_incomplete_uploads(older_than_seconds=100 * 365 * 86400) == 0
    assert len(await s3_store.incomplete_uploads()) == 1
    assert await s3_store.abort_incomplete_uploads() == 1
    assert await pending_uploads(s3_store) == []


async def test_s3_ensure_bucket_is_idempotent(s3_store: S3BlobStore) -> None:
    await s3_store.ensure_bucket()
    await s3_store.ping()


async def test_s3_ping_fails_without_the_bucket(
    s3_endpoint: str, isolated_aws_config: None
) -> None:
    async with S3BlobStore(
        "no-such-bucket-here",
        endpoint_url=s3_endpoint,
        access_key="testing",
        secret_key="testing",
    ) as store:
        with pytest.raises(BlobStoreRefused):  # what S3 said is logged, not raised
            await store.ping()


async def test_s3_store_must_be_opened_first() -> None:
    store = S3BlobStore("bucket", endpoint_url="http://127.0.0.1:9", part_bytes=PART_BYTES)
    with pytest.raises(RuntimeError, match="not open"):
        await store.size("blob")
    await store.close()  # closing an unopened store is harmless


def test_s3_part_bytes_must_respect_s3_limits() -> None:
    with pytest.raises(ValueError, match="part_bytes"):
        S3BlobStore("bucket", part_bytes=MIN_PART_BYTES - 1)


def test_part_size_grows_so_that_huge_files_fit_in_10000_parts() -> None:
    assert part_size_for(MULTIPART_SIZE, PART_BYTES) == PART_BYTES
    huge = 200 * 1024**3  # 200 GiB at 16 MiB parts would be 12 800 parts
    size = part_size_for(huge, 16 * 1024 * 1024)
    assert size > 16 * 1024 * 1024
    assert -(-huge // size) <= MAX_PARTS
