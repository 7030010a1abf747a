"""Progress events of the work on each server, kept while it runs (and a
while after) so that a caller whose stream dropped can follow it again."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable

from bms_image.fleet.domain.servers import ServerEvent

#: How long the events of finished work stay available to WatchServer.
RETAIN_SECONDS = 600.0


#: Told of each finished operation: its final event and how long it took.
FinishedHook = Callable[[ServerEvent, float], None]


class EventBus:
    def __init__(self, on_finished: FinishedHook | None = None) -> None:
        self._history: dict[str, list[ServerEvent]] = {}
        #: Per server, the wake-ups of those following it: an event wakes only
        #: the streams that follow its server (not all of them).
        self._followers: dict[str, set[asyncio.Event]] = {}
        self._on_finished = on_finished

    def knows(self, server_id: str) -> bool:
        """Whether events of the server's latest work are kept."""
        return server_id in self._history

    def in_progress(self, server_id: str) -> bool:
        """Whether work on the server is going on (its last event is not final)."""
        history = self._history.get(server_id)
        return bool(history) and not history[-1].final  # type: ignore[index]

    async def publish(self, event: ServerEvent) -> None:
        history = self._history.get(event.server_id)
        if history is None or history[-1].final:  # a new operation starts a new history
            history = self._history[event.server_id] = []
        history.append(event)
        if event.final:
            if self._on_finished is not None:
                self._on_finished(event, (event.time - history[0].time).total_seconds())
            loop = asyncio.get_running_loop()
            loop.call_later(RETAIN_SECONDS, self._expire, event.server_id, history)
        for wake in self._followers.get(event.server_id, ()):
            wake.set()

    def _expire(self, server_id: str, history: list[ServerEvent]) -> None:
        if self._history.get(server_id) is history:
            del self._history[server_id]

    async def follow(self, server_ids: Iterable[str]) -> AsyncIterator[ServerEvent]:
        """Every event of these servers from the first, live, until each has
        reached ACTIVE or FAILED."""
        positions = dict.fromkeys(server_ids, 0)
        open_ids = set(positions)
        wake = asyncio.Event()
        for server_id in open_ids:
            self._followers.setdefault(server_id, set()).add(wake)
        try:
            while open_ids:
                wake.clear()  # before reading: a publish from here on wakes us
                for server_id in list(open_ids):
                    events = self._history.get(server_id, [])
                    while positions[server_id] < len(events):
                        event = events[positions[server_id]]
                        positions[server_id] += 1
                        yield event
                        if event.final:
                            open_ids.discard(server_id)
                if open_ids:
                    await wake.wait()
        finally:
            for server_id in positions:
                followers = self._followers.get(server_id)
                if followers is not None:
                    followers.discard(wake)
                    if not followers:
                        del self._followers[server_id]
