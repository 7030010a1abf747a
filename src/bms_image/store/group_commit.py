"""Group commit for SQLite: one thread runs this process's write units of
work, as many as are waiting in one transaction.

SQLite has one writer at a time and, with synchronous=FULL, an fsync per
commit; writers that queue behind each other would each pay the whole
BEGIN IMMEDIATE ... COMMIT (and the fsync) in turn. Here the writes that
arrived while the previous transaction was committing share the next one:
each is still atomic on its own (a unit of work that raises is rolled back
alone and only its caller gets the error), and each caller hears of its
outcome only after the commit that made it durable.

The batch first runs without savepoints (they cost two statements a unit);
if any unit raises, it is rolled back whole and run again unit by unit in
savepoints. So a unit of work may run twice: it must touch nothing but the
connection it is given."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from sqlalchemy import Connection, Engine

#: Units of work in one transaction at most: bounds what one failed commit
#: takes with it and how long the write lock is held at a time.
MAX_BATCH = 64

_Item = tuple[Callable[[Connection], Any], "Future[Any]"]


class GroupCommitWriter:
    def __init__(self, engine: Engine, name: str = "sqlite-write") -> None:
        self._engine = engine
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._closed = False
        self._closing = threading.Lock()  # no write slips in behind the stop
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, work: Callable[[Connection], Any]) -> Future[Any]:
        future: Future[Any] = Future()
        with self._closing:
            if self._closed:
                raise RuntimeError("the database is closed: no more writes")
            self._queue.put((work, future))
        return future

    def close(self) -> None:
        """Runs what was submitted before, then stops the thread."""
        with self._closing:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch, stopping = [item], False
            while len(batch) < MAX_BATCH:
                try:
                    following = self._queue.get_nowait()
                except queue.Empty:
                    break
                if following is None:
                    stopping = True
                    break
                batch.append(following)
            self._commit(batch)
            if stopping:
                return

    def _commit(self, batch: list[_Item]) -> None:
        live = [(work, future) for work, future in batch if future.set_running_or_notify_cancel()]
        if not live or (len(live) > 1 and self._commit_together(live)):
            return
        self._commit_in_savepoints(live)

    def _commit_together(self, batch: list[_Item]) -> bool:
        """The common case, every unit succeeding: no savepoints. False, with
        everything rolled back, if any unit (or the commit) failed."""
        try:
            with self._engine.begin() as connection:
                results = [work(connection) for work, _ in batch]
        except Exception:
            return False
        for (_, future), result in zip(batch, results, strict=True):
            future.set_result(result)
        return True

    def _commit_in_savepoints(self, batch: list[_Item]) -> None:
        """Each unit in a savepoint of one transaction: one that raises is
        rolled back alone and only its caller gets the error."""
        outcomes: list[tuple[Future[Any], bool, Any]] = []
        try:
            with self._engine.begin() as connection:
                if len(batch) == 1:  # no savepoint needed: the transaction is the unit
                    work, future = batch[0]
                    outcomes.append((future, True, work(connection)))
                else:
                    for work, future in batch:
                        try:
                            with connection.begin_nested():
                                outcomes.append((future, True, work(connection)))
                        except Exception as error:  # rolled back to its savepoint
                            outcomes.append((future, False, error))
        except BaseException as error:  # BEGIN or COMMIT failed: none of the batch holds
            # (kept alive whatever it was: a dead writer would hang every later write)
            for _, future in batch:
                future.set_exception(error)
            return
        for future, succeeded, value in outcomes:
            if succeeded:
                future.set_result(value)
            else:
                future.set_exception(value)
