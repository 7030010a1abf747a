"""One walker of paged listings (AIP-158): call for a page, keep its items,
follow next_page_token until it is empty."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any


async def every_page(
    fetch: Callable[[str], Awaitable[Any]], items: str, most_pages: int = 1000
) -> list[Any]:
    """The `items` field of every page `fetch(page_token)` returns, in order,
    from the first page (token "") to the one without a next_page_token;
    failing when that takes more than `most_pages` pages."""
    found: list[Any] = []
    token = ""
    for _ in range(most_pages):
        response = await fetch(token)
        found.extend(getattr(response, items))
        token = response.next_page_token
        if not token:
            return found
    raise AssertionError(f"{items} pagination did not end")
