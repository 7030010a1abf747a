"""The image data plane: uploads (resumable, verified, inspected, stored as
raw) and downloads, plus recovery of interrupted uploads after a restart."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

from bms_image.common.errors import (
    DataLoss,
    DomainError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PreconditionViolation,
    QuotaExceeded,
    QuotaViolation,
    StagedBytesMissing,
    Unavailable,
    invalid_field,
)
from bms_image.common.model import Caller, DiskFormat, Image, ImageStatus
from bms_image.images.domain import rules
from bms_image.images.domain.images import ImageCatalog
from bms_image.images.domain.ports import (
    DEFAULT_CHUNK_BYTES,
    BlobNotFound,
    BlobStore,
    ByteStaging,
    ImageRepository,
    Inspector,
    StagedBytes,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_IMAGE_BYTES = 1024**4  # 1 TiB
DEFAULT_MAX_UPLOADS_PER_PROJECT = 16
#: Generous: every deployment starts with a zero-byte download that checks
#: the caller may use the image, and batches of a project run together.
DEFAULT_MAX_DOWNLOADS_PER_PROJECT = 256
MAX_CHUNK_BYTES = 4 * 1024 * 1024
#: How often a long upload checks that its image was not deleted meanwhile.
_STATUS_CHECK_BYTES = 256 * 1024 * 1024
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class UploadDeclaration:
    """What the client declares in the first message of an upload."""

    offset: int = 0
    size_bytes: int = 0
    sha256: str = ""
    disk_format: DiskFormat | None = None


def _validate(declared: UploadDeclaration, max_image_bytes: int) -> None:
    violations: list[FieldViolation] = []
    if declared.offset < 0:
        violations.append(FieldViolation("metadata.offset", "must not be negative"))
    if declared.size_bytes < 0:
        violations.append(FieldViolation("metadata.size_bytes", "must not be negative"))
    if declared.size_bytes > max_image_bytes:
        violations.append(
            FieldViolation(
                "metadata.size_bytes",
                f"{declared.size_bytes} exceeds the maximum image size of {max_image_bytes} bytes",
            )
        )
    if declared.sha256 and not _SHA256.match(declared.sha256):
        violations.append(FieldViolation("metadata.sha256", "must be 64 lower-case hex digits"))
    rules.raise_if_invalid(violations, "INVALID_UPLOAD")


def _too_many(reason: str, what: str, project: str, used: int, limit: int) -> QuotaExceeded:
    return QuotaExceeded(
        reason,
        f"project {project} already has {used} {what} in progress, the most one service "
        "process takes at once; retry when one has finished",
        [QuotaViolation(f"projects/{project}", f"{what} at once: at most {limit}")],
        {"limit": str(limit)},
    )


def _too_many_uploads(project: str, used: int, limit: int) -> QuotaExceeded:
    return _too_many("CONCURRENT_UPLOADS_EXCEEDED", "uploads", project, used, limit)


def _too_many_downloads(project: str, used: int, limit: int) -> QuotaExceeded:
    return _too_many("CONCURRENT_DOWNLOADS_EXCEEDED", "downloads", project, used, limit)


class ProjectSlots:
    """Counts what each project has in progress in this process (uploads,
    downloads) against a limit. Taking and giving back a slot never waits,
    so no lock is needed on the event loop."""

    def __init__(self, limit: int, refusal: Callable[[str, int, int], QuotaExceeded]) -> None:
        self.limit = limit
        self._refusal = refusal
        self._used: dict[str, int] = {}

    def used(self, project: str) -> int:
        return self._used.get(project, 0)

    @contextlib.contextmanager
    def held(self, project: str) -> Iterator[None]:
        """One slot for the duration of the block, given back however it
        ends; RESOURCE_EXHAUSTED (with a QuotaFailure) when none is free."""
        used = self.used(project)
        if used >= self.limit:
            raise self._refusal(project, used, self.limit)
        self._used[project] = used + 1
        try:
            yield
        finally:
            left = self._used[project] - 1
            if left:
                self._used[project] = left
            else:
                del self._used[project]


def _offset_mismatch(image_id: str, stored: int) -> FailedPrecondition:
    return FailedPrecondition(
        "UPLOAD_OFFSET_MISMATCH",
        f"images/{image_id} has {stored} bytes stored; "
        f"send metadata.offset = {stored} and the bytes from there on",
        metadata={"uploaded_bytes": str(stored)},
    )


def _kept(error: Unavailable | QuotaExceeded, image_id: str, kept: int) -> DomainError:
    """The error again, telling the client where to resume."""
    message = (
        f"{error.message}; images/{image_id} keeps its {kept} bytes: "
        f"resume with metadata.offset = {kept}"
    )
    metadata = {**error.metadata, "uploaded_bytes": str(kept)}
    if isinstance(error, QuotaExceeded):
        return QuotaExceeded(error.reason, message, error.violations, metadata)
    return Unavailable(error.reason, message, metadata)


class ImageData:
    def __init__(
        self,
        catalog: ImageCatalog,
        images: ImageRepository,
        staging: ByteStaging,
        blobs: BlobStore,
        inspector: Inspector,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        max_uploads_per_project: int = DEFAULT_MAX_UPLOADS_PER_PROJECT,
        max_downloads_per_project: int = DEFAULT_MAX_DOWNLOADS_PER_PROJECT,
    ) -> None:
        self._catalog = catalog
        self._images = images
        self._staging = staging
        self._blobs = blobs
        self._inspector = inspector
        self.max_image_bytes = max_image_bytes
        self.chunk_bytes = chunk_bytes
        self.uploads = ProjectSlots(max_uploads_per_project, _too_many_uploads)
        self.downloads = ProjectSlots(max_downloads_per_project, _too_many_downloads)

    # -- upload -------------------------------------------------------------

    async def upload(
        self,
        caller: Caller,
        image_id: str,
        declared: UploadDeclaration,
        chunks: AsyncIterator[bytes],
    ) -> Image:
        _validate(declared, self.max_image_bytes)
        image = await self._catalog.get(caller, image_id)
        rules.require_can_modify(caller, image)
        rules.require_bytes_writer(caller, image)
        if image.status is not ImageStatus.QUEUED:
            busy = " (another upload is in progress)" if image.status is ImageStatus.SAVING else ""
            raise FailedPrecondition(
                "IMAGE_NOT_QUEUED",
                f"images/{image_id} is {image.status.value}{busy}; only a queued image takes data",
                [PreconditionViolation("STATUS", f"images/{image_id}", image.status.value)],
            )
        if declared.offset != image.uploaded_bytes:
            raise _offset_mismatch(image_id, image.uploaded_bytes)
        # Captures have a limit of their own (the provisioner's).
        slot = (
            self.uploads.held(caller.project)
            if rules.bytes_come_from_a_client(image)
            else contextlib.nullcontext()
        )
        with slot:
            return await self._upload(image_id, declared, chunks)

    async def _upload(
        self, image_id: str, declared: UploadDeclaration, chunks: AsyncIterator[bytes]
    ) -> Image:
        claimed = await self._images.transition(
            image_id, {ImageStatus.QUEUED}, {"status": ImageStatus.SAVING, "status_reason": ""}
        )
        if claimed is None:
            raise FailedPrecondition(
                "IMAGE_NOT_QUEUED", f"images/{image_id} is no longer queued; read it again"
            )
        limit = declared.size_bytes or self.max_image_bytes
        staged = await self._open_staged(image_id, declared.offset)
        async with self._settling(image_id, staged):
            await self._receive(image_id, staged, chunks, limit, declared)
        if staged.size == 0:
            await self._interrupt(image_id, staged)
            raise invalid_field("chunk", "no bytes were sent; an image cannot be empty")
        async with self._settling(image_id, staged):
            return await self._finish(image_id, staged, declared)

    async def _open_staged(self, image_id: str, offset: int) -> StagedBytes:
        """The staged bytes, resumed at `offset` (the image is SAVING), on
        whichever process. When fewer bytes are durably staged (a crash cut
        off their write, or they were lost), the image goes back to QUEUED
        with the bytes that are there and the client is told to resume from
        them: a resume never continues from bytes that are not there."""
        try:
            return await self._staging.open(image_id, offset)
        except StagedBytesMissing as missing:
            available = missing.available
            await self._images.transition(
                image_id,
                {ImageStatus.SAVING},
                {
                    "status": ImageStatus.QUEUED,
                    "uploaded_bytes": available,
                    "status_reason": f"only {available} of the {offset} bytes uploaded were "
                    f"found staged; resume with metadata.offset = {available}",
                },
            )
            log.warning(
                "images/%s: %d bytes staged, %d recorded; offset corrected",
                image_id,
                available,
                offset,
            )
            raise _offset_mismatch(image_id, available) from None
        except BaseException:
            await self._images.transition(
                image_id, {ImageStatus.SAVING}, {"status": ImageStatus.QUEUED}
            )
            raise

    @contextlib.asynccontextmanager
    async def _settling(self, image_id: str, staged: StagedBytes) -> AsyncIterator[None]:
        """What becomes of an upload that fails: a domain error (bad size,
        checksum, format) kills the image and drops its bytes; a full disk or
        an unreachable blob store, and anything else (the client went away,
        a crash of ours), keep the durable bytes for a resume; an image
        deleted meanwhile took its bytes with it."""
        try:
            yield
        except NotFound:
            await _close_quietly(staged)
            await self._staging.discard(image_id)  # whatever was staged after the deletion
            raise
        except (Unavailable, QuotaExceeded) as error:
            kept = await self._interrupt(image_id, staged, error.message)
            if kept is None:
                raise
            raise _kept(error, image_id, kept) from None
        except DomainError as error:
            await self._kill(image_id, staged, error.message)
            raise
        except BaseException:
            await self._interrupt(image_id, staged)
            raise

    async def _require_saving(self, image_id: str) -> None:
        """Fails the upload when the image was deleted (or changed) meanwhile."""
        image = await self._images.get(image_id)
        if image is None or image.status is not ImageStatus.SAVING:
            raise NotFound("IMAGE_NOT_FOUND", f"images/{image_id} was deleted during the upload")

    async def _receive(
        self,
        image_id: str,
        staged: StagedBytes,
        chunks: AsyncIterator[bytes],
        limit: int,
        declared: UploadDeclaration,
    ) -> None:
        received = checked_at = staged.size
        try:
            async for chunk in chunks:
                if received - checked_at >= _STATUS_CHECK_BYTES:
                    await self._require_saving(image_id)
                    checked_at = received
                if len(chunk) > MAX_CHUNK_BYTES:
                    raise invalid_field(
                        "chunk", f"is {len(chunk)} bytes; send chunks of at most {MAX_CHUNK_BYTES}"
                    )
                if received + len(chunk) > limit:
                    what = "the declared size" if declared.size_bytes else "the maximum image size"
                    raise invalid_field(
                        "chunk", f"the upload exceeds {what} of {limit} bytes", "IMAGE_TOO_LARGE"
                    )
                received += len(chunk)
                await staged.write(chunk)
        finally:
            await staged.drain()  # on failures too: staged.size must count what was written
        await staged.close()

    async def _finish(
        self, image_id: str, staged: StagedBytes, declared: UploadDeclaration
    ) -> Image:
        subject = f"images/{image_id}"
        await self._require_saving(image_id)
        size, digest = staged.size, staged.hexdigest()
        if declared.size_bytes and size != declared.size_bytes:
            raise InvalidArgument(
                "IMAGE_SIZE_MISMATCH",
                f"{subject}: received {size} bytes but {declared.size_bytes} were declared",
                [
                    FieldViolation(
                        "metadata.size_bytes", f"declared {declared.size_bytes}, got {size}"
                    )
                ],
            )
        if declared.sha256 and digest != declared.sha256:
            raise DataLoss(
                "IMAGE_CHECKSUM_MISMATCH",
                f"{subject}: the received bytes have SHA-256 {digest}, "
                f"not the declared {declared.sha256}; upload the image again",
            )
        inspection = await self._inspector.inspect(staged.read(), size, subject)
        if declared.disk_format and inspection.format is not declared.disk_format:
            raise FailedPrecondition(
                "IMAGE_FORMAT_MISMATCH",
                f"{subject}: declared {declared.disk_format.value} "
                f"but the content is {inspection.format.value}",
                [PreconditionViolation("FORMAT", subject, f"content is {inspection.format.value}")],
            )
        if inspection.virtual_size > self.max_image_bytes:
            raise FailedPrecondition(
                "IMAGE_TOO_LARGE",
                f"{subject}: the image claims a virtual size of {inspection.virtual_size} bytes, "
                f"over the limit of {self.max_image_bytes}",
                [PreconditionViolation("SIZE", subject, "virtual size over the limit")],
            )
        if inspection.format is DiskFormat.RAW:
            await staged.commit(image_id)  # the staged bytes are the image's: none move
        else:
            # qemu-img reads a local file: the bytes as uploaded, into scratch.
            uploaded = self._staging.scratch(image_id, "upload")
            raw_path = self._staging.scratch(image_id, "raw")
            await staged.materialize(uploaded)
            await self._inspector.convert_to_raw(uploaded, inspection.format, raw_path, subject)
            digest, size = await self._staging.digest(raw_path)
            await self._blobs.put_file(image_id, raw_path)
        image = await self._images.transition(
            image_id,
            {ImageStatus.SAVING},
            {
                "status": ImageStatus.ACTIVE,
                "status_reason": "",
                "size_bytes": size,
                "sha256": digest,
                "disk_format": inspection.format,
                "uploaded_bytes": 0,
            },
        )
        await self._staging.discard(image_id)
        if image is None:  # deleted while we were storing it
            await self._blobs.delete(image_id)
            raise NotFound("IMAGE_NOT_FOUND", f"{subject} was deleted during the upload")
        return image

    async def _kill(self, image_id: str, staged: StagedBytes, reason: str) -> None:
        await _close_quietly(staged)
        await self._images.transition(
            image_id,
            {ImageStatus.SAVING},
            {"status": ImageStatus.KILLED, "status_reason": reason, "uploaded_bytes": 0},
        )
        await self._staging.discard(image_id)

    async def _interrupt(self, image_id: str, staged: StagedBytes, cause: str = "") -> int | None:
        """The stream broke off: keep the durable bytes so the client can
        resume, and return how many (a capture cannot be resumed: its
        provisioner gave up, so it fails, and None is returned). `cause` is
        a fixed text (a domain error's message), never an exception's."""
        await _close_quietly(staged)
        await self._staging.discard_scratch(image_id)
        image = await self._images.get(image_id)
        why = f" ({cause})" if cause else ""
        if image is not None and not rules.bytes_come_from_a_client(image):
            await self._kill(
                image_id,
                staged,
                f"the capture of {image.source_server} broke off after {staged.size} bytes"
                f"{why}; capture the server again",
            )
            return None
        await self._images.transition(
            image_id,
            {ImageStatus.SAVING},
            {
                "status": ImageStatus.QUEUED,
                "uploaded_bytes": staged.size,
                "status_reason": f"upload interrupted after {staged.size} bytes{why}; "
                f"resume with metadata.offset = {staged.size}",
            },
        )
        log.info("upload of images/%s interrupted at %d bytes", image_id, staged.size)
        return staged.size

    # -- download -----------------------------------------------------------

    async def _downloadable(self, caller: Caller, image_id: str) -> Image:
        image, membership = await self._catalog.get_with_membership(caller, image_id)
        rules.require_usable(caller, image, membership)
        if image.status is not ImageStatus.ACTIVE:
            raise FailedPrecondition(
                "IMAGE_NOT_ACTIVE",
                f"images/{image_id} is {image.status.value}; only active images can be downloaded",
                [PreconditionViolation("STATUS", f"images/{image_id}", image.status.value)],
            )
        return image

    async def open_download(
        self, caller: Caller, image_id: str, offset: int
    ) -> tuple[Image, AsyncIterator[bytes]]:
        image = await self._downloadable(caller, image_id)
        if offset < 0 or offset > image.size_bytes:
            raise invalid_field("offset", f"must be between 0 and the size {image.size_bytes}")
        return image, self._read(caller, image_id, offset)

    async def _read(self, caller: Caller, image_id: str, offset: int) -> AsyncIterator[bytes]:
        # The slot is taken on the first read, so that a stream never started
        # holds none, and given back when the stream ends or is closed.
        with self.downloads.held(caller.project):
            try:
                async for chunk in self._blobs.read(image_id, offset, self.chunk_bytes):
                    yield chunk
            except BlobNotFound:
                raise DataLoss(
                    "IMAGE_DATA_MISSING", f"the stored bytes of images/{image_id} are missing"
                ) from None
            # Checked again at the end: an image deleted, unshared or deactivated
            # while it streamed must not end in a verified, usable download.
            await self._downloadable(caller, image_id)

    # -- housekeeping -------------------------------------------------------

    async def release(self, image_id: str) -> None:
        """Removes the bytes of a deleted image."""
        await release_image_bytes(self._blobs, self._staging, image_id)

    async def recover(self) -> dict[str, int]:
        """After a restart: uploads that were in flight become resumable
        (SAVING -> QUEUED with the bytes staged so far); captures and
        replicas that were cut off fail, since nothing would finish them;
        blobs or staged files that no image owns any more are removed."""
        report = {"resumable": 0, "failed": 0, "orphans": 0}
        unfinished = await self._images.in_statuses({ImageStatus.SAVING, ImageStatus.QUEUED})
        for image in unfinished:
            if not rules.bytes_come_from_a_client(image):
                what = (
                    f"the capture of {image.source_server}"
                    if image.source_server
                    else "the replication"
                )
                await self._images.transition(
                    image.id,
                    {ImageStatus.SAVING, ImageStatus.QUEUED},
                    {
                        "status": ImageStatus.KILLED,
                        "uploaded_bytes": 0,
                        "status_reason": f"{what} was cut off by a service restart; start it again",
                        # The call never answered: a retry with its request_id starts over.
                        "request_id": None,
                    },
                )
                report["failed"] += 1
                continue
            if image.status is not ImageStatus.SAVING:
                continue
            staged = await self._staging.size(image.id)
            await self._images.transition(
                image.id,
                {ImageStatus.SAVING},
                {
                    "status": ImageStatus.QUEUED,
                    "uploaded_bytes": staged,
                    "status_reason": f"upload interrupted by a service restart after {staged} "
                    f"bytes; resume with metadata.offset = {staged}",
                },
            )
            report["resumable"] += 1
        for key in sorted(set(await self._blobs.keys()) | set(await self._staging.keys())):
            owner = await self._images.get(key)
            status = owner.status if owner else None
            if owner is None or status in (ImageStatus.DELETED, ImageStatus.KILLED):
                await self.release(key)
                report["orphans"] += 1
            elif status is ImageStatus.QUEUED:
                await self._blobs.delete(key)
                await self._sync_uploaded_bytes(owner)
            elif status in (ImageStatus.ACTIVE, ImageStatus.DEACTIVATED):
                await self._staging.discard(key)
            if status is ImageStatus.QUEUED:  # a conversion cut off by the crash
                await self._staging.discard_scratch(key)
        return report

    async def _sync_uploaded_bytes(self, image: Image) -> None:
        staged = await self._staging.size(image.id)
        if staged != image.uploaded_bytes:
            await self._images.transition(
                image.id, {ImageStatus.QUEUED}, {"uploaded_bytes": staged}
            )


async def release_image_bytes(blobs: BlobStore, staging: ByteStaging, image_id: str) -> None:
    """Removes every byte stored for an image: its blob and any staged upload."""
    await blobs.delete(image_id)
    await staging.discard(image_id)


async def _close_quietly(staged: StagedBytes) -> None:
    """Closes the staged bytes; a failure to make them durable (a full
    store) is logged, and `staged.size` then counts only the durable ones."""
    try:
        await staged.close()
    except Exception as error:
        log.warning("closing staged bytes failed: %r", error)
