"""The memory behind GetImage (SqlImageRepository.get_recent): images read or
written lately, kept for a few seconds. This process's own writes replace an
entry at once; another process's are seen once the entry expires."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from bms_image.common.model import Image


class ImageCache(Protocol):
    """What the repository asks of a memory of images: the whole seam."""

    def fresh(self, image_id: str) -> Image | None:
        """The image as remembered, if not yet expired. Shared: never modify it."""

    def last_known(self, image_id: str) -> Image | None:
        """The image as last remembered, expired or not (an update compares
        its revision before reusing its tags and flavors)."""

    def reading(self) -> int:
        """Marks the start of a read of the database, for `read`."""

    def read(self, image: Image, since: int) -> None:
        """The image a read that began at `since` found: remembered unless a
        write of this process happened meanwhile (it may be older)."""

    def wrote(self, image_id: str, result: Image | None) -> None:
        """After a write of this process: what was remembered of the image is
        forgotten, and the image as written (when known) remembered."""


class RecentImages:
    """At most `limit` images, each for `seconds` (nothing when seconds <= 0),
    the least recently used forgotten first."""

    def __init__(
        self,
        seconds: float = 0.0,
        limit: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        #: (image, monotonic expiry) by image id.
        self._recent: OrderedDict[str, tuple[Image, float]] = OrderedDict()
        self._seconds = seconds
        self._limit = limit
        self._clock = clock
        #: Writes of this process so far: a read that saw a write happen while
        #: it ran does not remember its (maybe older) result.
        self._writes = 0

    def fresh(self, image_id: str) -> Image | None:
        if self._seconds <= 0:
            return None
        remembered = self._recent.get(image_id)
        if remembered is not None and remembered[1] > self._clock():
            self._recent.move_to_end(image_id)
            return remembered[0]
        return None

    def last_known(self, image_id: str) -> Image | None:
        remembered = self._recent.get(image_id)
        return remembered[0] if remembered is not None else None

    def reading(self) -> int:
        return self._writes

    def read(self, image: Image, since: int) -> None:
        if self._seconds > 0 and since == self._writes:
            self._remember(image)

    def wrote(self, image_id: str, result: Image | None) -> None:
        self._writes += 1
        self._recent.pop(image_id, None)
        if result is not None and self._seconds > 0:
            self._remember(result)

    def _remember(self, image: Image) -> None:
        self._recent[image.id] = (image, self._clock() + self._seconds)
        self._recent.move_to_end(image.id)
        if len(self._recent) > self._limit:
            self._recent.popitem(last=False)
