"""In-memory stand-ins for the domain's ports, and builders of domain objects,
for the unit tests (import as `from unit_fakes import ...`).

InMemoryImages follows the contract of domain.ports.ImageRepository and the
semantics of store.repository.SqlImageRepository: copies in and out (no
shared mutable state with the caller), seq assigned on insert, quota counted
with rules.QUOTA_COUNTED_STATUSES, conditional writes bump the revision."""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection, Mapping
from datetime import UTC, datetime
from typing import Any

from bms_image.common.errors import QuotaExceeded, QuotaViolation
from bms_image.common.model import (
    Architecture,
    Caller,
    Flavor,
    Image,
    ImageStatus,
    MemberStatus,
    OsType,
    RequestMethod,
    Visibility,
)
from bms_image.images.domain.ports import ImageRepository
from bms_image.images.domain.query import Condition, ImageQuery, ListedImage
from bms_image.images.domain.rules import QUOTA_COUNTED_STATUSES

S4_MODEL = "s4-2288h-v5"
H2_MODEL = "h2-rh2288-v3"
FIXED_TIME = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)

#: The callers of the unit tests: two projects and an admin of neither.
ALPHA = Caller("alpha")
BETA = Caller("beta")
ADMIN = Caller("ops", frozenset({"admin"}))


def make_flavor(name: str, hardware_model: str) -> Flavor:
    return Flavor(
        name=name,
        hardware_model=hardware_model,
        cpu_cores=36,
        cpu_model="test cpu",
        memory_gib=192,
        local_disks="2 x 800 GB SSD",
        local_disk_gb=800,
        evs_boot=True,
        description="test flavor",
    )


FLAVORS = (
    make_flavor("physical.s4.large", S4_MODEL),
    make_flavor("physical.s4.xlarge", S4_MODEL),
    make_flavor("physical.h2.large", H2_MODEL),
)


def make_image(**overrides: Any) -> Image:
    """A private ACTIVE image of project alpha unless overridden."""
    values: dict[str, Any] = {
        "id": "11111111-1111-4111-8111-111111111111",
        "display_name": "centos 7.6",
        "visibility": Visibility.PRIVATE,
        "owner_project": "alpha",
        "os_type": OsType.LINUX,
        "os_distro": "centos",
        "os_version": "7.6",
        "architecture": Architecture.X86_64,
        "status": ImageStatus.ACTIVE,
        "hardware_model": S4_MODEL,
    }
    values.update(overrides)
    return Image(**values)


def _matches(caller: Caller, image: Image, condition: Condition, query: ImageQuery) -> bool:
    name, value = condition.field, condition.value
    if name == "owner_project" and image.owner_project is None:
        return False  # SQL: NULL = x and NOT (NULL = x) are both unknown, never true
    if name == "member_status":  # applied by the visibility check
        return True
    if name == "type":
        hit = {
            "public": image.visibility is Visibility.PUBLIC,
            "private": image.visibility is Visibility.PRIVATE
            and image.owner_project == caller.project,
            "shared": image.visibility is Visibility.PRIVATE
            and image.owner_project != caller.project,
        }[value]
    elif name in ("os_type", "os_distro", "os_version", "architecture", "status", "owner_project"):
        hit = str(getattr(image, name)) == value
    elif name == "name":
        if value.endswith("*"):
            hit = image.display_name.startswith(value[:-1])
        else:
            hit = image.display_name == value
    elif name == "tag":
        hit = value in image.tags
    elif name in ("protected", "deprecated"):
        hit = getattr(image, name) == (value == "true")
    elif name == "flavor":
        assert query.flavor is not None
        flavor_name, hardware_model = query.flavor
        if image.visibility is Visibility.PUBLIC:
            hit = flavor_name in image.supported_flavors
        else:
            hit = image.hardware_model == hardware_model
    else:
        raise AssertionError(f"unhandled filter field {name}")
    return hit != condition.negate


class InMemoryImages:
    """A small, faithful ImageRepository kept in a dict."""

    def __init__(self) -> None:
        self.rows: dict[str, Image] = {}
        #: (image id, member project) -> the member's answer, as the members table.
        self.shares: dict[tuple[str, str], MemberStatus] = {}
        self._seq = 0
        self.update_calls = 0

    def _insert(self, image: Image) -> Image:
        assert image.id not in self.rows, "duplicate image id"
        self._seq += 1
        stored = copy.deepcopy(image)
        stored.seq = self._seq
        stored.revision = 1
        self.rows[stored.id] = stored
        return copy.deepcopy(stored)

    def _counted(self, project: str) -> int:
        return sum(
            1
            for image in self.rows.values()
            if image.owner_project == project
            and image.visibility is Visibility.PRIVATE
            and image.status in QUOTA_COUNTED_STATUSES
        )

    async def get(self, image_id: str) -> Image | None:
        image = self.rows.get(image_id)
        return copy.deepcopy(image) if image is not None else None

    async def get_recent(self, image_id: str) -> Image | None:
        return await self.get(image_id)

    async def list_visible(
        self,
        caller: Caller,
        query: ImageQuery,
        after_seq: int,
        limit: int,
        known: Callable[[ListedImage], bool] | None = None,
    ) -> tuple[list[ListedImage], list[Image]]:
        statuses = query.member_statuses()

        def shared(image: Image) -> bool:
            answer = self.shares.get((image.id, caller.project))
            wanted = {MemberStatus.ACCEPTED} if statuses is None else statuses
            return answer is not None and answer in wanted

        def visible(image: Image) -> bool:
            if statuses is not None:  # member_status conditions ask for shared images only
                return shared(image)
            return (
                image.visibility is Visibility.PUBLIC
                or image.owner_project == caller.project
                or shared(image)
            )

        found = [
            image
            for image in sorted(self.rows.values(), key=lambda i: i.seq)
            if image.seq > after_seq
            and image.status is not ImageStatus.DELETED
            and visible(image)
            and (query.asks_deprecated or not image.deprecated)
            and all(_matches(caller, image, c, query) for c in query.conditions)
        ]
        listed = [
            ListedImage(image.id, image.revision, image.seq, image.visibility, image.owner_project)
            for image in found[:limit]
        ]
        wanted = {entry.id for entry in listed if known is None or not known(entry)}
        return listed, [copy.deepcopy(image) for image in found[:limit] if image.id in wanted]

    async def find_by_request_id(
        self, project: str, method: RequestMethod, request_id: str
    ) -> Image | None:
        for image in self.rows.values():
            if (image.creator_project, image.request_method, image.request_id) == (
                project,
                method,
                request_id,
            ):
                return copy.deepcopy(image)
        return None

    async def create_private(self, image: Image, quota_limit: int) -> Image:
        assert image.owner_project is not None
        project = image.owner_project
        if image.request_id:
            earlier = await self.find_by_request_id(
                image.creator_project, image.request_method, image.request_id
            )
            if earlier is not None:
                return earlier
        used = self._counted(project)
        if used >= quota_limit:
            raise QuotaExceeded(
                "IMAGE_QUOTA_EXCEEDED",
                f"project {project} already has {used} of its {quota_limit} private images",
                [QuotaViolation(f"projects/{project}", f"private images: limit {quota_limit}")],
                {"limit": str(quota_limit), "used": str(used)},
            )
        return self._insert(image)

    async def create_public(self, image: Image) -> Image:
        if image.request_id:
            earlier = await self.find_by_request_id(
                image.creator_project, image.request_method, image.request_id
            )
            if earlier is not None:
                return earlier
        return self._insert(image)

    def _apply(self, image: Image, changes: Mapping[str, Any]) -> Image:
        for key, value in changes.items():
            assert hasattr(image, key), f"no column {key}"
            setattr(image, key, copy.deepcopy(value))
        image.revision += 1
        return copy.deepcopy(image)

    async def update(
        self, image_id: str, expected_revision: int, changes: Mapping[str, Any]
    ) -> Image | None:
        self.update_calls += 1
        image = self.rows.get(image_id)
        if image is None or image.revision != expected_revision:
            return None
        return self._apply(image, changes)

    async def transition(
        self, image_id: str, from_statuses: Collection[ImageStatus], changes: Mapping[str, Any]
    ) -> Image | None:
        image = self.rows.get(image_id)
        if image is None or image.status not in from_statuses:
            return None
        return self._apply(image, changes)

    async def in_statuses(self, statuses: Collection[ImageStatus]) -> list[Image]:
        found = sorted(
            (image for image in self.rows.values() if image.status in statuses),
            key=lambda i: i.seq,
        )
        return [copy.deepcopy(image) for image in found]

    async def count_quota_used(self, project: str) -> int:
        return self._counted(project)


def _conforms(repository: InMemoryImages) -> ImageRepository:
    """Lets mypy check that the fake satisfies the port."""
    return repository
