"""The provisioner's view of ImageService, the fleet's ImageSource port:
describe an image (as a common.model.Image), check the caller may use it,
and fetch its bytes once into a cache verified by checksum."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import grpc

from bms.image.v1 import image_pb2, image_pb2_grpc
from bms_image.common.auth import ServiceCredential
from bms_image.common.convert import image_from_proto
from bms_image.common.errors import DataLoss
from bms_image.common.model import Image
from bms_image.common.remote import bearer, domain_error
from bms_image.common.staging import PipelinedWriter, StagedUpload, sha256_of_file
from bms_image.fleet.domain.ports import Progress
from bms_image.fleet.domain.system_disks import is_sha256

log = logging.getLogger(__name__)
UPLOAD_CHUNK_BYTES = 1024 * 1024


def _metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (bearer(token),)


#: What identifies a cache entry's file as this process verified it: any
#: write, chmod or replacement changes it (st_ctime_ns cannot be set back).
Fingerprint = tuple[int, int, int, int, int]


def _fingerprint(status: os.stat_result) -> Fingerprint:
    return (status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns, status.st_mode)


def cache_entry(cache_dir: Path, sha256: str) -> Path:
    """The cache file of the bytes with this SHA-256: named by it alone."""
    if not is_sha256(sha256):
        raise ValueError(f"not a SHA-256 digest: {sha256[:80]!r}")
    return cache_dir / f"{sha256}.raw"


def _install(temp: Path, path: Path) -> Fingerprint:
    """Makes a verified download the (read-only) cache entry, replacing any
    earlier one by rename: who reads the entry finds one or the other, never
    none. Blocking."""
    os.chmod(temp, 0o444)
    os.replace(temp, path)
    return _fingerprint(os.stat(path))


class ImageSource:
    """Images through ImageService, and the image cache. Its entries are
    content-addressed (`<sha256>.raw`), verified when filled, read-only
    (0o444) and never opened for writing again; a local disk is a copy of an
    entry and an EVS clone writes only to its own overlay. Before an entry
    is used again it is either provably untouched (its fingerprint is the
    one taken when this process verified it) or hashed again; a wrong one is
    replaced by a fresh download, atomically, so a clone reading it never
    finds it missing."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        cache_dir: Path,
        credential: ServiceCredential | None = None,
    ) -> None:
        self._stub = image_pb2_grpc.ImageServiceStub(channel)
        #: The provisioner's service identity: the image service takes the
        #: bytes of a capture image only from a call that presents it.
        self._credential = credential
        self._cache = cache_dir
        cache_dir.mkdir(parents=True, exist_ok=True)
        for leftover in cache_dir.glob(".part-*"):
            leftover.unlink(missing_ok=True)
        for legacy in cache_dir.glob("*-*.raw"):  # named by image id too, before 0006
            legacy.unlink(missing_ok=True)
        self._inflight: dict[str, asyncio.Task[Path]] = {}
        #: Entries this process verified, as they were right after.
        self._verified: dict[str, Fingerprint] = {}

    async def close(self) -> None:
        """Stops downloads still running (on shutdown)."""
        for task in list(self._inflight.values()):
            task.cancel()
        await asyncio.gather(*self._inflight.values(), return_exceptions=True)

    async def describe(self, image_id: str, token: str) -> Image:
        """GetImage as the caller, converted for the fleet's rules."""
        try:
            image: image_pb2.Image = await self._stub.GetImage(
                image_pb2.GetImageRequest(name=f"images/{image_id}"), metadata=_metadata(token)
            )
        except grpc.aio.AioRpcError as error:
            raise domain_error(error) from None
        # The capture's check needs what the catalog's rules do not read.
        return replace(
            image_from_proto(image),
            source_server=image.source_server,
            uploaded_bytes=image.uploaded_bytes,
        )

    async def authorize(self, image: Image, token: str) -> str:
        """Asks DownloadImageData for the bytes after the last one: nothing
        moves, but the image service checks that the caller may use the image
        now (visible, active, share accepted) and tells its checksum."""
        request = image_pb2.DownloadImageDataRequest(
            name=f"images/{image.id}", offset=image.size_bytes
        )
        sha256 = ""
        try:
            async for message in self._stub.DownloadImageData(request, metadata=_metadata(token)):
                if message.last:
                    sha256 = message.sha256
        except grpc.aio.AioRpcError as error:
            raise domain_error(error) from None
        return sha256

    def partial_downloads(self) -> list[Path]:
        """Downloads a crash cut off (none while this process fetches)."""
        return list(self._cache.glob(".part-*"))

    def entry(self, sha256: str) -> Path:
        """Where the bytes with this SHA-256 are cached (if they are)."""
        return cache_entry(self._cache, sha256)

    async def fetch(self, image_id: str, sha256: str, token: str, progress: Progress) -> Path:
        """The verified cache entry of the image's bytes; downloads them once
        however many deployments ask at the same time."""
        if not is_sha256(sha256):
            raise DataLoss(
                "IMAGE_CHECKSUM_MISMATCH",
                f"images/{image_id}: the image service told no valid SHA-256; not deployed",
            )
        task = self._inflight.get(sha256)
        if task is None:
            task = asyncio.create_task(self._fill(image_id, sha256, token, progress))
            self._inflight[sha256] = task
            task.add_done_callback(lambda _: self._inflight.pop(sha256, None))
        return await asyncio.shield(task)

    async def verified(self, image_id: str, sha256: str) -> Path:
        """The cache entry an EVS clone reads through to, checked as for a
        reuse; DataLoss if it is gone or no longer those bytes."""
        path = self.entry(sha256)
        fingerprint = await asyncio.to_thread(self._check, path, sha256)
        if fingerprint is None:
            raise DataLoss(
                "IMAGE_CACHE_DAMAGED",
                f"the cached bytes of images/{image_id} are gone or changed (SHA-256 {sha256} "
                "expected); reinstall the server",
            )
        self._verified[sha256] = fingerprint
        return path

    async def _fill(self, image_id: str, sha256: str, token: str, progress: Progress) -> Path:
        path = self.entry(sha256)
        fingerprint = await asyncio.to_thread(self._check, path, sha256)
        if fingerprint is not None:
            self._verified[sha256] = fingerprint
            return path
        return await self._download(image_id, sha256, token, progress, path)

    def _check(self, path: Path, sha256: str) -> Fingerprint | None:
        """The entry's fingerprint if it holds the bytes with that SHA-256:
        provably untouched since this process verified it, or hashed again
        now (read-only, and unchanged while hashed). None if it is missing
        or wrong. Blocking."""
        try:
            before = os.lstat(path)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(before.st_mode):  # a link or anything else: replaced
            return None
        if self._verified.get(sha256) == _fingerprint(before):
            return _fingerprint(before)
        log.info("verifying the cached image %s again before it is used", path.name)
        if before.st_mode & 0o777 != 0o444:
            os.chmod(path, 0o444)
            before = os.lstat(path)
        digest, _ = sha256_of_file(path)
        if digest != sha256 or _fingerprint(os.lstat(path)) != _fingerprint(before):
            log.warning("the cached image %s is damaged; it is fetched again", path.name)
            return None
        return _fingerprint(before)

    async def _download(
        self, image_id: str, sha256: str, token: str, progress: Progress, path: Path
    ) -> Path:
        temp = self._cache / f".part-{uuid.uuid4().hex}"
        staged = await asyncio.to_thread(StagedUpload, temp, 0)
        writer = PipelinedWriter(staged)
        final = ""
        total = 0
        request = image_pb2.DownloadImageDataRequest(name=f"images/{image_id}")
        try:
            try:
                async for message in self._stub.DownloadImageData(
                    request, metadata=_metadata(token)
                ):
                    if message.chunk:
                        await writer.write(message.chunk)
                    total = message.size_bytes
                    await progress(message.offset + len(message.chunk), total)
                    if message.last:
                        final = message.sha256
            except grpc.aio.AioRpcError as error:
                raise domain_error(error) from None
            finally:
                await writer.drain()
                await asyncio.to_thread(staged.close)
            got = staged.sha256.hexdigest()
            if not final or got != final or final != sha256 or staged.size != total:
                raise DataLoss(
                    "IMAGE_CHECKSUM_MISMATCH",
                    f"images/{image_id}: the received bytes have SHA-256 {got}, "
                    f"the image service says {final or 'nothing'}; not deployed",
                )
            self._verified[sha256] = await asyncio.to_thread(_install, temp, path)
            return path
        finally:
            await asyncio.to_thread(temp.unlink, missing_ok=True)

    async def upload(
        self,
        image_id: str,
        produce: Callable[[], Awaitable[Path]],
        token: str,
        before_end: Callable[[], Awaitable[None]] | None = None,
    ) -> image_pb2.Image:
        """Streams a file into a QUEUED capture image through UploadImageData,
        as the caller (`token`) and with the provisioner's service identity.

        The stream opens with its metadata first, so the image turns SAVING
        at once, and only then does `produce` write the file: when that fails
        the stream ends without a byte, and the image service kills the
        image (a capture cannot resume) instead of leaving it QUEUED; the
        failure is raised here. `before_end` runs after the last byte is
        sent, before the stream ends (and so before the image can become
        ACTIVE)."""
        if self._credential is None:
            raise RuntimeError("uploading a capture needs the provisioner's service credential")
        failure: BaseException | None = None

        async def messages() -> AsyncIterator[image_pb2.UploadImageDataRequest]:
            nonlocal failure
            yield image_pb2.UploadImageDataRequest(
                metadata=image_pb2.UploadImageDataMetadata(name=f"images/{image_id}")
            )
            try:
                path = await produce()
            except Exception as error:  # raised below, once the stream has ended
                failure = error
                return
            with open(path, "rb") as handle:  # noqa: ASYNC230 - reads go to a thread below
                while chunk := await asyncio.to_thread(handle.read, UPLOAD_CHUNK_BYTES):
                    yield image_pb2.UploadImageDataRequest(chunk=chunk)
            if before_end is not None:
                await before_end()

        try:
            image: image_pb2.Image = await self._stub.UploadImageData(
                messages(), metadata=(*_metadata(token), self._credential.metadata())
            )
        except grpc.aio.AioRpcError as error:
            if failure is not None:
                raise failure from None
            raise domain_error(error) from None
        if failure is not None:  # never: an image service takes no empty upload
            raise failure
        return image
