"""RecentImages, the memory behind get_recent, on its own (no database): what
the repository's calls through the ImageCache seam leave remembered."""

from __future__ import annotations

import dataclasses

import pytest

from bms_image.common.model import Architecture, Image, OsType, Visibility
from bms_image.images.adapters.cache import ImageCache, RecentImages


def _image(image_id: str = "a", revision: int = 1) -> Image:
    return Image(
        id=image_id,
        display_name=f"image {image_id}",
        visibility=Visibility.PRIVATE,
        owner_project="alpha",
        os_type=OsType.LINUX,
        os_distro="centos",
        os_version="7.6",
        architecture=Architecture.X86_64,
        revision=revision,
    )


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> _Clock:
    return _Clock()


def test_a_read_is_remembered_until_it_expires(clock: _Clock) -> None:
    cache: ImageCache = RecentImages(seconds=5, clock=clock)
    image = _image()
    cache.read(image, cache.reading())
    assert cache.fresh("a") is image
    clock.now += 5
    assert cache.fresh("a") is None
    assert cache.last_known("a") is image  # an update may still reuse its lists


def test_a_read_that_overlapped_a_write_is_not_remembered(clock: _Clock) -> None:
    cache = RecentImages(seconds=60, clock=clock)
    since = cache.reading()
    cache.wrote("a", None)  # a write of this process while the read ran
    cache.read(_image(), since)
    assert cache.fresh("a") is None and cache.last_known("a") is None


def test_a_write_replaces_what_was_remembered(clock: _Clock) -> None:
    cache = RecentImages(seconds=60, clock=clock)
    cache.read(_image(), cache.reading())
    written = _image(revision=2)
    cache.wrote("a", written)
    assert cache.fresh("a") is written
    cache.wrote("a", None)  # written, but the result is not known
    assert cache.fresh("a") is None and cache.last_known("a") is None


def test_the_least_recently_used_is_forgotten_first(clock: _Clock) -> None:
    cache = RecentImages(seconds=60, limit=2, clock=clock)
    for image_id in "ab":
        cache.read(_image(image_id), cache.reading())
    assert cache.fresh("a") is not None  # now b is the least recently used
    cache.read(_image("c"), cache.reading())
    assert [cache.last_known(i) is not None for i in "abc"] == [True, False, True]


def test_without_seconds_nothing_is_remembered(clock: _Clock) -> None:
    cache = RecentImages(seconds=0, clock=clock)
    cache.read(_image(), cache.reading())
    cache.wrote("a", dataclasses.replace(_image(), revision=2))
    assert cache.fresh("a") is None and cache.last_known("a") is None
