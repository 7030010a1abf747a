"""Live progress on stderr (so that --json stdout stays parseable): byte
transfers, and deployments with one bar per server. On a terminal the bars
move; into a file or a pipe Rich writes only their final state."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from bms.image.v1 import provisioning_pb2
from bms_image.cli.output import label

FAILED = provisioning_pb2.PROVISIONING_STAGE_FAILED
ACTIVE = provisioning_pb2.PROVISIONING_STAGE_ACTIVE
STREAMING = provisioning_pb2.PROVISIONING_STAGE_IMAGE_STREAMING


def _progress(*columns: ProgressColumn) -> Progress:
    # redirect_stdout=False: JSON written to stdout meanwhile must reach stdout.
    return Progress(
        *columns,
        console=Console(stderr=True),
        redirect_stdout=False,
        redirect_stderr=False,
    )


class Transfer:
    """One bar of bytes moved (an upload or a download)."""

    def __init__(self, description: str, total: int | None = None, done: int = 0) -> None:
        self._progress = _progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
        )
        self._task = self._progress.add_task(description, total=total, completed=done)
        self._started = False

    def __enter__(self) -> Transfer:
        return self  # the bar appears once bytes move: none if the call fails first

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._started:
            self._progress.stop()

    def _start(self) -> None:
        if not self._started:
            self._started = True
            self._progress.start()

    def set_total(self, total: int) -> None:
        self._start()
        self._progress.update(self._task, total=total)

    def advance(self, count: int) -> None:
        self._start()
        self._progress.advance(self._task, count)


def stage_text(event: provisioning_pb2.ServerEvent) -> str:
    """What a server is doing, for people: `image streaming 12.0/32.0 MiB`."""
    if event.stage == FAILED:
        reason = f" ({event.error_reason})" if event.error_reason else ""
        return f"failed: {event.error_code or 'ERROR'}{reason}"
    if event.stage == ACTIVE:
        return label(event, "state").lower()
    text = label(event, "stage").lower().replace("_", " ")
    if event.stage == STREAMING and event.bytes_total:
        mib = 1024 * 1024
        text += f" {event.bytes_done / mib:.1f}/{event.bytes_total / mib:.1f} MiB"
    return text


class Deployment:
    """The events of CreateServers, ReinstallServer or WatchServer: a bar per
    server, and the last event of each."""

    def __init__(self) -> None:
        self._progress = _progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[stage]}"),
        )
        self._tasks: dict[str, TaskID] = {}
        self.last: dict[str, provisioning_pb2.ServerEvent] = {}

    def __enter__(self) -> Deployment:
        return self  # the bars appear with the first event: none if the call fails

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._tasks:
            self._progress.stop()

    def update(self, event: provisioning_pb2.ServerEvent) -> None:
        task = self._tasks.get(event.server)
        if task is None:
            if not self._tasks:
                self._progress.start()
            server_id = event.server.rsplit("/", 1)[-1]
            task = self._progress.add_task(f"servers/{server_id[:8]}", total=100, stage="")
            self._tasks[event.server] = task
        self._progress.update(task, completed=event.percent, stage=stage_text(event))
        self.last[event.server] = event

    def failures(self) -> list[provisioning_pb2.ServerEvent]:
        return [event for event in self.last.values() if event.stage == FAILED]
