"""The event loop a process runs on: uvloop by default, the standard one on request."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")
EVENT_LOOPS = ("uvloop", "asyncio")


def run_with(event_loop: str, main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Runs main() to completion on a new loop of the kind named: "uvloop"
    (libuv underneath: less CPU per call and per thread hand-over, which is
    most of what a metadata call costs) or "asyncio" (the standard loop)."""
    if event_loop == "uvloop":
        return uvloop.run(main())
    if event_loop == "asyncio":
        return asyncio.run(main())
    raise RuntimeError(f"event_loop must be one of {', '.join(EVENT_LOOPS)}, not {event_loop!r}")
