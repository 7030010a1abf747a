"""Support of the crash tests (tests/reliability/test_kill_restart.py):
`bms-image serve` / `bms-image provisioner` as real processes that can be
SIGKILLed and restarted on the same data directory and database, clients
for them, helpers that start work and report its progress (so a test kills
at a moment it observed, never after a fixed sleep), and the recovery audit:
what must hold of images, servers, bytes on disk and counts after a restart.

Plain functions and classes: import them as `from crash_support import ...`
(never from a conftest module)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bms.image.v1 import image_pb2, provisioning_pb2, sharing_pb2
from bms_image.common import disk_format as disks
from bms_image.common.disk_format import DiskSpec
from bms_image.common.model import Plugin, PluginKind
from bms_image.images.adapters.blobs.store import DEPLOYMENT_MARKER
from support import builders, chunk_store
from support.builders import random_bytes, sha256_hex  # noqa: F401
from support.disks import PLUGIN_PROTO, recorded_disk, server_dir, system_disk  # noqa: F401
from support.errors import Code, decode, expect_error
from support.processes import ServerProcess
from support.services import ImageStub, ProvisioningStub, SharingStub
from support.tokens import (
    TEST_SECRET,
    Metadata,
    metadata_for,
)

pb = provisioning_pb2

MiB = 1024 * 1024
#: A hang guard only: nothing is asserted about how long anything takes.
HANG_GUARD = 60.0

S4 = "flavors/physical.s4.large"  # model s4-2288h-v5: local disk or EVS
S4_MODEL = builders.S4_MODEL
CENTOS = builders.CENTOS_IMAGE
UBUNTU = builders.UBUNTU_IMAGE

# Image statuses.
QUEUED = image_pb2.IMAGE_STATUS_QUEUED
SAVING = image_pb2.IMAGE_STATUS_SAVING
ACTIVE = image_pb2.IMAGE_STATUS_ACTIVE
KILLED = image_pb2.IMAGE_STATUS_KILLED
DEACTIVATED = image_pb2.IMAGE_STATUS_DEACTIVATED
PRIVATE = image_pb2.IMAGE_TYPE_PRIVATE
# Server states and provisioning stages.
BUILDING = pb.SERVER_STATE_BUILDING
REBUILDING = pb.SERVER_STATE_REBUILDING
SERVER_ACTIVE = pb.SERVER_STATE_ACTIVE
STOPPED = pb.SERVER_STATE_STOPPED
ERROR = pb.SERVER_STATE_ERROR
LOCAL = pb.BOOT_SOURCE_LOCAL_DISK
STREAMING = pb.PROVISIONING_STAGE_IMAGE_STREAMING
STAGE_ACTIVE = pb.PROVISIONING_STAGE_ACTIVE
STAGE_FAILED = pb.PROVISIONING_STAGE_FAILED

CENTOS_PLUGINS = (
    Plugin(PluginKind.CLOUD_INIT, "0.7.9"),
    Plugin(PluginKind.BMS_NETWORK_CONFIG, "2.1.3"),
    Plugin(PluginKind.SDI_INIC_DRIVER, "1.2.0"),
)
_PLUGIN_PROTO = PLUGIN_PROTO


def image_status(status: int) -> str:
    return str(image_pb2.ImageStatus.Name(status))


def server_state(state: int) -> str:
    return str(pb.ServerState.Name(state))


def key_of(name: str) -> str:
    """`images/{id}` or `servers/{id}` -> `{id}`."""
    return name.rsplit("/", 1)[-1]


def md(project: str, admin: bool = False) -> Metadata:
    """Call metadata: a token signed with the secret every process is given."""
    return metadata_for(project, admin)


# -- processes --------------------------------------------------------------------------
#
# The launcher is the shared one of tests/processes.py; what crash tests add:
# an async start that keeps each start's output, the settings they run with,
# and freezing a process to kill it at a moment its stored state shows.


def service_process(
    name: str,
    data_dir: Path,
    logs: Path,
    *command: str,
    database_url: str = "",
    catalog_image_mib: int = 1,
    chunk_bytes: int = MiB,
    private_image_quota: int = 50,
    max_image_members: int = 256,
    provisioner: str = "embedded",
) -> ServerProcess:
    """`bms-image <command>` (`serve` by default) on `data_dir`, with the
    test secret (so `md()` tokens work without the CLI), restartable on the
    same address; its output goes to `<logs>/<name>.stdout|stderr`."""
    settings = {
        "token_secret": TEST_SECRET,
        "catalog_image_mib": str(catalog_image_mib),
        "chunk_bytes": str(chunk_bytes),
        "private_image_quota": str(private_image_quota),
        "max_image_members": str(max_image_members),
        "shutdown_grace_seconds": "1",
        "provisioner": provisioner,
    }
    if database_url:
        settings["database_url"] = database_url
    process = ServerProcess(data_dir, *(command or ("serve",)), **settings)
    # `bms-image provisioner` has a --listen default that beats BMS_IMAGE_LISTEN.
    process.command += ["--listen", process.address]
    logs.mkdir(parents=True, exist_ok=True)
    process.stdout_path = logs / f"{name}.stdout"
    process.stderr_path = logs / f"{name}.stderr"
    return process


def serve_process(data_dir: Path, logs: Path, **settings: Any) -> ServerProcess:
    return service_process("serve", data_dir, logs, "serve", **settings)


def provisioner_process(
    data_dir: Path, logs: Path, image_service: str, **settings: Any
) -> ServerProcess:
    return service_process(
        "provisioner", data_dir, logs, "provisioner", "--image-service", image_service, **settings
    )


def running(process: ServerProcess) -> bool:
    return process.process is not None and process.process.poll() is None


async def start(process: ServerProcess) -> ServerProcess:
    """Starts (or restarts) the process and waits until it listens, which
    it does once its recovery is done. The output of an earlier start is
    kept as `<name>.stdout.<n>`."""
    assert not running(process), "already running"
    for path in (process.stdout_path, process.stderr_path):
        if path.exists():
            earlier = len(list(path.parent.glob(path.name + ".*")))
            path.rename(path.with_name(f"{path.name}.{earlier + 1}"))
    process.reported = False
    return await asyncio.to_thread(process.start)


def freeze(process: ServerProcess) -> None:
    """SIGSTOP, and wait until every thread of the process is stopped."""
    assert process.process is not None and running(process)
    process.process.send_signal(signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while not all(
        _thread_state(stat) in ("T", "t")
        for stat in Path(f"/proc/{process.process.pid}/task").glob("*/stat")
    ):
        assert time.monotonic() < deadline, "the process did not stop"
        time.sleep(0.0005)


def thaw(process: ServerProcess) -> None:
    assert process.process is not None
    process.process.send_signal(signal.SIGCONT)


def _thread_state(stat: Path) -> str:
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return "T"  # the thread is gone


KILL, WAIT, MISSED = "kill", "wait", "missed"


async def kill_at(process: ServerProcess, moment: Callable[[], str], every: float = 0.003) -> bool:
    """Kills `process` (SIGKILL) at a moment its own stored state shows:
    freezes it (SIGSTOP), asks `moment()` about what it stored, and kills it
    right there on KILL — so that is exactly what the restart finds — or lets
    it go on (SIGCONT) and looks again. False if `moment()` says MISSED (the
    work ended before it could be caught)."""
    deadline = time.monotonic() + HANG_GUARD
    while True:
        freeze(process)
        try:
            verdict = moment()
        except BaseException:
            thaw(process)
            raise
        if verdict == KILL:
            process.kill()
            return True
        thaw(process)
        if verdict == MISSED:
            return False
        assert time.monotonic() < deadline, "the moment to kill never came"
        await asyncio.sleep(every)


def stored(database: Path, sql: str, *params: object) -> list[tuple[Any, ...]]:
    """A read-only query on a service's SQLite database, to choose the moment
    of a kill (the tests assert through the API only). No rows when the
    frozen writer stopped in the middle of updating the WAL index."""
    try:
        with contextlib.closing(
            sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=0.2)
        ) as connection:
            return connection.execute(sql, params).fetchall()
    except sqlite3.OperationalError:
        return []


# -- clients ----------------------------------------------------------------------------


@dataclass
class Client:
    """Stubs on the image service's port and (maybe another) fleet port."""

    images: Any
    sharing: Any
    fleet: Any

    async def image(self, name: str, project: str = "alpha") -> image_pb2.Image:
        found: image_pb2.Image = await self.images.GetImage(
            image_pb2.GetImageRequest(name=name), metadata=md(project)
        )
        return found

    async def server(self, name: str, project: str = "alpha") -> pb.Server:
        found: pb.Server = await self.fleet.GetServer(
            pb.GetServerRequest(name=name), metadata=md(project)
        )
        return found

    async def list_images(self, project: str, filter: str = "") -> list[image_pb2.Image]:
        found: list[image_pb2.Image] = []
        token = ""
        while True:
            page = await self.images.ListImages(
                image_pb2.ListImagesRequest(page_size=1000, page_token=token, filter=filter),
                metadata=md(project),
            )
            found += page.images
            token = page.next_page_token
            if not token:
                return found

    async def list_servers(self, project: str) -> list[pb.Server]:
        found: list[pb.Server] = []
        token = ""
        while True:
            page = await self.fleet.ListServers(
                pb.ListServersRequest(page_size=1000, page_token=token), metadata=md(project)
            )
            found += page.servers
            token = page.next_page_token
            if not token:
                return found


_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 16 * MiB),
    ("grpc.max_send_message_length", 16 * MiB),
]


@asynccontextmanager
async def connect(image_address: str, fleet_address: str = "") -> AsyncIterator[Client]:
    fleet_address = fleet_address or image_address
    async with (
        grpc.aio.insecure_channel(image_address, options=_CHANNEL_OPTIONS) as images,
        grpc.aio.insecure_channel(fleet_address, options=_CHANNEL_OPTIONS) as fleet,
    ):
        yield Client(ImageStub(images), SharingStub(images), ProvisioningStub(fleet))


# -- images -----------------------------------------------------------------------------


def private_image(display_name: str, **overrides: Any) -> image_pb2.Image:
    """builders.private_image, carrying the plug-ins of the catalog's CentOS disk."""
    plugins = [
        image_pb2.Plugin(kind=_PLUGIN_PROTO[p.kind], version=p.version) for p in CENTOS_PLUGINS
    ]
    return builders.private_image(display_name, **{"plugins": plugins, **overrides})


async def create_image(
    client: Client, project: str, display_name: str, request_id: str = ""
) -> image_pb2.Image:
    created: image_pb2.Image = await client.images.CreateImage(
        image_pb2.CreateImageRequest(image=private_image(display_name), request_id=request_id),
        metadata=md(project),
    )
    assert created.status == QUEUED, created
    return created


def upload_messages(
    name: str,
    content: bytes,
    *,
    offset: int = 0,
    piece: int = MiB,
    pause_at: int | None = None,
    resume: asyncio.Event | None = None,
) -> AsyncIterator[image_pb2.UploadImageDataRequest]:
    """An UploadImageData request stream declaring all of `content` and
    sending it from `offset`; with `pause_at`, it waits for `resume` (which
    a crash test never sets) once that many bytes are sent."""

    async def messages() -> AsyncIterator[image_pb2.UploadImageDataRequest]:
        yield image_pb2.UploadImageDataRequest(
            metadata=image_pb2.UploadImageDataMetadata(
                name=name, offset=offset, size_bytes=len(content), sha256=sha256_hex(content)
            )
        )
        position, pause = offset, pause_at
        while position < len(content):
            if pause is not None and position >= pause:
                assert resume is not None
                await resume.wait()
                pause = None
            end = min(position + piece, len(content))
            if pause is not None:
                end = min(end, pause)
            yield image_pb2.UploadImageDataRequest(chunk=content[position:end])
            position = end

    return messages()


async def upload(
    client: Client, project: str, name: str, content: bytes, offset: int = 0
) -> image_pb2.Image:
    uploaded: image_pb2.Image = await client.images.UploadImageData(
        upload_messages(name, content, offset=offset, piece=4 * MiB), metadata=md(project)
    )
    assert uploaded.status == ACTIVE, uploaded
    assert uploaded.sha256 == sha256_hex(content)
    return uploaded


async def upload_new_image(
    client: Client, project: str, display_name: str, content: bytes
) -> image_pb2.Image:
    created = await create_image(client, project, display_name)
    return await upload(client, project, created.name, content)


async def download(client: Client, project: str, name: str, offset: int = 0) -> tuple[bytes, str]:
    """The bytes from `offset` on and the SHA-256 of the last message; the
    framing (offsets, last message) is checked on the way."""
    call = client.images.DownloadImageData(
        image_pb2.DownloadImageDataRequest(name=name, offset=offset), metadata=md(project)
    )
    pieces: list[bytes] = []
    position, final, size = offset, "", -1
    async for message in call:
        assert not final, "a message after the last one"
        assert message.offset == position, (message.offset, position)
        size = message.size_bytes
        if message.last:
            final = message.sha256
        pieces.append(message.chunk)
        position += len(message.chunk)
    assert final, "the download ended without a message marked last"
    assert position == size, f"the download ended at {position} of {size} bytes"
    return b"".join(pieces), final


def disk_image_bytes(scratch: Path, bulk_bytes: int, seed: str) -> bytes:
    """The bytes of a simulated CentOS 7.6 system disk (model s4-2288h-v5)."""
    spec = DiskSpec(
        os_release={
            "NAME": "centos",
            "ID": "centos",
            "VERSION_ID": "7.6",
            "BMS_OS_TYPE": "linux",
            "BMS_ARCHITECTURE": "x86_64",
        },
        plugins=CENTOS_PLUGINS,
        bulk_bytes=bulk_bytes,
        seed=seed,
    )
    return written_bytes(scratch, "disk", lambda path: disks.write_disk(path, spec))


# -- servers ----------------------------------------------------------------------------


def deploy_request(
    image: str, count: int, name_prefix: str, data_disks_gb: Sequence[int] = ()
) -> pb.CreateServersRequest:
    return pb.CreateServersRequest(
        flavor=S4,
        image=image,
        count=count,
        name_prefix=name_prefix,
        boot_source=LOCAL,
        data_disks_gb=list(data_disks_gb),
    )


def bytes_moving(event: pb.ServerEvent) -> bool:
    """An IMAGE_STREAMING event half-way: some bytes fetched, not all."""
    return event.stage == STREAMING and 0 < event.bytes_done < event.bytes_total


@dataclass
class Followed:
    """The events a deployment or reinstall stream delivered before the
    test stopped reading it."""

    events: list[pb.ServerEvent] = field(default_factory=list)

    @property
    def servers(self) -> list[str]:
        return list(dict.fromkeys(e.server for e in self.events))

    def finished(self) -> list[str]:
        return [e.server for e in self.events if e.stage in (STAGE_ACTIVE, STAGE_FAILED)]


async def follow_until(call: Any, moment: Callable[[pb.ServerEvent], bool]) -> Followed:
    """Reads a CreateServers/ReinstallServer stream until an event satisfies
    `moment`; the stream is left open (the process is about to be killed)."""
    followed = Followed()

    async def read() -> None:
        while True:
            event = await call.read()
            assert event is not grpc.aio.EOF, (
                f"the stream ended before the moment to kill: {followed.events}"
            )
            followed.events.append(event)
            if moment(event):
                return

    await asyncio.wait_for(read(), HANG_GUARD)
    return followed


async def run_to_end(call: Any) -> list[pb.ServerEvent]:
    async def read() -> list[pb.ServerEvent]:
        return [event async for event in call]

    return await asyncio.wait_for(read(), HANG_GUARD)


async def deploy(client: Client, project: str, request: pb.CreateServersRequest) -> list[str]:
    """A deployment followed to its end: every server must be ACTIVE."""
    events = await run_to_end(client.fleet.CreateServers(request, metadata=md(project)))
    names = list(dict.fromkeys(e.server for e in events))
    assert len(names) == request.count, events
    for name in names:
        final = [e for e in events if e.server == name][-1]
        assert final.stage == STAGE_ACTIVE, [e for e in events if e.server == name]
    return names


async def poll(
    read: Callable[[], Awaitable[Any]], done: Callable[[Any], bool], every: float = 0.02
) -> Any:
    """Reads until `done` holds (HANG_GUARD is a hang guard, nothing more)."""
    deadline = time.monotonic() + HANG_GUARD
    while True:
        value = await read()
        if done(value):
            return value
        assert time.monotonic() < deadline, f"still not done after {HANG_GUARD}s: {value}"
        await asyncio.sleep(every)


# -- the recovery audit -----------------------------------------------------------------


class RecoveryViolation(AssertionError):
    """What a restart left wrong. The class of a raised violation names the
    exact set of problem codes found, so a known bug can be marked
    `xfail(strict=True, raises=violation(...))` without hiding any other."""

    codes: frozenset[str] = frozenset()


_VIOLATIONS: dict[frozenset[str], type[RecoveryViolation]] = {}


def violation(*codes: str) -> type[RecoveryViolation]:
    """The exception class raised when exactly these problem codes are found."""
    key = frozenset(codes)
    if key not in _VIOLATIONS:
        name = "Violation_" + "_".join(sorted(c.replace("-", "_") for c in key))
        _VIOLATIONS[key] = type(name, (RecoveryViolation,), {"codes": key})
    return _VIOLATIONS[key]


#: The problem codes of the audit, and what each means.
PROBLEMS = {
    "active-bytes-wrong": "an ACTIVE image whose bytes do not match its size and SHA-256",
    "active-bytes-unreadable": "an ACTIVE image whose bytes cannot be downloaded",
    "image-saving": "an image still SAVING after the restart",
    "capture-stuck-queued": "a captured image left QUEUED: no one will ever upload its bytes",
    "queued-offset-wrong": "a QUEUED image whose uploaded_bytes differ from its staged bytes",
    "queued-with-checksum": "a QUEUED image claiming a size and SHA-256 it has no bytes for "
    "(a copy cut off that no one finishes)",
    "killed-without-reason": "a KILLED image without a status_reason",
    "server-transitional": "a server still BUILDING or REBUILDING after the restart",
    "server-held": "a server still held by a task (capture, reinstall) nobody runs",
    "server-error-without-reason": "a server in ERROR without a state_reason",
    "orphan-blob": "a blob or a complete manifest no ACTIVE or DEACTIVATED image owns",
    "active-not-stored": "an ACTIVE or DEACTIVATED image without a complete manifest",
    "pending-manifest": "a put's unfinished manifest left after a collection",
    "manifest-wrong": "a manifest whose entries do not make its size",
    "chunk-missing": "a manifest entry whose chunk has no live, stored row or no file",
    "chunk-refs-wrong": "a chunk whose refs do not count the entries naming it",
    "orphan-chunk": "a chunk file no chunk row claims after a collection",
    "orphan-staging": "a staged upload no QUEUED image owns, or a scratch file left",
    "temp-file": "a temporary file of an interrupted write",
    "leftover-fleet-file": "a file the fleet's interrupted work left behind",
}


@dataclass
class Audit:
    """Problems found after a restart, by code; `check()` raises them all."""

    problems: list[tuple[str, str]] = field(default_factory=list)

    def add(self, code: str, detail: str) -> None:
        assert code in PROBLEMS, code
        self.problems.append((code, detail))

    def check(self) -> None:
        if not self.problems:
            return
        codes = sorted({code for code, _ in self.problems})
        lines = [f"{code} ({PROBLEMS[code]}): {detail}" for code, detail in self.problems]
        raise violation(*codes)("after the restart:\n" + "\n".join(lines))


@dataclass
class World:
    """What a recovery audit looks at: the service, the projects that took
    part, the data directory, and the bytes the test knows images hold."""

    client: Client
    data_dir: Path
    projects: Sequence[str]
    contents: Mapping[str, bytes] = field(default_factory=dict)
    fleet: bool = True
    database_url: str = ""  # the service's, if not SQLite in data_dir


async def all_images(world: World) -> dict[str, tuple[image_pb2.Image, str]]:
    """Every image a participating project sees (its own, public, shared),
    with a project that may read it: the owner's view wins."""
    found: dict[str, tuple[image_pb2.Image, str]] = {}
    for project in world.projects:
        for image in await world.client.list_images(project):
            if image.type == PRIVATE or image.name not in found:
                found[image.name] = (image, project)
    return found


def _files(directory: Path) -> list[Path]:
    return sorted(directory.iterdir()) if directory.is_dir() else []


async def audit(world: World) -> tuple[Audit, dict[str, image_pb2.Image]]:
    """Checks, after a restart and before any new work:
    - every ACTIVE image's bytes download whole and match its size and
      SHA-256 (and the content the test uploaded, when it knows it);
    - no image is SAVING; a QUEUED image is a client's resumable upload
      (uploaded_bytes = its staged bytes), never a capture no one resumes;
      KILLED images say why;
    - no server is BUILDING or REBUILDING or held by a task; ERROR says why;
    - every blob and complete manifest belongs to an ACTIVE/DEACTIVATED
      image (and each of those has one), every staged upload (a manifest
      `upload-<id>`) to a QUEUED one, and no scratch, temporary or fleet
      scratch file is left;
    - after one collection of the chunk store (once a killed process's
      puts count as abandoned): no pending manifest, every manifest's
      chunks live with their files, refs that count the entries, and no
      chunk file without its row. Temporary files of chunk puts (.tmp-*
      under blobs/chunks, swept once an hour old) are not chunks."""
    found = Audit()
    seen = await all_images(world)
    images = {name: image for name, (image, _) in seen.items()}
    staged = await chunk_store.staged_sizes(world.data_dir, world.database_url)
    for name, (image, project) in seen.items():
        if image.status == ACTIVE:
            try:
                data, final = await download(world.client, project, name)
            except (grpc.aio.AioRpcError, AssertionError) as error:
                found.add("active-bytes-unreadable", f"{name}: {error}")
            else:
                if (len(data), sha256_hex(data), final) != (
                    image.size_bytes,
                    image.sha256,
                    image.sha256,
                ):
                    found.add(
                        "active-bytes-wrong",
                        f"{name}: {len(data)} bytes with SHA-256 {sha256_hex(data)[:12]}, "
                        f"the image says {image.size_bytes} / {image.sha256[:12]}",
                    )
                known = world.contents.get(name)
                if known is not None and data != known:
                    found.add("active-bytes-wrong", f"{name}: not the bytes uploaded")
        elif image.status == SAVING:
            found.add("image-saving", f"{name}: {image.status_reason!r}")
        elif image.status == QUEUED:
            size = staged.get(key_of(name), 0)
            if image.source_server:
                found.add(
                    "capture-stuck-queued",
                    f"{name} (capture of {image.source_server}): QUEUED, "
                    f"{image.uploaded_bytes} bytes staged, reason {image.status_reason!r}",
                )
            if image.sha256 or image.size_bytes:
                found.add(
                    "queued-with-checksum",
                    f"{name}: QUEUED with size {image.size_bytes} and SHA-256 "
                    f"{image.sha256[:12]}, reason {image.status_reason!r}",
                )
            if image.uploaded_bytes != size:
                found.add(
                    "queued-offset-wrong",
                    f"{name}: uploaded_bytes {image.uploaded_bytes}, {size} bytes staged",
                )
        elif image.status == KILLED and not image.status_reason:
            found.add("killed-without-reason", name)

    servers: dict[str, pb.Server] = {}
    if world.fleet:
        for project in world.projects:
            for server in await world.client.list_servers(project):
                servers[server.name] = server
    for name, server in servers.items():
        if server.state in (BUILDING, REBUILDING):
            found.add("server-transitional", f"{name}: {server_state(server.state)}")
        if server.task:
            found.add("server-held", f"{name}: {server_state(server.state)}, task {server.task}")
        if server.state == ERROR and not server.state_reason:
            found.add("server-error-without-reason", name)

    by_key = {key_of(name): image for name, image in images.items()}
    blobs = world.data_dir / "blobs"
    for path in _files(blobs):
        if path.name == DEPLOYMENT_MARKER:  # names the deployment owning the directory
            continue
        if path == chunk_store.chunks_root(world.data_dir):
            continue  # the chunk store's, audited below
        if path.name.startswith("."):
            found.add("temp-file", str(path.relative_to(world.data_dir)))
            continue
        owner = by_key.get(path.name.removesuffix(".blob"))
        if owner is None or owner.status not in (ACTIVE, DEACTIVATED):
            state = image_status(owner.status) if owner else "no image"
            found.add("orphan-blob", f"{path.name}: {state}")
    manifests = set(await chunk_store.complete_keys(world.data_dir, world.database_url))
    for key in sorted(manifests):
        owner = by_key.get(key)
        if owner is None or owner.status not in (ACTIVE, DEACTIVATED):
            state = image_status(owner.status) if owner else "no image"
            found.add("orphan-blob", f"manifest {key}: {state}")
    for key, image in sorted(by_key.items()):
        whole = chunk_store.whole_blob(world.data_dir, key).exists()
        if image.status in (ACTIVE, DEACTIVATED) and key not in manifests and not whole:
            found.add("active-not-stored", f"{key}: {image_status(image.status)}")
    await chunk_store.collect(world.data_dir, world.database_url)
    for code, detail in await chunk_store.inconsistencies(world.data_dir, world.database_url):
        found.add(code, detail)
    for key in sorted(staged):
        owner = by_key.get(key)
        if owner is None or owner.status != QUEUED:
            state = image_status(owner.status) if owner else "no image"
            found.add("orphan-staging", f"upload-{key}: {state}")
    for path in _files(world.data_dir / "staging"):  # scratch files of conversions
        found.add("orphan-staging", f"staging/{path.name}")
    fleet = world.data_dir / "fleet"
    for path in _files(fleet):
        if path.is_file():
            found.add("leftover-fleet-file", f"fleet/{path.name} ({path.stat().st_size} bytes)")
    for path in _files(fleet / "image-cache"):
        if path.name.startswith("."):
            found.add("temp-file", f"fleet/image-cache/{path.name}")
    for directory in _files(fleet / "servers"):
        if f"servers/{directory.name}" not in servers:
            found.add("leftover-fleet-file", f"fleet/servers/{directory.name}: no such server")
            continue
        for leftover in directory.glob("*.new"):
            found.add("leftover-fleet-file", f"fleet/servers/{directory.name}/{leftover.name}")
    return found, images


# -- counts -----------------------------------------------------------------------------


async def fill_quota_exactly(client: Client, project: str, quota: int) -> None:
    """The project's private images (not KILLED) as listed count against the
    quota: exactly the remaining slots can be created — all at once — and
    the next create fails with RESOURCE_EXHAUSTED saying the quota is used up."""
    listed = await client.list_images(project, "type = private")
    used = len([image for image in listed if image.status != KILLED])
    assert used <= quota, f"{project} holds {used} private images, over its quota of {quota}"
    creates = [
        client.images.CreateImage(
            image_pb2.CreateImageRequest(
                image=private_image(f"fill-{n}"), request_id=str(uuid.uuid4())
            ),
            metadata=md(project),
        )
        for n in range(quota - used + 2)
    ]
    outcomes = await asyncio.gather(*creates, return_exceptions=True)
    made = [o for o in outcomes if isinstance(o, image_pb2.Image)]
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    failures = [o for o in outcomes if not isinstance(o, image_pb2.Image)]
    assert len(made) == quota - used and len(refused) == 2, (
        f"{project}: {used} used of {quota}; {len(made)} creates succeeded, "
        f"{len(refused)} were refused: {failures}"
    )
    for error in refused:
        rich = decode(error)
        assert (rich.code, rich.reason) == (Code.RESOURCE_EXHAUSTED, "IMAGE_QUOTA_EXCEEDED"), (
            rich.message
        )
        assert rich.info.metadata["used"] == str(quota), rich.info
    listed = await client.list_images(project, "type = private")
    assert len([image for image in listed if image.status != KILLED]) == quota


async def list_members(client: Client, owner: str, image: str) -> dict[str, int]:
    response = await client.sharing.ListImageMembers(
        sharing_pb2.ListImageMembersRequest(parent=image, page_size=1000), metadata=md(owner)
    )
    return {member.member_project: member.status for member in response.members}


async def fill_members_exactly(client: Client, owner: str, image: str, limit: int) -> None:
    """The image's members as listed count against the limit: exactly the
    remaining ones can be added, then the next is refused."""
    members = await list_members(client, owner, image)
    assert len(members) <= limit, f"{image} has {len(members)} members, over the limit {limit}"
    newcomers = [f"late-{n}" for n in range(limit - len(members) + 1)]
    for project in newcomers[:-1]:
        await client.sharing.CreateImageMember(
            sharing_pb2.CreateImageMemberRequest(
                parent=image, member=sharing_pb2.ImageMember(member_project=project)
            ),
            metadata=md(owner),
        )
    await expect_error(
        client.sharing.CreateImageMember(
            sharing_pb2.CreateImageMemberRequest(
                parent=image, member=sharing_pb2.ImageMember(member_project=newcomers[-1])
            ),
            metadata=md(owner),
        ),
        Code.RESOURCE_EXHAUSTED,
    )
    assert len(await list_members(client, owner, image)) == limit


# -- files ------------------------------------------------------------------------------


def staged_size(data_dir: Path, image: str) -> int:
    """Bytes of the image's upload staged durably (SQLite)."""
    return chunk_store.staged_size(data_dir, image) or 0


def flattened(disk: disks.Disk, scratch: Path) -> bytes:
    """What a capture of `disk` uploads: the disk with its layers merged."""
    return written_bytes(scratch, "flat", lambda path: disks.flatten(disk, path))


def written_bytes(scratch: Path, prefix: str, write: Callable[[Path], object]) -> bytes:
    """What `write(path)` writes to a fresh file under `scratch`; the file is removed."""
    path = scratch / f"{prefix}-{uuid.uuid4().hex}"
    try:
        write(path)
        return path.read_bytes()
    finally:
        path.unlink(missing_ok=True)
