"""Listings read to their end: every page of a List call, following
next_page_token, with a bound so that a token that never ends fails the
test instead of hanging it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol, TypeVar

T = TypeVar("T")


class Page(Protocol):
    @property
    def next_page_token(self) -> str: ...


P = TypeVar("P", bound=Page)


async def every_page(
    read_page: Callable[[str], Awaitable[P]],
    items: Callable[[P], Iterable[T]],
    most_pages: int = 10_000,
) -> list[T]:
    """The items of every page: `read_page(token)` reads one page (the first
    with token ""), `items(page)` picks what it lists."""
    found: list[T] = []
    token = ""
    for _ in range(most_pages):
        page = await read_page(token)
        found.extend(items(page))
        token = page.next_page_token
        if not token:
            return found
    raise AssertionError("pagination did not end")
