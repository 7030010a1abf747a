"""Use cases of the image catalog: what ImageService does, free of gRPC and SQL."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from bms_image.common.errors import (
    Aborted,
    DomainError,
    FailedPrecondition,
    FieldViolation,
    PermissionDenied,
    PreconditionViolation,
    invalid_field,
)
from bms_image.common.flavors import FlavorCatalog
from bms_image.common.model import (
    Architecture,
    Caller,
    DiskFormat,
    Image,
    ImageStatus,
    ImageType,
    MemberStatus,
    OsType,
    Plugin,
    RequestMethod,
    Visibility,
)
from bms_image.common.paging import PageTokens, page_size_or_default
from bms_image.images.domain import rules
from bms_image.images.domain.ports import CaptureProvider, ImageRepository, MemberRepository
from bms_image.images.domain.query import ImageQuery, ListedImage, parse_filter

log = logging.getLogger(__name__)
E = TypeVar("E", bound=enum.Enum)

DEFAULT_PRIVATE_IMAGE_QUOTA = 50
#: Without an etag a writer that lost a race re-reads and retries, with jitter.
UPDATE_RETRIES = 30


@dataclass
class NewImage:
    """What a caller asks for in CreateImage."""

    display_name: str
    os_type: OsType | None
    os_distro: str
    os_version: str
    architecture: Architecture | None
    type: ImageType | None = None
    description: str = ""
    disk_format: DiskFormat | None = None
    min_disk_gb: int = 0
    hardware_model: str = ""
    supported_flavors: list[str] = field(default_factory=list)
    plugins: list[Plugin] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    protected: bool = False


@dataclass
class ImageChanges:
    """The fields UpdateImage may change; None means leave as is."""

    display_name: str | None = None
    description: str | None = None
    tags: list[str] | None = None
    min_disk_gb: int | None = None
    protected: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if v is not None}


def _enum_or_none(kind: type[E], value: str) -> E | None:
    try:
        return kind(value)
    except ValueError:
        return None


def _now() -> datetime:
    return datetime.now(UTC)


#: An image in these statuses is no answer to a retry: it failed or is gone.
_NO_LONGER_USABLE = frozenset({ImageStatus.KILLED, ImageStatus.DELETED})


def replayed(earlier: Image) -> Image:
    """The answer to a retry whose request_id already created `earlier`.

    AIP-155: a duplicate request returns the response of the first one,
    and a request id is never executed twice. While the image lives that
    answer is the image. Once it is KILLED or DELETED, answering with it
    as a success would tell the client it has an image it cannot use, and
    making a new one would run the request twice (a retry delayed past a
    delete would bring the image back). So the id stays consumed and the
    retry gets FAILED_PRECONDITION REQUEST_ID_CONSUMED, naming the image
    and its status: the client decides, with a new request_id."""
    if earlier.status not in _NO_LONGER_USABLE:
        return earlier
    name = f"images/{earlier.id}"
    status = earlier.status.value
    raise FailedPrecondition(
        "REQUEST_ID_CONSUMED",
        f"request_id {earlier.request_id} already created {name}, which is now {status}; "
        "the request will not run again: use a new request_id to create another image",
        [PreconditionViolation("REQUEST_ID", name, f"request_id created {name}, now {status}")],
        {
            "image": name,
            "status": status,
            "request_id": earlier.request_id or "",
            "method": earlier.request_method.value,
        },
    )


class ImageCatalog:
    def __init__(
        self,
        images: ImageRepository,
        flavors: FlavorCatalog,
        page_tokens: PageTokens,
        private_image_quota: int = DEFAULT_PRIVATE_IMAGE_QUOTA,
        clock: Callable[[], datetime] = _now,
        release_data: Callable[[str], Awaitable[None]] | None = None,
        members: MemberRepository | None = None,
        captures: CaptureProvider | None = None,
    ) -> None:
        self._images = images
        self._flavors = flavors
        self._tokens = page_tokens
        self._quota = private_image_quota
        self._clock = clock
        self._release_data = release_data
        self._members = members
        self._captures = captures

    @property
    def private_image_quota(self) -> int:
        return self._quota

    @property
    def flavors_fingerprint(self) -> int:
        """Changes with the flavors `supported_flavors` answers from."""
        return self._flavors.fingerprint

    def supported_flavors(self, image: Image) -> list[str]:
        if image.visibility is Visibility.PUBLIC:
            return list(image.supported_flavors)
        return self._flavors.names_for_model(image.hardware_model)

    async def get(self, caller: Caller, image_id: str) -> Image:
        image, _ = await self.get_with_membership(caller, image_id)
        return image

    async def describe(self, caller: Caller, image_id: str) -> Image:
        """GetImage: like get, but public and own images may come from the
        repository's memory of recent reads (read-only use: the answer is not
        the basis of any change, and this process's own changes show at once)."""
        image = await self._images.get_recent(image_id)
        if image is not None and (
            image.visibility is Visibility.PUBLIC or image.owner_project == caller.project
        ):
            return rules.require_visible(caller, image, image_id, None)
        return await self.get(caller, image_id)

    async def get_with_membership(
        self, caller: Caller, image_id: str
    ) -> tuple[Image, MemberStatus | None]:
        """The image if the caller can see it, and the caller's answer when
        the image is shared with it."""
        image = await self._images.get(image_id)
        membership = None
        if (
            image is not None
            and self._members is not None
            and image.visibility is Visibility.PRIVATE
            and image.owner_project != caller.project
        ):
            member = await self._members.get(image_id, caller.project)
            membership = member.status if member else None
        return rules.require_visible(caller, image, image_id, membership), membership

    async def list(
        self,
        caller: Caller,
        filter_text: str,
        page_size: int,
        page_token: str,
        known: Callable[[ListedImage], bool] | None = None,
    ) -> tuple[list[ListedImage], list[Image], str]:
        """A page of the images the caller sees that match the filter, named;
        the images of those not `known` (the renderer has them), read in the
        same unit of work; and the token of the next page ("" on the last)."""
        limit = page_size_or_default(page_size)
        query = ImageQuery(parse_filter(filter_text))
        for condition in query.values("flavor"):
            flavor = self._flavors.find(condition.value)
            if flavor is None:
                raise invalid_field(
                    "filter",
                    f"unknown flavor {condition.value!r}; known flavors: "
                    + ", ".join(f.name for f in self._flavors.all()),
                    reason="INVALID_FILTER",
                )
            query.flavor = (flavor.name, flavor.hardware_model)
        scope = f"{caller.project}\n{filter_text}"
        after = self._tokens.decode(page_token, scope)
        rows, images = await self._images.list_visible(caller, query, after, limit + 1, known)
        page, more = rows[:limit], len(rows) > limit
        next_token = self._tokens.encode(page[-1].seq, scope) if more else ""
        return page, images, next_token

    async def create(
        self,
        caller: Caller,
        new: NewImage,
        request_id: str = "",
        source_server: str = "",
        token: str = "",
    ) -> Image:
        """A retry with the same request_id returns the image of the first
        call (see `replayed` once that image is killed or deleted): the
        repository checks for it in the transaction that inserts (a capture
        checks first, so as not to hold the server again). Request ids of
        CreateImage and ReplicateImage are apart."""
        if request_id:
            rules.require_request_id(request_id)
        image_type = new.type or ImageType.PRIVATE
        if image_type is ImageType.SHARED:
            raise invalid_field("image.type", "cannot create a SHARED image; share a private one")
        if image_type is ImageType.PUBLIC and not caller.is_admin:
            raise PermissionDenied(
                "ADMIN_REQUIRED", "only a platform admin may create (publish) a public image"
            )
        if source_server:
            if image_type is not ImageType.PRIVATE:
                raise invalid_field("image.type", "a captured image is private")
            return await self._capture(caller, new, request_id, source_server, token)
        image = self._validated_image(caller, new, image_type, request_id or None)
        if image.visibility is Visibility.PUBLIC:
            created = await self._images.create_public(image)
        else:
            created = await self._images.create_private(image, self._quota)
        return created if created.id == image.id else replayed(created)

    async def _capture(
        self, caller: Caller, new: NewImage, request_id: str, server_id: str, token: str
    ) -> Image:
        """A private image of a stopped server's system disk: what it is comes
        from the disk and the server; the upload runs in the background."""
        if self._captures is None:
            raise FailedPrecondition(
                "CAPTURE_UNAVAILABLE",
                "this image service runs without the embedded provisioner and knows no "
                "provisioner to ask (BMS_IMAGE_PROVISIONER_ADDRESS), so it cannot capture servers",
            )
        if request_id:
            earlier = await self._images.find_by_request_id(
                caller.project, RequestMethod.CREATE, request_id
            )
            if earlier is not None:
                return replayed(earlier)
        source = await self._captures.prepare_capture(caller, token, server_id)
        try:
            described = NewImage(
                display_name=new.display_name,
                description=new.description,
                os_type=_enum_or_none(OsType, source.os_type),
                os_distro=source.os_distro,
                os_version=source.os_version,
                architecture=_enum_or_none(Architecture, source.architecture),
                min_disk_gb=new.min_disk_gb,
                hardware_model=source.hardware_model,
                plugins=list(source.plugins),
                tags=list(new.tags),
                protected=new.protected,
            )
            image = self._validated_image(caller, described, ImageType.PRIVATE, request_id or None)
            image.source_server = f"servers/{server_id}"
            image.partitions = list(source.partitions)
            created = await self._images.create_private(image, self._quota)
        except BaseException:
            await self._captures.release_capture(token, server_id)
            raise
        if created.id != image.id:  # a retry of an earlier capture
            await self._captures.release_capture(token, server_id)
            return replayed(created)
        try:
            await self._captures.start_capture(token, server_id, created.id)
        except BaseException as error:
            # Nothing will ever send this image's bytes: it fails, with the
            # reason, rather than stay QUEUED; the server is let go.
            why = error.message if isinstance(error, DomainError) else type(error).__name__
            await self._images.transition(
                created.id,
                {ImageStatus.QUEUED},
                {
                    "status": ImageStatus.KILLED,
                    "status_reason": f"the capture of servers/{server_id} could not start: {why}",
                },
            )
            with contextlib.suppress(DomainError):
                await self._captures.release_capture(token, server_id)
            raise
        return created

    def _validated_image(
        self, caller: Caller, new: NewImage, image_type: ImageType, request_id: str | None
    ) -> Image:
        violations: list[FieldViolation] = []
        violations += rules.validate_display_name(new.display_name, "image.display_name")
        violations += rules.validate_description(new.description)
        violations += rules.validate_tags(new.tags)
        min_disk = new.min_disk_gb or 40
        violations += rules.validate_min_disk_gb(min_disk)
        if new.os_type is None:
            violations.append(FieldViolation("image.os_type", "is required: LINUX or WINDOWS"))
        if new.architecture is None:
            violations.append(
                FieldViolation("image.architecture", "is required: X86_64 or AARCH64")
            )
        violations += rules.validate_word(
            "image.os_distro",
            new.os_distro,
            rules.OS_WORD_PATTERN,
            "lower-case distribution such as centos, ubuntu, windows-server",
        )
        violations += rules.validate_word(
            "image.os_version",
            new.os_version,
            rules.OS_WORD_PATTERN,
            "a version such as 7.6, 22.04 or 2019",
        )
        kinds = [p.kind for p in new.plugins]
        if len(set(kinds)) != len(kinds):
            violations.append(FieldViolation("image.plugins", "lists a plug-in more than once"))
        for index, plugin in enumerate(new.plugins):
            if not rules.OS_WORD_PATTERN.match(plugin.version):
                violations.append(
                    FieldViolation(f"image.plugins[{index}].version", "must be like 1.2.3")
                )
        public = image_type is ImageType.PUBLIC
        flavors: list[str] = []
        if public:
            if not new.supported_flavors:
                violations.append(
                    FieldViolation("image.supported_flavors", "a public image needs its flavors")
                )
            for name in new.supported_flavors:
                short = name.removeprefix("flavors/")
                if self._flavors.find(short) is None:
                    violations.append(
                        FieldViolation("image.supported_flavors", f"unknown flavor {name!r}")
                    )
                flavors.append(short)
        elif new.hardware_model not in self._flavors.hardware_models():
            violations.append(
                FieldViolation(
                    "image.hardware_model",
                    f"{new.hardware_model!r} is not a known hardware model; use one of "
                    + ", ".join(self._flavors.hardware_models()),
                )
            )
        rules.raise_if_invalid(violations)
        assert new.os_type is not None and new.architecture is not None
        now = self._clock()
        return Image(
            id=str(uuid.uuid4()),
            display_name=new.display_name,
            description=new.description,
            visibility=Visibility.PUBLIC if public else Visibility.PRIVATE,
            owner_project=None if public else caller.project,
            os_type=new.os_type,
            os_distro=new.os_distro,
            os_version=new.os_version,
            architecture=new.architecture,
            disk_format=new.disk_format or DiskFormat.RAW,
            min_disk_gb=min_disk,
            hardware_model="" if public else new.hardware_model,
            supported_flavors=sorted(set(flavors)),
            plugins=list(new.plugins),
            tags=list(new.tags),
            protected=new.protected,
            request_id=request_id,
            creator_project=caller.project,
            status=ImageStatus.QUEUED,
            create_time=now,
            update_time=now,
        )

    async def update(
        self, caller: Caller, image_id: str, changes: ImageChanges, etag: str = ""
    ) -> Image:
        violations: list[FieldViolation] = []
        if changes.display_name is not None:
            violations += rules.validate_display_name(changes.display_name, "image.display_name")
        if changes.description is not None:
            violations += rules.validate_description(changes.description)
        if changes.tags is not None:
            violations += rules.validate_tags(changes.tags)
        if changes.min_disk_gb is not None:
            violations += rules.validate_min_disk_gb(changes.min_disk_gb)
        rules.raise_if_invalid(violations)
        return await self._change(caller, image_id, etag, lambda image: {**changes.as_dict()})

    async def delete(self, caller: Caller, image_id: str, etag: str = "") -> None:
        def deletion(image: Image) -> dict[str, Any]:
            rules.require_deletable(image)
            rules.require_transition(image, ImageStatus.DELETED)
            return {"status": ImageStatus.DELETED}

        await self._change(caller, image_id, etag, deletion)
        if self._release_data is not None:
            try:
                await self._release_data(image_id)
            except Exception:  # the image is gone; leftovers are collected at the next start
                log.warning("could not remove the bytes of images/%s", image_id, exc_info=True)

    async def deprecate(self, caller: Caller, image_id: str) -> Image:
        if not caller.is_admin:
            # Check visibility first so a non-admin learns nothing it cannot see.
            await self.get(caller, image_id)
            raise PermissionDenied("ADMIN_REQUIRED", "only a platform admin may deprecate images")

        def deprecation(image: Image) -> dict[str, Any]:
            if image.visibility is not Visibility.PUBLIC:
                raise invalid_field("name", f"images/{image.id} is not a public image")
            return {"deprecated": True}

        return await self._change(caller, image_id, "", deprecation)

    async def _change(
        self,
        caller: Caller,
        image_id: str,
        etag: str,
        compute: Callable[[Image], dict[str, Any]],
    ) -> Image:
        """Read, check, and write conditionally on the revision read, so that
        two concurrent writers never lose an update. Without an etag a writer
        that lost the race re-reads and retries; with one it gets ABORTED.
        Without an etag the first read may come from recent reads, which may
        be behind another process's change: a write then finds another
        revision, and a refusal is never given on that memory; both are
        judged again on a fresh read (an etag always is)."""
        for attempt in range(UPDATE_RETRIES):
            from_memory = attempt == 0 and not etag
            try:
                if from_memory:
                    image = await self.describe(caller, image_id)
                else:
                    image = await self.get(caller, image_id)
                rules.require_can_modify(caller, image)
                rules.require_etag(image, etag)
                values = compute(image)
            except DomainError:
                if from_memory:
                    continue
                raise
            values["update_time"] = self._clock()
            updated = await self._images.update(image.id, image.revision, values)
            if updated is not None:
                return updated
            if etag:
                break
            await asyncio.sleep(random.uniform(0, 0.001 * (attempt + 1)))
        raise Aborted(
            "CONCURRENT_UPDATE",
            f"images/{image_id} was changed concurrently; read it again and retry",
        )
