"""domain.images.ImageCatalog against the in-memory repository."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from typing import Any

import pytest
from unit_fakes import ADMIN, ALPHA, BETA, FIXED_TIME, FLAVORS, H2_MODEL, S4_MODEL, InMemoryImages

from bms_image.common.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
)
from bms_image.common.flavors import FlavorCatalog
from bms_image.common.model import (
    Architecture,
    Caller,
    DiskFormat,
    Image,
    ImageStatus,
    ImageType,
    OsType,
    Plugin,
    PluginKind,
    Visibility,
)
from bms_image.common.paging import PageTokens
from bms_image.images.domain.images import UPDATE_RETRIES, ImageCatalog, ImageChanges, NewImage

QUOTA = 3


def new_image(**overrides: Any) -> NewImage:
    values: dict[str, Any] = {
        "display_name": "my centos",
        "os_type": OsType.LINUX,
        "os_distro": "centos",
        "os_version": "7.6",
        "architecture": Architecture.X86_64,
        "hardware_model": S4_MODEL,
    }
    values.update(overrides)
    return NewImage(**values)


def new_public(**overrides: Any) -> NewImage:
    values: dict[str, Any] = {
        "display_name": "CentOS 7.6 64bit",
        "type": ImageType.PUBLIC,
        "hardware_model": "",
        "supported_flavors": ["flavors/physical.s4.large", "physical.h2.large"],
    }
    values.update(overrides)
    return new_image(**values)


class Released:
    """release_data: records the images whose bytes were released."""

    def __init__(self, fail: bool = False) -> None:
        self.ids: list[str] = []
        self.fail = fail

    async def __call__(self, image_id: str) -> None:
        self.ids.append(image_id)
        if self.fail:
            raise OSError("disk on fire")


@pytest.fixture
def repo() -> InMemoryImages:
    return InMemoryImages()


@pytest.fixture
def released() -> Released:
    return Released()


@pytest.fixture
def catalog(repo: InMemoryImages, released: Released) -> ImageCatalog:
    return ImageCatalog(
        repo,
        FlavorCatalog(FLAVORS),
        PageTokens(b"page-token-key-" + b"k" * 17),
        private_image_quota=QUOTA,
        clock=lambda: FIXED_TIME,
        release_data=released,
    )


def violation_fields(error: InvalidArgument) -> set[str]:
    return {v.field for v in error.violations}


# --- create ------------------------------------------------------------------


async def test_create_private_image(catalog: ImageCatalog, repo: InMemoryImages) -> None:
    image = await catalog.create(ALPHA, new_image(tags=["lts", "web"]))
    assert uuid.UUID(image.id).version == 4
    assert image.visibility is Visibility.PRIVATE
    assert image.owner_project == "alpha"
    assert image.status is ImageStatus.QUEUED
    assert image.min_disk_gb == 40, "0 means the documented default"
    assert image.disk_format is DiskFormat.RAW
    assert image.tags == ["lts", "web"]
    assert image.create_time == image.update_time == FIXED_TIME
    assert image.revision == 1 and image.etag == '"1"'
    assert catalog.supported_flavors(image) == ["physical.s4.large", "physical.s4.xlarge"]
    assert list(repo.rows) == [image.id]
    assert await catalog.get(ALPHA, image.id) == image
    with pytest.raises(NotFound):
        await catalog.get(BETA, image.id)
    with pytest.raises(NotFound):
        await catalog.get(ADMIN, image.id)


async def test_create_keeps_what_was_asked(catalog: ImageCatalog) -> None:
    plugins = [Plugin(PluginKind.CLOUD_INIT, "0.7.9"), Plugin(PluginKind.BMS_NETWORK_CONFIG, "1")]
    image = await catalog.create(
        ALPHA,
        new_image(
            description="d" * 1024,
            disk_format=DiskFormat.QCOW2,
            min_disk_gb=1024,
            plugins=plugins,
            protected=True,
            hardware_model=H2_MODEL,
            os_type=OsType.WINDOWS,
            architecture=Architecture.AARCH64,
        ),
    )
    assert image.description == "d" * 1024
    assert image.disk_format is DiskFormat.QCOW2
    assert image.min_disk_gb == 1024
    assert image.plugins == plugins
    assert image.protected is True
    assert image.os_type is OsType.WINDOWS and image.architecture is Architecture.AARCH64
    assert catalog.supported_flavors(image) == ["physical.h2.large"]


@pytest.mark.parametrize("min_disk_gb", [1, 40, 1024])
async def test_create_min_disk_bounds_accepted(catalog: ImageCatalog, min_disk_gb: int) -> None:
    assert (await catalog.create(ALPHA, new_image(min_disk_gb=min_disk_gb))).min_disk_gb == (
        min_disk_gb
    )


async def test_create_public_image_by_admin(catalog: ImageCatalog, repo: InMemoryImages) -> None:
    image = await catalog.create(ADMIN, new_public())
    assert image.visibility is Visibility.PUBLIC
    assert image.owner_project is None
    assert image.hardware_model == ""
    assert image.supported_flavors == ["physical.h2.large", "physical.s4.large"]
    assert catalog.supported_flavors(image) == ["physical.h2.large", "physical.s4.large"]
    for caller in (ALPHA, BETA, ADMIN):
        assert (await catalog.get(caller, image.id)).id == image.id
    assert await repo.count_quota_used("ops") == 0


async def test_non_admin_may_not_create_a_public_image(
    catalog: ImageCatalog, repo: InMemoryImages
) -> None:
    with pytest.raises(PermissionDenied) as caught:
        await catalog.create(ALPHA, new_public())
    assert caught.value.reason == "ADMIN_REQUIRED"
    assert repo.rows == {}


@pytest.mark.parametrize("caller", [ALPHA, ADMIN])
async def test_shared_images_cannot_be_created(
    catalog: ImageCatalog, repo: InMemoryImages, caller: Caller
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await catalog.create(caller, new_image(type=ImageType.SHARED))
    assert violation_fields(caught.value) == {"image.type"}
    assert repo.rows == {}


@pytest.mark.parametrize("model", ["", "s4-2288h-v9", "S4-2288H-V5", "physical.s4.large"])
async def test_unknown_hardware_model(
    catalog: ImageCatalog, repo: InMemoryImages, model: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await catalog.create(ALPHA, new_image(hardware_model=model))
    assert caught.value.reason == "INVALID_IMAGE"
    assert violation_fields(caught.value) == {"image.hardware_model"}
    assert S4_MODEL in caught.value.violations[0].description, "names the known models"
    assert repo.rows == {}


async def test_public_image_needs_known_flavors(catalog: ImageCatalog) -> None:
    for flavors in ([], ["physical.nope"], ["physical.s4.large", "flavors/nope"]):
        with pytest.raises(InvalidArgument) as caught:
            await catalog.create(ADMIN, new_public(supported_flavors=flavors))
        assert violation_fields(caught.value) == {"image.supported_flavors"}, flavors


async def test_create_reports_every_bad_field_at_once(
    catalog: ImageCatalog, repo: InMemoryImages
) -> None:
    bad = new_image(
        display_name="",
        os_type=None,
        architecture=None,
        os_distro="CentOS",
        os_version="",
        plugins=[Plugin(PluginKind.CLOUD_INIT, "1.0"), Plugin(PluginKind.CLOUD_INIT, "bad v")],
        hardware_model="unknown",
    )
    with pytest.raises(InvalidArgument) as caught:
        await catalog.create(ALPHA, bad)
    assert caught.value.reason == "INVALID_IMAGE"
    assert violation_fields(caught.value) == {
        "image.display_name",
        "image.os_type",
        "image.architecture",
        "image.os_distro",
        "image.os_version",
        "image.plugins",
        "image.plugins[1].version",
        "image.hardware_model",
    }
    assert all(v.description for v in caught.value.violations)
    assert repo.rows == {}


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"display_name": "x" * 129}, "image.display_name"),
        ({"display_name": "tab\there"}, "image.display_name"),
        ({"description": "d" * 1025}, "image.description"),
        ({"tags": [f"t{i}" for i in range(11)]}, "image.tags"),
        ({"tags": ["a", "a"]}, "image.tags"),
        ({"tags": ["ok", "not ok"]}, "image.tags[1]"),
        ({"min_disk_gb": 1025}, "image.min_disk_gb"),
        ({"min_disk_gb": -1}, "image.min_disk_gb"),
    ],
)
async def test_create_violations_name_the_request_fields(
    catalog: ImageCatalog, overrides: dict[str, Any], field: str
) -> None:
    # CreateImageRequest carries the image in `image`: every other violation
    # is named image.<field>, and BadRequest field paths are request paths.
    with pytest.raises(InvalidArgument) as caught:
        await catalog.create(ALPHA, new_image(**overrides))
    assert violation_fields(caught.value) == {field}


async def test_request_id_must_be_a_uuid(catalog: ImageCatalog, repo: InMemoryImages) -> None:
    for request_id in ("not-a-uuid", "1234", "' OR 1=1 --", "0" * 33):
        with pytest.raises(InvalidArgument) as caught:
            await catalog.create(ALPHA, new_image(), request_id=request_id)
        assert violation_fields(caught.value) == {"request_id"}
    assert repo.rows == {}


@pytest.mark.parametrize(
    "spelling",
    [
        "{abcdef12-3456-4789-abcd-ef1234567890}",
        "urn:uuid:abcdef12-3456-4789-abcd-ef1234567890",
        "abcdef1234564789abcdef1234567890",
        "ABCDEF12-3456-4789-ABCD-EF1234567890",
    ],
    ids=["braces", "urn", "hex", "upper"],
)
async def test_request_id_in_another_spelling_is_refused_or_made_canonical(
    catalog: ImageCatalog, spelling: str
) -> None:
    # uuid.UUID() accepts these spellings. Stored as given, they defeat the
    # idempotency of a retry in canonical form, and the braced and urn ones do
    # not fit the 36-character request_id column.
    canonical = "abcdef12-3456-4789-abcd-ef1234567890"
    try:
        image = await catalog.create(ALPHA, new_image(), request_id=spelling)
    except InvalidArgument as error:
        assert violation_fields(error) == {"request_id"}
        return
    assert image.request_id == canonical
    assert (await catalog.create(ALPHA, new_image(), request_id=canonical)).id == image.id


async def created_twice(
    catalog: ImageCatalog, caller: Caller, build: Callable[[], NewImage], request_id: str
) -> tuple[Image, Image]:
    """What a create answers, and what its retry with the same request_id answers."""
    first = await catalog.create(caller, build(), request_id=request_id)
    again = await catalog.create(caller, build(), request_id=request_id)
    return first, again


async def test_retry_with_the_same_request_id_returns_the_same_image(
    catalog: ImageCatalog, repo: InMemoryImages
) -> None:
    request_id = str(uuid.uuid4())
    first, again = await created_twice(catalog, ALPHA, new_image, request_id)
    assert again == first
    # Even a retry whose payload changed creates nothing new.
    changed = await catalog.create(ALPHA, new_image(display_name="other"), request_id=request_id)
    assert changed.id == first.id and changed.display_name == "my centos"
    assert len(repo.rows) == 1
    # The key belongs to the project that used it.
    other = await catalog.create(BETA, new_image(), request_id=request_id)
    assert other.id != first.id and other.owner_project == "beta"
    # No key, no idempotency.
    assert (await catalog.create(ALPHA, new_image())).id != first.id
    assert len(repo.rows) == 3


async def test_retry_of_a_public_create_returns_the_same_image(
    catalog: ImageCatalog, repo: InMemoryImages
) -> None:
    request_id = str(uuid.uuid4())
    first, again = await created_twice(catalog, ADMIN, new_public, request_id)
    assert again.id == first.id
    assert len(repo.rows) == 1


async def test_retry_at_full_quota_returns_the_image_instead_of_failing(
    catalog: ImageCatalog,
) -> None:
    request_id = str(uuid.uuid4())
    first = await catalog.create(ALPHA, new_image(), request_id=request_id)
    for _ in range(QUOTA - 1):
        await catalog.create(ALPHA, new_image())
    assert (await catalog.create(ALPHA, new_image(), request_id=request_id)).id == first.id


# --- quota -------------------------------------------------------------------


async def test_quota_limit(catalog: ImageCatalog, repo: InMemoryImages) -> None:
    for _ in range(QUOTA):
        await catalog.create(ALPHA, new_image())
    with pytest.raises(QuotaExceeded) as caught:
        await catalog.create(ALPHA, new_image())
    error = caught.value
    assert error.reason == "IMAGE_QUOTA_EXCEEDED"
    assert [v.subject for v in error.violations] == ["projects/alpha"]
    assert str(QUOTA) in error.violations[0].description
    assert await repo.count_quota_used("alpha") == QUOTA
    assert len(repo.rows) == QUOTA
    # Another project has a quota of its own.
    await catalog.create(BETA, new_image())


async def test_invalid_request_at_full_quota_is_invalid_not_over_quota(
    catalog: ImageCatalog,
) -> None:
    for _ in range(QUOTA):
        await catalog.create(ALPHA, new_image())
    with pytest.raises(InvalidArgument):
        await catalog.create(ALPHA, new_image(display_name=""))


async def test_public_images_hold_no_quota(catalog: ImageCatalog) -> None:
    admin_of_alpha = Caller("alpha", frozenset({"admin"}))
    for _ in range(QUOTA + 1):
        await catalog.create(admin_of_alpha, new_public())
    for _ in range(QUOTA):
        await catalog.create(admin_of_alpha, new_image())


async def test_deleting_frees_a_quota_slot(catalog: ImageCatalog) -> None:
    images = [await catalog.create(ALPHA, new_image()) for _ in range(QUOTA)]
    await catalog.delete(ALPHA, images[0].id)
    await catalog.create(ALPHA, new_image())
    with pytest.raises(QuotaExceeded):
        await catalog.create(ALPHA, new_image())


@pytest.mark.parametrize(
    ("status", "frees"),
    [
        (ImageStatus.KILLED, True),
        (ImageStatus.DELETED, True),
        (ImageStatus.QUEUED, False),
        (ImageStatus.SAVING, False),
        (ImageStatus.ACTIVE, False),
        (ImageStatus.DEACTIVATED, False),
    ],
)
async def test_which_statuses_free_a_quota_slot(
    catalog: ImageCatalog, repo: InMemoryImages, status: ImageStatus, frees: bool
) -> None:
    images = [await catalog.create(ALPHA, new_image()) for _ in range(QUOTA)]
    repo.rows[images[0].id].status = status
    if frees:
        await catalog.create(ALPHA, new_image())
    else:
        with pytest.raises(QuotaExceeded):
            await catalog.create(ALPHA, new_image())


# --- update ------------------------------------------------------------------


async def test_update_changes_only_what_was_asked(catalog: ImageCatalog) -> None:
    image = await catalog.create(ALPHA, new_image(description="old", tags=["a"]))
    updated = await catalog.update(
        ALPHA, image.id, ImageChanges(display_name="new name", tags=["b", "c"]), image.etag
    )
    assert (updated.display_name, updated.tags) == ("new name", ["b", "c"])
    assert updated.description == "old" and updated.min_disk_gb == image.min_disk_gb
    assert updated.revision == image.revision + 1 and updated.etag != image.etag
    assert await catalog.get(ALPHA, image.id) == updated


async def test_update_can_clear_protected_and_tags(catalog: ImageCatalog) -> None:
    image = await catalog.create(ALPHA, new_image(protected=True, tags=["a"]))
    updated = await catalog.update(ALPHA, image.id, ImageChanges(protected=False, tags=[]))
    assert updated.protected is False and updated.tags == []


async def test_update_with_stale_etag_is_aborted(catalog: ImageCatalog) -> None:
    image = await catalog.create(ALPHA, new_image())
    await catalog.update(ALPHA, image.id, ImageChanges(description="first"), image.etag)
    with pytest.raises(Aborted) as caught:
        await catalog.update(ALPHA, image.id, ImageChanges(description="second"), image.etag)
    assert caught.value.reason == "ETAG_MISMATCH"
    assert (await catalog.get(ALPHA, image.id)).description == "first"


async def test_update_validates(catalog: ImageCatalog) -> None:
    image = await catalog.create(ALPHA, new_image())
    with pytest.raises(InvalidArgument) as caught:
        await catalog.update(ALPHA, image.id, ImageChanges(display_name="", min_disk_gb=0))
    assert "image.display_name" in violation_fields(caught.value)
    assert len(caught.value.violations) == 2
    assert (await catalog.get(ALPHA, image.id)).revision == image.revision


async def test_update_violations_name_the_request_fields(catalog: ImageCatalog) -> None:
    # UpdateImageRequest carries the new values in `image`, like display_name's.
    image = await catalog.create(ALPHA, new_image())
    changes = ImageChanges(description="d" * 1025, tags=["a", "a"], min_disk_gb=0)
    with pytest.raises(InvalidArgument) as caught:
        await catalog.update(ALPHA, image.id, changes)
    assert violation_fields(caught.value) == {
        "image.description",
        "image.tags",
        "image.min_disk_gb",
    }


async def test_update_of_another_projects_image_is_not_found(catalog: ImageCatalog) -> None:
    image = await catalog.create(ALPHA, new_image())
    for caller in (BETA, ADMIN):
        with pytest.raises(NotFound):
            await catalog.update(caller, image.id, ImageChanges(description="mine now"))
    assert (await catalog.get(ALPHA, image.id)).description == ""


async def test_only_admin_updates_public_images(catalog: ImageCatalog) -> None:
    image = await catalog.create(ADMIN, new_public())
    with pytest.raises(PermissionDenied) as caught:
        await catalog.update(ALPHA, image.id, ImageChanges(description="defaced"))
    assert caught.value.reason == "PUBLIC_IMAGE_READ_ONLY"
    updated = await catalog.update(ADMIN, image.id, ImageChanges(description="curated"))
    assert updated.description == "curated"


async def test_update_of_missing_image(catalog: ImageCatalog) -> None:
    with pytest.raises(NotFound) as caught:
        await catalog.update(ALPHA, str(uuid.uuid4()), ImageChanges(description="x"))
    assert caught.value.reason == "IMAGE_NOT_FOUND"


class RacingImages(InMemoryImages):
    """Another writer changes the image between each read and write, `races` times."""

    def __init__(self, races: int) -> None:
        super().__init__()
        self.races = races

    async def update(
        self, image_id: str, expected_revision: int, changes: Mapping[str, Any]
    ) -> Image | None:
        if self.races > 0:
            self.races -= 1
            self.rows[image_id].revision += 1  # the other writer's commit
        return await super().update(image_id, expected_revision, changes)


def racing_catalog(races: int) -> tuple[ImageCatalog, RacingImages]:
    repo = RacingImages(races)
    catalog = ImageCatalog(
        repo, FlavorCatalog(FLAVORS), PageTokens(b"k" * 32), clock=lambda: FIXED_TIME
    )
    return catalog, repo


async def test_lost_race_without_etag_is_retried() -> None:
    catalog, repo = racing_catalog(races=0)
    image = await catalog.create(ALPHA, new_image())
    repo.races = 2
    updated = await catalog.update(ALPHA, image.id, ImageChanges(description="mine"))
    assert updated.description == "mine"
    assert repo.update_calls == 3


async def test_lost_race_with_etag_is_aborted() -> None:
    catalog, repo = racing_catalog(races=0)
    image = await catalog.create(ALPHA, new_image())
    repo.races = 1
    with pytest.raises(Aborted) as caught:
        await catalog.update(ALPHA, image.id, ImageChanges(description="mine"), image.etag)
    assert caught.value.reason == "CONCURRENT_UPDATE"
    assert repo.update_calls == 1
    assert (await catalog.get(ALPHA, image.id)).description == ""


async def test_endless_races_give_up() -> None:
    catalog, repo = racing_catalog(races=0)
    image = await catalog.create(ALPHA, new_image())
    repo.races = 1000
    with pytest.raises(Aborted) as caught:
        await catalog.update(ALPHA, image.id, ImageChanges(description="mine"))
    assert caught.value.reason == "CONCURRENT_UPDATE"
    assert 1 < repo.update_calls <= UPDATE_RETRIES


# --- delete ------------------------------------------------------------------


async def test_delete(catalog: ImageCatalog, repo: InMemoryImages, released: Released) -> None:
    image = await catalog.create(ALPHA, new_image())
    await catalog.delete(ALPHA, image.id, image.etag)
    assert repo.rows[image.id].status is ImageStatus.DELETED
    assert released.ids == [image.id]
    with pytest.raises(NotFound):
        await catalog.get(ALPHA, image.id)
    with pytest.raises(NotFound):
        await catalog.delete(ALPHA, image.id)
    assert released.ids == [image.id]


async def test_delete_protected_image_fails(
    catalog: ImageCatalog, repo: InMemoryImages, released: Released
) -> None:
    image = await catalog.create(ALPHA, new_image(protected=True))
    with pytest.raises(FailedPrecondition) as caught:
        await catalog.delete(ALPHA, image.id)
    assert caught.value.reason == "IMAGE_PROTECTED"
    assert repo.rows[image.id].status is ImageStatus.QUEUED
    assert released.ids == []
    await catalog.update(ALPHA, image.id, ImageChanges(protected=False))
    await catalog.delete(ALPHA, image.id)
    assert repo.rows[image.id].status is ImageStatus.DELETED


async def test_delete_with_stale_etag_is_aborted(
    catalog: ImageCatalog, repo: InMemoryImages
) -> None:
    image = await catalog.create(ALPHA, new_image())
    await catalog.update(ALPHA, image.id, ImageChanges(description="changed"))
    with pytest.raises(Aborted):
        await catalog.delete(ALPHA, image.id, image.etag)
    assert repo.rows[image.id].status is ImageStatus.QUEUED


async def test_delete_permissions(catalog: ImageCatalog, repo: InMemoryImages) -> None:
    private = await catalog.create(ALPHA, new_image())
    public = await catalog.create(ADMIN, new_public())
    with pytest.raises(NotFound):
        await catalog.delete(BETA, private.id)
    with pytest.raises(PermissionDenied):
        await catalog.delete(ALPHA, public.id)
    await catalog.delete(ADMIN, public.id)
    assert repo.rows[public.id].status is ImageStatus.DELETED
    assert repo.rows[private.id].status is ImageStatus.QUEUED


async def test_delete_survives_a_failure_to_release_the_bytes(repo: InMemoryImages) -> None:
    failing = Released(fail=True)
    catalog = ImageCatalog(
        repo, FlavorCatalog(FLAVORS), PageTokens(b"k" * 32), release_data=failing
    )
    image = await catalog.create(ALPHA, new_image())
    await catalog.delete(ALPHA, image.id)
    assert failing.ids == [image.id]
    assert repo.rows[image.id].status is ImageStatus.DELETED


@pytest.mark.parametrize("status", [s for s in ImageStatus if s is not ImageStatus.DELETED])
async def test_delete_from_every_live_status(
    catalog: ImageCatalog, repo: InMemoryImages, status: ImageStatus
) -> None:
    image = await catalog.create(ALPHA, new_image())
    repo.rows[image.id].status = status
    await catalog.delete(ALPHA, image.id)
    assert repo.rows[image.id].status is ImageStatus.DELETED


# --- deprecate ---------------------------------------------------------------


async def test_deprecate_by_non_admin(catalog: ImageCatalog, repo: InMemoryImages) -> None:
    public = await catalog.create(ADMIN, new_public())
    with pytest.raises(PermissionDenied) as caught:
        await catalog.deprecate(ALPHA, public.id)
    assert caught.value.reason == "ADMIN_REQUIRED"
    assert repo.rows[public.id].deprecated is False
    # An image the caller cannot see stays NOT_FOUND, never PERMISSION_DENIED.
    private = await catalog.create(BETA, new_image())
    with pytest.raises(NotFound):
        await catalog.deprecate(ALPHA, private.id)
    with pytest.raises(NotFound):
        await catalog.deprecate(ALPHA, str(uuid.uuid4()))


async def test_deprecate_by_admin(catalog: ImageCatalog) -> None:
    public = await catalog.create(ADMIN, new_public())
    deprecated = await catalog.deprecate(ADMIN, public.id)
    assert deprecated.deprecated is True and deprecated.revision == public.revision + 1
    page, _, _ = await catalog.list(ALPHA, "", 0, "")
    assert page == []
    page, _, _ = await catalog.list(ALPHA, "deprecated = true", 0, "")
    assert [i.id for i in page] == [public.id]
    assert (await catalog.get(ALPHA, public.id)).deprecated, "still readable by id"


async def test_admin_cannot_deprecate_a_private_image(catalog: ImageCatalog) -> None:
    admin_of_alpha = Caller("alpha", frozenset({"admin"}))
    own = await catalog.create(admin_of_alpha, new_image())
    with pytest.raises(InvalidArgument):
        await catalog.deprecate(admin_of_alpha, own.id)
    foreign = await catalog.create(BETA, new_image())
    with pytest.raises(NotFound):
        await catalog.deprecate(ADMIN, foreign.id)


# --- list --------------------------------------------------------------------


async def list_all(
    catalog: ImageCatalog, caller: Caller, filter_text: str = "", page_size: int = 0
) -> tuple[list[str], int]:
    """Every image id over all pages, and the number of pages."""
    ids: list[str] = []
    token, pages = "", 0
    while True:
        page, _, token = await catalog.list(caller, filter_text, page_size, token)
        pages += 1
        assert page_size == 0 or len(page) <= page_size
        ids += [image.id for image in page]
        if not token:
            return ids, pages
        assert page, "a page with a next token is never empty"


@pytest.mark.parametrize(
    ("count", "page_size", "pages"),
    [(0, 3, 1), (1, 3, 1), (6, 3, 2), (7, 3, 3), (7, 1, 7), (7, 0, 1)],
)
async def test_pagination_yields_every_image_once(
    catalog: ImageCatalog, count: int, page_size: int, pages: int
) -> None:
    published = [await catalog.create(ADMIN, new_public()) for _ in range(count)]
    expected = [image.id for image in published]
    ids, used = await list_all(catalog, ALPHA, page_size=page_size)
    assert ids == expected, "oldest first, each once"
    assert used == pages


async def test_list_shows_public_and_own_images_only(catalog: ImageCatalog) -> None:
    public = await catalog.create(ADMIN, new_public())
    mine = await catalog.create(ALPHA, new_image())
    await catalog.create(BETA, new_image())
    deleted = await catalog.create(ALPHA, new_image())
    await catalog.delete(ALPHA, deleted.id)
    assert (await list_all(catalog, ALPHA))[0] == [public.id, mine.id]
    assert (await list_all(catalog, ALPHA, "type = private"))[0] == [mine.id]
    assert (await list_all(catalog, ALPHA, "type = public"))[0] == [public.id]


async def test_pagination_with_filter_and_concurrent_changes(
    catalog: ImageCatalog, repo: InMemoryImages
) -> None:
    images = [await catalog.create(ADMIN, new_public(tags=[f"n{i}"])) for i in range(6)]
    page, _, token = await catalog.list(ALPHA, "os_type = linux", 2, "")
    assert [i.id for i in page] == [images[0].id, images[1].id]
    await catalog.delete(ADMIN, images[0].id)  # on a page already read
    await catalog.delete(ADMIN, images[2].id)  # on a page not read yet
    added = await catalog.create(ADMIN, new_public())
    rest: list[str] = []
    while token:
        page, _, token = await catalog.list(ALPHA, "os_type = linux", 2, token)
        rest += [i.id for i in page]
    assert rest == [images[3].id, images[4].id, images[5].id, added.id]


async def test_page_token_is_bound_to_caller_and_filter(catalog: ImageCatalog) -> None:
    for _ in range(3):
        await catalog.create(ADMIN, new_public())
    _, _, token = await catalog.list(ALPHA, "type = public", 1, "")
    assert token
    for caller, filter_text in ((BETA, "type = public"), (ALPHA, ""), (ALPHA, "type = private")):
        with pytest.raises(InvalidArgument) as caught:
            await catalog.list(caller, filter_text, 1, token)
        assert caught.value.reason == "INVALID_PAGE_TOKEN"
    with pytest.raises(InvalidArgument):
        await catalog.list(ALPHA, "type = public", 1, token[:-3] + "AAA")
    # The page size may change between pages.
    page, _, _ = await catalog.list(ALPHA, "type = public", 10, token)
    assert len(page) == 2


async def test_list_refuses_bad_page_sizes_and_filters(catalog: ImageCatalog) -> None:
    for page_size in (-1, 1001):
        with pytest.raises(InvalidArgument):
            await catalog.list(ALPHA, "", page_size, "")
    with pytest.raises(InvalidArgument) as caught:
        await catalog.list(ALPHA, "flavor = physical.nope", 0, "")
    assert caught.value.reason == "INVALID_FILTER"
    assert "physical.s4.large" in caught.value.message
    with pytest.raises(InvalidArgument) as caught:
        await catalog.list(ALPHA, "colour = red", 0, "")
    assert caught.value.reason == "INVALID_FILTER"


async def test_list_by_flavor(catalog: ImageCatalog) -> None:
    public = await catalog.create(ADMIN, new_public(supported_flavors=["physical.s4.large"]))
    s4 = await catalog.create(ALPHA, new_image(hardware_model=S4_MODEL))
    h2 = await catalog.create(ALPHA, new_image(hardware_model=H2_MODEL))
    assert (await list_all(catalog, ALPHA, "flavor = physical.s4.large"))[0] == [public.id, s4.id]
    assert (await list_all(catalog, ALPHA, "flavor = flavors/physical.s4.xlarge"))[0] == [s4.id]
    assert (await list_all(catalog, ALPHA, "flavor = physical.h2.large"))[0] == [h2.id]


async def test_a_refusal_is_never_given_on_a_memory_that_may_be_behind(
    catalog: ImageCatalog, repo: InMemoryImages
) -> None:
    """GetImage's memory may still say "protected" for a second after another
    replica cleared it: a delete judged on that memory is judged again on a
    fresh read before anyone is refused."""
    image = await catalog.create(ALPHA, new_image(protected=True))
    remembered = await repo.get(image.id)
    await catalog.update(ALPHA, image.id, ImageChanges(protected=False))  # "another replica"

    async def behind(image_id: str) -> Image | None:
        return remembered

    repo.get_recent = behind  # type: ignore[method-assign]
    await catalog.delete(ALPHA, image.id)
    assert (await repo.get(image.id)).status is ImageStatus.DELETED  # type: ignore[union-attr]
