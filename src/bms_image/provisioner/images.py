"""The provisioner's view of ImageService: describe an image, check the caller
may use it, and fetch its bytes once into a cache verified by checksum."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc

from bms.image.v1 import image_pb2, image_pb2_grpc

from ..auth import ServiceCredential
from ..blobs.staging import PipelinedWriter, StagedUpload
from ..domain.errors import DataLoss
from .remote import domain_error

Progress = Callable[[int, int], Awaitable[None]]
UPLOAD_CHUNK_BYTES = 1024 * 1024


def _metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


class ImageSource:
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
        self._inflight: dict[str, asyncio.Task[Path]] = {}

    async def close(self) -> None:
        """Stops downloads still running (on shutdown)."""
        for task in list(self._inflight.values()):
            task.cancel()
        await asyncio.gather(*self._inflight.values(), return_exceptions=True)

    async def describe(self, image_id: str, token: str) -> image_pb2.Image:
        try:
            image: image_pb2.Image = await self._stub.GetImage(
                image_pb2.GetImageRequest(name=f"images/{image_id}"), metadata=_metadata(token)
            )
        except grpc.aio.AioRpcError as error:
            raise domain_error(error) from None
        return image

    async def authorize(self, image: image_pb2.Image, token: str) -> str:
        """Asks DownloadImageData for the bytes after the last one: nothing
        moves, but the image service checks that the caller may use the image
        now (visible, active, share accepted) and tells its checksum."""
        request = image_pb2.DownloadImageDataRequest(name=image.name, offset=image.size_bytes)
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

    def cached(self, image_id: str, sha256: str) -> Path:
        return self._cache / f"{image_id}-{sha256}.raw"

    async def fetch(self, image_id: str, sha256: str, token: str, progress: Progress) -> Path:
        """The verified image file; downloads it once however many deployments
        ask at the same time."""
        path = self.cached(image_id, sha256)
        if path.exists():
            return path
        key = path.name
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._download(image_id, sha256, token, progress, path))
            self._inflight[key] = task
            task.add_done_callback(lambda _: self._inflight.pop(key, None))
        return await asyncio.shield(task)

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
            await asyncio.to_thread(os.replace, temp, path)
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
