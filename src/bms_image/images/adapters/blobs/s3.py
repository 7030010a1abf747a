"""Blobs as objects in an S3-compatible bucket (AWS S3, Huawei OBS, Ceph RGW,
MinIO), through one long-lived aiobotocore client.

Atomicity comes from S3 itself: an object appears under its key only when a
PUT or a CompleteMultipartUpload succeeds, so a crash mid-upload never leaves
a partial blob. What a crash *can* leave is an incomplete multipart upload
(invisible, but its parts use storage): `put_file` aborts its upload on any
error or cancellation, `abort_incomplete_uploads` sweeps those a crash left,
and a bucket lifecycle rule (AbortIncompleteMultipartUpload) is the backstop.

Nothing blocks the event loop: file reads and MD5 digests run in threads,
payload SHA-256 signing is switched off (each body carries a Content-MD5 the
server verifies instead), and the botocore service model is loaded in a
thread when the client is created.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import logging
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Literal, ParamSpec, TypeVar

from aiobotocore.config import AioConfig  # type: ignore[import-untyped]
from aiobotocore.session import get_session  # type: ignore[import-untyped]
from aiohttp import ClientError as HttpClientError
from botocore.exceptions import (  # type: ignore[import-untyped]
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from bms_image.images.adapters.blobs.store import (
    DEFAULT_CHUNK_BYTES,
    DEPLOYMENT_MARKER,
    BlobNotFound,
    PrefixOwned,
    storage_full,
    store_unavailable,
)

log = logging.getLogger(__name__)

MiB = 1024 * 1024
GiB = 1024 * MiB

#: S3's limits on multipart uploads: every part but the last is at least
#: 5 MiB, no part exceeds 5 GiB, and an upload has at most 10 000 parts.
MIN_PART_BYTES = 5 * MiB
MAX_PART_BYTES = 5 * GiB
MAX_PARTS = 10_000

#: Error codes meaning "no such object". HEAD responses have no body, so a
#: missing key there shows up only as the HTTP status.
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_NO_BUCKET_CODES = frozenset({"NoSuchBucket", "404", "NotFound"})

#: Error codes of a store that is overloaded or down for now (any 5xx too):
#: the same request may succeed later.
_UNAVAILABLE_CODES = frozenset(
    {
        "SlowDown",
        "ServiceUnavailable",
        "InternalError",
        "RequestTimeout",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "ServerBusy",
    }
)
#: Error codes (and the HTTP status) of a store out of space: Ceph RGW
#: answers QuotaExceeded, MinIO XMinioStorageFull, WebDAV-style stores 507.
_FULL_CODES = frozenset({"QuotaExceeded", "XMinioStorageFull", "InsufficientStorage"})
_INSUFFICIENT_STORAGE = 507
#: Failures to reach the store at all: refused or reset connections,
#: connect and read timeouts, a body cut off mid-stream.
_UNREACHABLE = (
    BotoConnectionError,
    HTTPClientError,
    IncompleteReadError,
    HttpClientError,
    ConnectionError,
    TimeoutError,
)

#: Where the chunk store keeps its objects (chunks.s3.S3ChunkObjects): a
#: sub-prefix of the blob store's prefix, in the same bucket. Blob keys never
#: contain "/", so no blob is ever inside it, and `keys()` lists only what is
#: directly under the prefix.
CHUNKS_SUB_PREFIX = "chunks/"
#: Blob keys refused although well-formed: the name of a sub-prefix. S3
#: itself keeps an object "chunks" apart from objects under "chunks/", but
#: stores that map keys to files (MinIO's file system mode, OBS parallel file
#: systems) cannot hold both.
_RESERVED_KEYS = frozenset({CHUNKS_SUB_PREFIX.rstrip("/")})

AddressingStyle = Literal["auto", "path", "virtual"]
P = ParamSpec("P")
R = TypeVar("R")


class BlobStoreRefused(Exception):
    """The store refused a request for a reason retrying will not cure
    (credentials, permissions, a missing bucket): a fault of our deployment.
    Its text is fixed; what the store said is in the service log."""

    def __init__(self) -> None:
        super().__init__("the image store refused a request; the service logged why")


@contextlib.contextmanager
def _faults(what: str) -> Iterator[None]:
    """Turns what botocore and aiohttp raise into errors with fixed texts:
    UNAVAILABLE (retryable) for a store that cannot be reached or is
    overloaded, STORAGE_FULL for one out of space, BlobStoreRefused for the
    rest. Their own messages (endpoints, keys, request ids) go to the log
    only. Other exceptions (BlobNotFound, domain errors) pass unchanged."""
    try:
        yield
    except ClientError as error:
        code = _error_code(error)
        status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        log.warning("S3 %s failed: %s", what, error)
        if code in _FULL_CODES or status == _INSUFFICIENT_STORAGE:
            raise storage_full("image store") from None
        if code in _UNAVAILABLE_CODES or status >= 500:
            raise store_unavailable() from None
        raise BlobStoreRefused() from None
    except _UNREACHABLE as error:
        log.warning("S3 %s failed: %s: %s", what, type(error).__name__, error)
        raise store_unavailable() from None
    except BotoCoreError as error:
        log.warning("S3 %s failed: %s: %s", what, type(error).__name__, error)
        raise BlobStoreRefused() from None


def _error_code(error: Any) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _is_not_found(error: Any) -> bool:
    return _error_code(error) in _NOT_FOUND_CODES


def _check_key(key: str) -> None:
    # The same rule as LocalBlobStore, so that a key valid for one backend is
    # valid for the other (and "a/b" cannot reach outside the prefix), plus
    # the names of sub-prefixes (blob keys are image ids, never "chunks").
    if not key or "/" in key or key.startswith(".") or key in _RESERVED_KEYS:
        raise ValueError(f"invalid blob key {key!r}")


def _check_nested_name(name: str) -> None:
    """A name under a sub-prefix ("chunks/ab/<name>"): two or more segments,
    none empty or starting with ".", so it is never a blob key, never the
    deployment marker, and cannot climb out of the prefix."""
    segments = name.split("/")
    if len(segments) < 2 or any(not segment or segment.startswith(".") for segment in segments):
        raise ValueError(f"invalid object name {name!r}")


def _count(requests: Counter[str] | None, kind: str) -> None:
    if requests is not None:
        requests[kind] += 1


def _content_md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode("ascii")


def _read_block(handle: BinaryIO, size: int) -> tuple[bytes, str]:
    """The next block of the file and its Content-MD5. Blocking."""
    data = handle.read(size)
    return data, _content_md5(data)


def _read_whole(path: Path) -> tuple[bytes, str]:
    data = path.read_bytes()
    return data, _content_md5(data)


@functools.cache
def _session() -> Any:
    """One botocore session per process: it caches the parsed S3 service
    model (a quarter of a second to load), so later clients start fast."""
    return get_session()


def part_size_for(total_bytes: int, preferred_bytes: int) -> int:
    """The part size to use for an object of total_bytes: the preferred size,
    grown when needed so that the object fits in MAX_PARTS parts."""
    return max(preferred_bytes, MIN_PART_BYTES, math.ceil(total_bytes / MAX_PARTS))


def _translated(
    what: str,
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Coroutine[Any, Any, R]]]:
    """A coroutine method whose failures go through `_faults`."""

    def decorate(method: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
        @functools.wraps(method)
        async def translated(*args: P.args, **kwargs: P.kwargs) -> R:
            with _faults(what):
                return await method(*args, **kwargs)

        return translated

    return decorate


class S3BlobStore:
    """Blobs stored as objects named `prefix + key` in one bucket.

    Call `open()` (or use `async with`) before anything else and `close()` at
    shutdown; the store keeps one client (and its connection pool) in between.
    """

    name = "s3"

    #: Objects up to this size are copied with one CopyObject request (S3's
    #: limit for it); larger ones with a multipart UploadPartCopy.
    max_single_copy_bytes = 5 * GiB
    #: Part size for a multipart copy. The copy happens inside the object
    #: store, so big parts only mean fewer requests.
    copy_part_bytes = 512 * MiB
    #: Keys per ListObjectsV2 page (1000 is S3's maximum).
    list_page_size = 1000
    #: Keys per DeleteObjects request (1000 is S3's maximum).
    delete_batch_size = 1000

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key: str | None = None,
        secret_key: str | None = None,
        prefix: str = "images/",
        part_bytes: int = 16 * MiB,
        addressing_style: AddressingStyle = "path",
        max_connections: int = 64,
        max_attempts: int = 5,
    ) -> None:
        """`endpoint_url` None means AWS S3 itself; `access_key`/`secret_key`
        None means botocore's default credential chain (environment, instance
        profile, ...). `addressing_style` "path" (bucket in the URL path) works
        with every S3-compatible store, whatever their DNS setup; "virtual"
        (bucket in the host name) is what AWS prefers. Each download in
        progress holds one of `max_connections` pooled connections for as long
        as it streams. `max_attempts` counts a request's first try: botocore
        retries throttling, 5xx answers and connection failures, with
        backoff, up to it."""
        if not bucket:
            raise ValueError("the S3 bucket name is empty")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {max_attempts}")
        if not MIN_PART_BYTES <= part_bytes <= MAX_PART_BYTES:
            raise ValueError(
                f"part_bytes must be between {MIN_PART_BYTES} and {MAX_PART_BYTES}, "
                f"not {part_bytes}"
            )
        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self.region = region
        self.prefix = prefix
        self.part_bytes = part_bytes
        self._access_key = access_key
        self._secret_key = secret_key
        self._addressing_style = addressing_style
        self._max_connections = max_connections
        self._max_attempts = max_attempts
        self._client: Any = None
        self._exit_stack: AsyncExitStack | None = None

    def __repr__(self) -> str:
        return (
            f"S3BlobStore(bucket={self.bucket!r}, endpoint_url={self.endpoint_url!r}, "
            f"prefix={self.prefix!r})"
        )

    # -- lifecycle -------------------------------------------------------------

    async def open(self) -> None:
        """Creates the client. Does not contact the server (see `ping`)."""
        if self._client is not None:
            return
        config = AioConfig(
            region_name=self.region,
            s3={
                "addressing_style": self._addressing_style,
                # Signing would SHA-256 every body on the event loop (always,
                # over plain http); each body carries a Content-MD5 instead.
                "payload_signing_enabled": False,
            },
            # botocore >= 1.36 adds CRC checksums (and aws-chunked trailers)
            # by default, which several S3-compatible stores reject.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            # botocore's `max_attempts` counts the retries, not the first try:
            # `total_max_attempts` is what this store's `max_attempts` means.
            retries={"mode": "standard", "total_max_attempts": self._max_attempts},
            max_pool_connections=self._max_connections,
            connect_timeout=10,
            read_timeout=60,
            tcp_keepalive=True,
            # Loads the (large) S3 service model in a thread, not on the loop.
            warm_up_loader_caches=True,
        )
        stack = AsyncExitStack()
        try:
            self._client = await stack.enter_async_context(
                _session().create_client(
                    "s3",
                    region_name=self.region,
                    endpoint_url=self.endpoint_url,
                    aws_access_key_id=self._access_key,
                    aws_secret_access_key=self._secret_key,
                    config=config,
                )
            )
        except BaseException:
            await stack.aclose()
            raise
        self._exit_stack = stack

    async def close(self) -> None:
        stack, self._exit_stack, self._client = self._exit_stack, None, None
        if stack is not None:
            await stack.aclose()

    async def __aenter__(self) -> S3BlobStore:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def _s3(self) -> Any:
        if self._client is None:
            raise RuntimeError("S3BlobStore is not open: call `await store.open()` first")
        return self._client

    def _object_key(self, key: str) -> str:
        _check_key(key)
        return self.prefix + key

    # -- the BlobStore protocol ------------------------------------------------

    @_translated("put")
    async def put_file(self, key: str, path: Path) -> None:
        """Uploads the file, then deletes it (as LocalBlobStore moves it away).
        On failure the file stays and no object (and no incomplete upload) is
        left under the key; a blob already there stays as it was."""
        object_key = self._object_key(key)
        size = (await asyncio.to_thread(path.stat)).st_size
        if size <= self.part_bytes:
            data, md5 = await asyncio.to_thread(_read_whole, path)
            await self._s3.put_object(Bucket=self.bucket, Key=object_key, Body=data, ContentMD5=md5)
        else:
            await self._put_multipart(object_key, path, part_size_for(size, self.part_bytes))
        await asyncio.to_thread(path.unlink, missing_ok=True)

    async def _put_multipart(self, object_key: str, path: Path, part_bytes: int) -> None:
        handle = await asyncio.to_thread(open, path, "rb")
        try:
            upload = await self._s3.create_multipart_upload(Bucket=self.bucket, Key=object_key)
            upload_id: str = upload["UploadId"]
            try:
                parts: list[dict[str, Any]] = []
                while True:
                    data, md5 = await asyncio.to_thread(_read_block, handle, part_bytes)
                    if not data and parts:
                        break
                    number = len(parts) + 1
                    if number > MAX_PARTS:  # the file grew while being uploaded
                        raise ValueError(f"{path} needs more than {MAX_PARTS} parts")
                    response = await self._s3.upload_part(
                        Bucket=self.bucket,
                        Key=object_key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=data,
                        ContentMD5=md5,
                    )
                    parts.append({"PartNumber": number, "ETag": response["ETag"]})
                    if len(data) < part_bytes:
                        break
                await self._s3.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=object_key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                )
            except BaseException:
                await self._abort_upload(object_key, upload_id)
                raise
        finally:
            await asyncio.to_thread(handle.close)

    async def _abort_upload(self, object_key: str, upload_id: str) -> None:
        """Aborts a multipart upload, even while the caller is being cancelled
        (the shield keeps a second cancellation from interrupting the abort);
        a failure is logged, not raised, so the original error propagates."""
        abort = asyncio.ensure_future(
            self._s3.abort_multipart_upload(Bucket=self.bucket, Key=object_key, UploadId=upload_id)
        )
        try:
            await asyncio.shield(abort)
        except asyncio.CancelledError:
            log.warning("cancelled while aborting upload %s of %s", upload_id, object_key)
            raise
        except Exception:
            log.exception(
                "could not abort multipart upload %s of s3://%s/%s; it is left to "
                "abort_incomplete_uploads or the bucket's lifecycle rule",
                upload_id,
                self.bucket,
                object_key,
            )

    async def read(
        self, key: str, offset: int = 0, chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ) -> AsyncIterator[bytes]:
        """Streams the blob in chunks of exactly chunk_bytes (the last may be
        shorter). An offset at or past the end yields nothing."""
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive, not {chunk_bytes}")
        request: dict[str, Any] = {"Bucket": self.bucket, "Key": self._object_key(key)}
        if offset > 0:
            request["Range"] = f"bytes={offset}-"
        with _faults("get"):
            try:
                response = await self._s3.get_object(**request)
            except ClientError as error:
                if _is_not_found(error):
                    raise BlobNotFound(key) from None
                if _error_code(error) == "InvalidRange":  # offset >= size: nothing to send
                    return
                raise
        body = response["Body"]
        try:
            buffer = bytearray()
            while True:
                # The body returns what the socket has, often less than asked.
                with _faults("get"):
                    data = await body.read(chunk_bytes - len(buffer))
                if not data:
                    break
                buffer += data
                if len(buffer) == chunk_bytes:
                    yield bytes(buffer)
                    buffer.clear()
            if buffer:
                yield bytes(buffer)
        finally:
            body.close()  # releases the pooled connection, also when abandoned

    @_translated("head")
    async def size(self, key: str) -> int:
        try:
            response = await self._s3.head_object(Bucket=self.bucket, Key=self._object_key(key))
        except ClientError as error:
            if _is_not_found(error):
                raise BlobNotFound(key) from None
            raise
        return int(response["ContentLength"])

    async def intact(self, key: str) -> bool:
        try:
            await self.size(key)
        except BlobNotFound:
            return False
        return True

    @_translated("copy")
    async def copy(self, source_key: str, target_key: str) -> None:
        """A server-side copy: the bytes never pass through this process.
        Objects over `max_single_copy_bytes` (5 GiB, CopyObject's limit) are
        copied part by part with UploadPartCopy."""
        source_size = await self.size(source_key)
        if source_key == target_key:
            return  # S3 refuses to copy an object onto itself unchanged
        source = {"Bucket": self.bucket, "Key": self._object_key(source_key)}
        target = self._object_key(target_key)
        try:
            if source_size <= self.max_single_copy_bytes:
                await self._s3.copy_object(Bucket=self.bucket, Key=target, CopySource=source)
            else:
                await self._copy_multipart(source, target, source_size)
        except ClientError as error:
            if _is_not_found(error):  # deleted since we measured it
                raise BlobNotFound(source_key) from None
            raise

    async def _copy_multipart(self, source: dict[str, str], target: str, size: int) -> None:
        part_bytes = min(part_size_for(size, self.copy_part_bytes), MAX_PART_BYTES)
        upload = await self._s3.create_multipart_upload(Bucket=self.bucket, Key=target)
        upload_id: str = upload["UploadId"]
        try:
            parts: list[dict[str, Any]] = []
            for number, start in enumerate(range(0, size, part_bytes), start=1):
                end = min(start + part_bytes, size) - 1
                response = await self._s3.upload_part_copy(
                    Bucket=self.bucket,
                    Key=target,
                    UploadId=upload_id,
                    PartNumber=number,
                    CopySource=source,
                    CopySourceRange=f"bytes={start}-{end}",
                )
                parts.append({"PartNumber": number, "ETag": response["CopyPartResult"]["ETag"]})
            await self._s3.complete_multipart_upload(
                Bucket=self.bucket,
                Key=target,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            await self._abort_upload(target, upload_id)
            raise

    @_translated("delete")
    async def delete(self, key: str) -> None:
        try:
            await self._s3.delete_object(Bucket=self.bucket, Key=self._object_key(key))
        except ClientError as error:
            if not _is_not_found(error):  # S3 answers 204 anyway; some clones 404
                raise

    @_translated("list")
    async def keys(self) -> list[str]:
        """Every key directly under the prefix. Objects in deeper "folders"
        (the chunk store's, under CHUNKS_SUB_PREFIX, and anyone else's) and
        folder markers (an object named just the prefix, which web consoles
        create) are not blobs of this store and are skipped; the Delimiter
        makes S3 fold each folder into one CommonPrefixes entry instead of
        listing every object in it."""
        found: list[str] = []
        paginator = self._s3.get_paginator("list_objects_v2")
        async for page in paginator.paginate(
            Bucket=self.bucket,
            Prefix=self.prefix,
            Delimiter="/",
            PaginationConfig={"PageSize": self.list_page_size},
        ):
            for entry in page.get("Contents", []):
                key = str(entry["Key"]).removeprefix(self.prefix)
                if key and "/" not in key and not key.startswith("."):
                    found.append(key)
        return sorted(found)

    @_translated("ping")
    async def ping(self) -> None:
        await self._s3.head_bucket(Bucket=self.bucket)

    @_translated("claim")
    async def claim(self, deployment: str) -> None:
        """The marker is written with If-None-Match: *, so of two deployments
        starting together on an empty prefix one wins and the other refuses
        (a store that ignores the condition leaves the last writer's marker,
        and whichever deployment reads the other's refuses)."""
        marker = self.prefix + DEPLOYMENT_MARKER
        owner = await self._marker(marker)
        if owner is None:
            body = deployment.encode()
            try:
                await self._s3.put_object(
                    Bucket=self.bucket,
                    Key=marker,
                    Body=body,
                    ContentMD5=_content_md5(body),
                    IfNoneMatch="*",
                )
            except ClientError as error:
                status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if status not in (409, 412):  # someone else's marker came first
                    raise
            owner = await self._marker(marker)
        if owner != deployment:
            raise PrefixOwned(owner or "")

    async def _marker(self, marker: str) -> str | None:
        try:
            response = await self._s3.get_object(Bucket=self.bucket, Key=marker)
        except ClientError as error:
            if _is_not_found(error):
                return None
            raise
        body = response["Body"]
        try:
            data: bytes = await body.read(1024)
        finally:
            body.close()
        return data.decode(errors="replace").strip()

    # -- objects under a sub-prefix (the chunk store's) ------------------------
    #
    # Names are relative to the prefix and contain a "/" ("chunks/ab/<name>"),
    # so they never reach a blob. Failures go through `_faults` like the
    # blobs'; a missing object is BlobNotFound. Each method counts the
    # requests it makes in `requests` (when given one) under PUT, GET, DELETE
    # or LIST; a retry inside botocore is not counted again.

    @_translated("put")
    async def put_object(
        self, name: str, data: bytes, *, requests: Counter[str] | None = None
    ) -> None:
        """One PUT with a Content-MD5: the object appears whole, replacing
        any of that name, and is durable once this returns."""
        _check_nested_name(name)
        md5 = await asyncio.to_thread(_content_md5, data)  # 2 ms a MiB: off the loop
        _count(requests, "PUT")
        await self._s3.put_object(
            Bucket=self.bucket, Key=self.prefix + name, Body=data, ContentMD5=md5
        )

    @_translated("get")
    async def get_object(self, name: str, *, requests: Counter[str] | None = None) -> bytes:
        """The whole object, read into memory (for objects of a few MiB)."""
        _check_nested_name(name)
        _count(requests, "GET")
        try:
            response = await self._s3.get_object(Bucket=self.bucket, Key=self.prefix + name)
        except ClientError as error:
            if _is_not_found(error):
                raise BlobNotFound(name) from None
            raise
        body = response["Body"]
        try:
            data: bytes = await body.read()
        finally:
            body.close()
        return data

    @_translated("head")
    async def has_object(self, name: str, *, requests: Counter[str] | None = None) -> bool:
        """Whether an object of that name exists (one HEAD)."""
        _check_nested_name(name)
        _count(requests, "HEAD")
        try:
            await self._s3.head_object(Bucket=self.bucket, Key=self.prefix + name)
        except ClientError as error:
            if _is_not_found(error):
                return False
            raise
        return True

    @_translated("delete")
    async def delete_objects(
        self, names: Sequence[str], *, requests: Counter[str] | None = None
    ) -> None:
        """Deletes the objects, `delete_batch_size` to a DeleteObjects
        request; names with no object are ignored. DeleteObjects answers 200
        even when keys failed, so its per-key errors are checked here: any
        but "no such key" fails the call (UNAVAILABLE if the store was busy)."""
        for name in names:
            _check_nested_name(name)
        for start in range(0, len(names), self.delete_batch_size):
            batch = names[start : start + self.delete_batch_size]
            _count(requests, "DELETE")
            response = await self._s3.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": self.prefix + name} for name in batch], "Quiet": True},
            )
            errors = [
                error
                for error in response.get("Errors", [])
                if str(error.get("Code", "")) not in _NOT_FOUND_CODES
            ]
            if errors:
                log.warning(
                    "S3 delete of %d objects failed for %d, the first %s: %s %s",
                    len(batch),
                    len(errors),
                    errors[0].get("Key"),
                    errors[0].get("Code"),
                    errors[0].get("Message"),
                )
                if any(str(error.get("Code", "")) in _UNAVAILABLE_CODES for error in errors):
                    raise store_unavailable()
                raise BlobStoreRefused()

    @_translated("list")
    async def list_object_keys(
        self, sub_prefix: str, *, requests: Counter[str] | None = None
    ) -> list[str]:
        """The names (relative to the prefix, as the other methods take them)
        of every object under prefix + sub_prefix, at any depth, sorted."""
        if not sub_prefix.endswith("/"):
            raise ValueError(f"a sub-prefix ends with '/', not {sub_prefix!r}")
        _check_nested_name(sub_prefix + "x")
        found: list[str] = []
        paginator = self._s3.get_paginator("list_objects_v2")
        async for page in paginator.paginate(
            Bucket=self.bucket,
            Prefix=self.prefix + sub_prefix,
            PaginationConfig={"PageSize": self.list_page_size},
        ):
            _count(requests, "LIST")
            for entry in page.get("Contents", []):
                found.append(str(entry["Key"]).removeprefix(self.prefix))
        return sorted(found)

    # -- administration --------------------------------------------------------

    @_translated("create bucket")
    async def ensure_bucket(self) -> None:
        """Creates the bucket unless it exists (for tests and a first start;
        production buckets are usually provisioned, with their lifecycle
        rules, by the operator)."""
        try:
            await self._s3.head_bucket(Bucket=self.bucket)
            return
        except ClientError as error:
            if _error_code(error) not in _NO_BUCKET_CODES:
                raise
        request: dict[str, Any] = {"Bucket": self.bucket}
        if self.region != "us-east-1":  # us-east-1 rejects its own name here
            request["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            await self._s3.create_bucket(**request)
        except ClientError as error:
            if _error_code(error) != "BucketAlreadyOwnedByYou":  # a concurrent start
                raise

    @_translated("list uploads")
    async def incomplete_uploads(self) -> list[tuple[str, str]]:
        """(key, upload id) of every multipart upload in progress under the
        prefix."""
        found: list[tuple[str, str]] = []
        paginator = self._s3.get_paginator("list_multipart_uploads")
        async for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
            for upload in page.get("Uploads", []):
                found.append((str(upload["Key"]), str(upload["UploadId"])))
        return found

    @_translated("abort uploads")
    async def abort_incomplete_uploads(self, older_than_seconds: float = 24 * 3600) -> int:
        """Aborts multipart uploads of this store's keys (directly under the
        prefix: a deeper "folder" may be another store's) that were started
        more than older_than_seconds ago (left by a crash; younger ones may
        still be running in another replica). Returns how many were aborted."""
        cutoff = time.time() - older_than_seconds
        aborted = 0
        paginator = self._s3.get_paginator("list_multipart_uploads")
        async for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
            for upload in page.get("Uploads", []):
                if upload["Initiated"].timestamp() > cutoff:
                    continue
                name = str(upload["Key"]).removeprefix(self.prefix)
                if not name or "/" in name or name.startswith("."):
                    continue  # not a blob of this store: a deeper prefix is someone else's
                with contextlib.suppress(ClientError):  # NoSuchUpload: finished meanwhile
                    await self._s3.abort_multipart_upload(
                        Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
                    aborted += 1
        return aborted
