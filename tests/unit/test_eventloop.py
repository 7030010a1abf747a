"""run_with: the configured event loop runs the service's main coroutine."""

from __future__ import annotations

import asyncio
import warnings

import pytest
import uvloop

from bms_image.common.eventloop import run_with


async def loop_kind() -> str:
    return "uvloop" if isinstance(asyncio.get_running_loop(), uvloop.Loop) else "asyncio"


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
def test_runs_main_on_the_loop_named(event_loop: str) -> None:
    assert run_with(event_loop, loop_kind) == event_loop


def test_an_unknown_loop_is_refused_before_main_starts() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "coroutine was never awaited" would fail here
        with pytest.raises(RuntimeError, match=r"uvloop, asyncio.*'trio'"):
            run_with("trio", loop_kind)
