"""StagedUpload.close from two threads at once: a cancelled upload closes
its staging file while its own close may still run in a worker thread. The
second close must neither fail nor return before the bytes are durable."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from bms_image.common import staging
from bms_image.common.staging import StagedUpload


def test_a_second_close_waits_for_the_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    staged = StagedUpload(tmp_path / "image.part", 0)
    staged.write(b"bytes of an image")
    in_fsync, release = threading.Event(), threading.Event()
    real_fsync, calls = os.fsync, []

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:  # the first close stops inside its fsync
            in_fsync.set()
            release.wait(10)
        real_fsync(fd)

    monkeypatch.setattr(staging.os, "fsync", fsync)
    errors: list[BaseException] = []
    second_done = threading.Event()

    def close(done: threading.Event | None = None) -> None:
        try:
            staged.close()
        except BaseException as error:
            errors.append(error)
        if done is not None:
            done.set()

    first = threading.Thread(target=close)
    first.start()
    assert in_fsync.wait(10)
    second = threading.Thread(target=close, args=(second_done,))
    second.start()
    # Unguarded, the second close runs its own flush, fsync and close at once.
    assert not second_done.wait(0.5), "the second close returned before the first's fsync"
    release.set()
    first.join(10)
    second.join(10)
    assert errors == [] and second_done.is_set()
    assert len(calls) == 1, "one fsync: the second close found the file closed"
    assert (tmp_path / "image.part").read_bytes() == b"bytes of an image"
