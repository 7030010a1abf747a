"""Fakes of the ports the use cases drive, in the manner of cosmicpython's
FakeRepository: small, in memory (the staging area writes plain files under
a directory the test gives it, without fsync, fadvise or threads), keeping
what was asked of them so that tests can assert on it, and with switches to
make them fail the way the real adapters do.

Images: FakeBlobStore (BlobStore), FakeStaging (ByteStaging), FakeRelease
(ByteRelease), FakeInspector (Inspector), FakeMembers (MemberRepository),
FakeCaptures (CaptureProvider); the ImageRepository fake is
tests/unit/unit_fakes.InMemoryImages. Fleet: FakeServerRepository,
FakeImageSource, FakeCloudInit, FakeServerDisks; the FlavorSource needs none
(common.flavors.FlavorCatalog is in memory already).

The fakes touch their small files on the event loop on purpose: no threads."""

# ruff: noqa: ASYNC230, ASYNC240

from __future__ import annotations

import copy
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bms_image.common.errors import (
    DataLoss,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    QuotaExceeded,
    QuotaViolation,
    StagedBytesMissing,
)
from bms_image.common.model import (
    Caller,
    CaptureSource,
    DiskFormat,
    Image,
    Member,
    MemberStatus,
    Partition,
    PluginKind,
)
from bms_image.fleet.domain import ports as fleet_ports
from bms_image.fleet.domain.ports import PluginStates, Progress, UnreadableDisk
from bms_image.fleet.domain.servers import Server, ServerState
from bms_image.fleet.domain.system_disks import SystemDisk
from bms_image.images.domain import ports as image_ports
from bms_image.images.domain.ports import DEFAULT_CHUNK_BYTES, BlobNotFound, Inspection

# -- images -------------------------------------------------------------------


class FakeBlobStore:
    name = "fake"

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        #: Raised by put_file when set (a full or unreachable store).
        self.put_error: Exception | None = None

    async def put_file(self, key: str, path: Path) -> None:
        if self.put_error is not None:
            raise self.put_error
        self.blobs[key] = path.read_bytes()

    async def read(
        self, key: str, offset: int = 0, chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ) -> AsyncIterator[bytes]:
        if key not in self.blobs:
            raise BlobNotFound(key)
        data = self.blobs[key]
        for start in range(offset, len(data), chunk_bytes):
            yield data[start : start + chunk_bytes]

    async def size(self, key: str) -> int:
        if key not in self.blobs:
            raise BlobNotFound(key)
        return len(self.blobs[key])

    async def intact(self, key: str) -> bool:
        return key in self.blobs

    async def copy(self, source_key: str, target_key: str) -> None:
        if source_key not in self.blobs:
            raise BlobNotFound(source_key)
        self.blobs[target_key] = self.blobs[source_key]

    async def delete(self, key: str) -> None:
        self.blobs.pop(key, None)

    async def keys(self) -> list[str]:
        return sorted(self.blobs)

    async def ping(self) -> None:
        return None

    async def claim(self, deployment: str) -> None:
        return None


class FakeStaged:
    """Staged bytes as a plain file: appends to it, hashing as it goes;
    `commit` puts the file into the fake blob store."""

    def __init__(
        self, path: Path, offset: int, write_error: Exception | None, blobs: FakeBlobStore
    ) -> None:
        self._path = path
        self._size = offset
        self._sha256 = hashlib.sha256(path.read_bytes()[:offset])
        self._write_error = write_error
        self._blobs = blobs
        self.closed = False

    @property
    def size(self) -> int:
        return self._size

    def hexdigest(self) -> str:
        return self._sha256.hexdigest()

    async def write(self, chunk: bytes) -> None:
        if self._write_error is not None:
            raise self._write_error
        with open(self._path, "ab") as handle:
            handle.write(chunk)
        self._sha256.update(chunk)
        self._size += len(chunk)

    async def drain(self) -> None:
        return None

    async def close(self) -> None:
        self.closed = True

    async def read(self) -> AsyncIterator[bytes]:
        yield self._path.read_bytes()

    async def materialize(self, path: Path) -> None:
        path.write_bytes(self._path.read_bytes())

    async def commit(self, key: str) -> None:
        if not self._path.exists():
            raise NotFound("IMAGE_NOT_FOUND", f"images/{key} was deleted during the upload")
        await self._blobs.put_file(key, self._path)
        self._path.unlink()


class FakeStaging:
    def __init__(self, root: Path, blobs: FakeBlobStore) -> None:
        self.root = root
        self.blobs = blobs
        root.mkdir(parents=True, exist_ok=True)
        #: Raised by every write of uploads opened after it is set.
        self.write_error: Exception | None = None
        self.opened: list[FakeStaged] = []

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.part"

    async def open(self, key: str, offset: int) -> FakeStaged:
        path = self._path(key)
        path.touch()
        available = path.stat().st_size
        if available < offset:
            raise StagedBytesMissing(f"images/{key}", offset, available)
        with open(path, "r+b") as handle:
            handle.truncate(offset)
        staged = FakeStaged(path, offset, self.write_error, self.blobs)
        self.opened.append(staged)
        return staged

    async def size(self, key: str) -> int:
        path = self._path(key)
        return path.stat().st_size if path.exists() else 0

    def scratch(self, key: str, suffix: str) -> Path:
        return self.root / f"{key}.{suffix}"

    async def digest(self, path: Path) -> tuple[str, int]:
        data = path.read_bytes()
        return hashlib.sha256(data).hexdigest(), len(data)

    def _files_of(self, key: str) -> list[Path]:
        return [p for p in self.root.iterdir() if p.name.startswith(key + ".")]

    async def discard(self, key: str) -> None:
        for path in self._files_of(key):
            path.unlink()

    async def discard_scratch(self, key: str) -> None:
        for path in self._files_of(key):
            if path != self._path(key):
                path.unlink()

    async def keys(self) -> list[str]:
        return sorted({p.name.split(".", 1)[0] for p in self.root.iterdir()})

    def put(self, key: str, data: bytes) -> None:
        """Stages bytes as an interrupted upload would have left them."""
        self._path(key).write_bytes(data)


class FakeRelease:
    """ByteRelease: records the images whose bytes were released."""

    def __init__(self) -> None:
        self.released: list[str] = []

    async def __call__(self, image_id: str) -> None:
        self.released.append(image_id)


class FakeInspector:
    """Takes every upload as the format it is told (raw by default), its
    virtual size its byte size; `refuse` makes it find the content unsafe."""

    def __init__(self, disk_format: DiskFormat = DiskFormat.RAW) -> None:
        self.disk_format = disk_format
        self.refuse = False
        self.inspected: list[str] = []

    async def inspect(self, pieces: AsyncIterator[bytes], size: int, subject: str) -> Inspection:
        self.inspected.append(subject)
        async for _ in pieces:  # reads the content as the real one does
            break
        if self.refuse:
            raise FailedPrecondition("IMAGE_UNSAFE", f"{subject}: the content is unsafe")
        return Inspection(self.disk_format, size)

    async def convert_to_raw(
        self, source: Path, disk_format: DiskFormat, target: Path, subject: str
    ) -> None:
        target.write_bytes(b"raw:" + source.read_bytes())


class FakeMembers:
    def __init__(self) -> None:
        self.members: dict[tuple[str, str], Member] = {}

    async def get(self, image_id: str, project: str) -> Member | None:
        return self.members.get((image_id, project))

    async def list(
        self, image_id: str, after_project: str, limit: int, only_project: str | None = None
    ) -> list[Member]:
        found = [
            m
            for (image, project), m in sorted(self.members.items())
            if image == image_id
            and project > after_project
            and (only_project is None or project == only_project)
        ]
        return found[:limit]

    async def add(self, image_id: str, project: str, limit: int) -> Member:
        existing = self.members.get((image_id, project))
        if existing is not None:
            return existing
        if sum(1 for image, _ in self.members if image == image_id) >= limit:
            raise QuotaExceeded(
                "MEMBER_LIMIT",
                f"images/{image_id} has {limit} members",
                [QuotaViolation(f"images/{image_id}", f"members: limit {limit}")],
            )
        member = self.members[(image_id, project)] = Member(image_id, project, MemberStatus.PENDING)
        return member

    async def set_status(self, image_id: str, project: str, status: MemberStatus) -> Member | None:
        if (image_id, project) not in self.members:
            return None
        member = self.members[(image_id, project)] = replace(
            self.members[(image_id, project)], status=status
        )
        return member

    async def remove(self, image_id: str, project: str) -> bool:
        return self.members.pop((image_id, project), None) is not None


class FakeCaptures:
    """CaptureProvider: records the calls; a capture source of `server_id`
    on the given hardware model."""

    def __init__(self, hardware_model: str) -> None:
        self.hardware_model = hardware_model
        self.calls: list[tuple[str, str]] = []
        self.prepare_error: Exception | None = None

    async def prepare_capture(self, caller: Caller, token: str, server_id: str) -> CaptureSource:
        self.calls.append(("prepare", server_id))
        if self.prepare_error is not None:
            raise self.prepare_error
        return CaptureSource(
            server_id=server_id,
            hardware_model=self.hardware_model,
            os_type="linux",
            os_distro="centos",
            os_version="7.6",
            architecture="x86_64",
            plugins=[],
            partitions=[Partition("root", "/", 1024)],
        )

    async def start_capture(self, token: str, server_id: str, image_id: str) -> None:
        self.calls.append(("start", f"{server_id} -> {image_id}"))

    async def release_capture(self, token: str, server_id: str) -> None:
        self.calls.append(("release", server_id))


# -- fleet --------------------------------------------------------------------


class FakeServerRepository:
    """ServerRepository: copies in and out, seq assigned on insert,
    conditional writes bump the revision (as SqlServerRepository)."""

    def __init__(self) -> None:
        self.rows: dict[str, Server] = {}
        self.disks: dict[str, SystemDisk] = {}
        self._seq = 0

    async def add_all(self, servers: list[Server], limit: int) -> list[Server]:
        project = servers[0].project if servers else ""
        live = sum(
            1
            for s in self.rows.values()
            if s.project == project and s.state is not ServerState.DELETED
        )
        if live + len(servers) > limit:
            raise QuotaExceeded(
                "SERVER_QUOTA_EXCEEDED",
                f"project {project} has {live} servers; limit {limit}",
                [QuotaViolation(f"projects/{project}", f"servers: limit {limit}")],
            )
        added = []
        for server in servers:
            self._seq += 1
            stored = replace(copy.deepcopy(server), seq=self._seq)
            self.rows[stored.id] = stored
            added.append(copy.deepcopy(stored))
        return added

    async def get(self, server_id: str) -> Server | None:
        server = self.rows.get(server_id)
        return copy.deepcopy(server) if server else None

    async def list_for_project(self, project: str, after_seq: int, limit: int) -> list[Server]:
        found = sorted(
            (
                s
                for s in self.rows.values()
                if s.project == project and s.state is not ServerState.DELETED
                and s.seq > after_seq
            ),
            key=lambda s: s.seq,
        )  # fmt: skip
        return [copy.deepcopy(s) for s in found[:limit]]

    async def disk(self, server_id: str) -> SystemDisk | None:
        return self.disks.get(server_id)

    async def in_states(self, states: Collection[ServerState]) -> list[Server]:
        return [copy.deepcopy(s) for s in self.rows.values() if s.state in states]

    async def transition(
        self,
        server_id: str,
        from_states: Collection[ServerState],
        changes: Mapping[str, Any],
        task: str | None = None,
        disk: SystemDisk | None = None,
    ) -> Server | None:
        server = self.rows.get(server_id)
        if server is None or server.state not in from_states:
            return None
        if task is not None and server.task != task:
            return None
        changed = replace(server, revision=server.revision + 1, **copy.deepcopy(dict(changes)))
        self.rows[server_id] = changed
        if disk is not None:
            self.disks[server_id] = disk
        return copy.deepcopy(changed)

    async def claim_task_within_limit(
        self,
        server_id: str,
        state: ServerState,
        task: str,
        *,
        counted: Collection[str],
        limit: int,
    ) -> tuple[Server | None, int]:
        server = self.rows.get(server_id)
        if server is None:
            return None, 0
        running = sum(
            1 for s in self.rows.values() if s.project == server.project and s.task in counted
        )
        if running >= limit or server.state is not state or server.task:
            return None, running
        claimed = await self.transition(server_id, {state}, {"task": task})
        return claimed, 0


@dataclass
class Upload:
    image_id: str
    data: bytes
    released_before_end: bool


class FakeImageSource:
    """ImageSource over a dict of images: what the caller may see is every
    image it was given (tokens are not checked); bytes are `sha256`-named
    paths under a pretend cache; `upload` reads the file `produce` writes."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.images: dict[str, Image] = {}
        self.fetches: list[str] = []
        self.fetch_error: Exception | None = None
        self.damaged: set[str] = set()
        self.uploads: list[Upload] = []
        self.closed = False

    def add(self, image: Image) -> Image:
        self.images[image.id] = image
        return image

    async def describe(self, image_id: str, token: str) -> Image:
        if image_id not in self.images:
            raise NotFound("IMAGE_NOT_FOUND", f"image images/{image_id} not found")
        return self.images[image_id]

    async def authorize(self, image: Image, token: str) -> str:
        return self.images[image.id].sha256

    async def fetch(self, image_id: str, sha256: str, token: str, progress: Progress) -> Path:
        self.fetches.append(image_id)
        if self.fetch_error is not None:
            raise self.fetch_error
        size = self.images[image_id].size_bytes
        await progress(size, size)
        return self.cache / f"{sha256}.raw"

    async def verified(self, image_id: str, sha256: str) -> Path:
        if sha256 in self.damaged:
            raise DataLoss("IMAGE_CACHE_DAMAGED", f"the cached bytes of images/{image_id} changed")
        return self.cache / f"{sha256}.raw"

    async def upload(
        self,
        image_id: str,
        produce: Callable[[], Awaitable[Path]],
        token: str,
        before_end: Callable[[], Awaitable[None]] | None = None,
    ) -> object:
        path = await produce()
        released = False
        if before_end is not None:
            await before_end()
            released = True
        self.uploads.append(Upload(image_id, path.read_bytes(), released))
        return None

    async def close(self) -> None:
        self.closed = True


class FakeCloudInit:
    """CloudInit: user data "#cloud-config bad" is refused, any other
    #cloud-config gives one file; first boot writes the host name and key."""

    async def parse_user_data(self, user_data: str) -> dict[str, bytes]:
        if user_data == "#cloud-config bad":
            raise InvalidArgument(
                "INVALID_USER_DATA", "user_data: bad", [FieldViolation("user_data", "bad")]
            )
        return {"etc/motd": b"hello\n"} if user_data.startswith("#cloud-config") else {}

    def first_boot_files(
        self, host_name: str, ssh_public_key: str, user_data: str, user_files: dict[str, bytes]
    ) -> dict[str, bytes]:
        files = {"etc/hostname": f"{host_name}\n".encode()}
        if ssh_public_key:
            files["root/.ssh/authorized_keys"] = ssh_public_key.encode()
        files.update(user_files)
        return files


ALL_INTACT: PluginStates = {kind: ("intact", "1.0") for kind in PluginKind}


@dataclass
class FakeDisk:
    """A server's disks as FakeServerDisks keeps them."""

    #: file name -> what wrote it ("copy of <cache entry>", "overlay")
    files: dict[str, str] = field(default_factory=dict)
    first_boot: dict[str, bytes] = field(default_factory=dict)
    data_disks: list[int] = field(default_factory=list)


class FakeServerDisks:
    """ServerDisks in memory. `states` are the plug-ins found on every disk
    written from an image (by image cache entry name); `unreadable` holds
    the cache entries that are no system disk. Only a capture's flattened
    disk is a real file (under `root`), for the image source to send."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.servers: dict[str, FakeDisk] = {}
        self.states: dict[str, PluginStates] = {}
        self.unreadable: set[str] = set()
        self.flattened: list[str] = []
        self.scratch_removed = 0
        self._source: dict[tuple[str, str], str] = {}

    def _states(self, server_id: str, record: SystemDisk) -> PluginStates:
        source = self._source.get((server_id, record.top), "")
        if source in self.unreadable:
            raise UnreadableDisk(source)
        return dict(self.states.get(source, ALL_INTACT))

    async def write(self, server_id: str, record: SystemDisk, cached: Path) -> None:
        disk = self.servers.setdefault(server_id, FakeDisk())
        name = record.top if record.base_sha256 else f"{record.top}.new"
        disk.files[name] = "overlay" if record.base_sha256 else f"copy of {cached.name}"
        self._source[(server_id, record.top)] = cached.name

    async def plugin_states(
        self, server_id: str, record: SystemDisk, staged: bool = False
    ) -> PluginStates:
        return self._states(server_id, record)

    async def append_first_boot(
        self, server_id: str, record: SystemDisk, files: Mapping[str, bytes]
    ) -> None:
        self.servers[server_id].first_boot = dict(files)

    async def install(self, server: Server, record: SystemDisk) -> None:
        disk = self.servers[server.id]
        disk.data_disks = list(server.data_disks_gb)
        staged = f"{record.top}.new"
        if staged in disk.files:
            disk.files[record.top] = disk.files.pop(staged)

    async def size(self, server_id: str, record: SystemDisk) -> int:
        return 4096

    async def keep_only(self, server_id: str, record: SystemDisk | None) -> None:
        disk = self.servers.get(server_id)
        if disk is not None:
            disk.files = {
                name: what
                for name, what in disk.files.items()
                if record is not None and name == record.top
            }

    async def remove(self, server_id: str) -> None:
        self.servers.pop(server_id, None)

    async def os_release(self, server_id: str, record: SystemDisk) -> dict[str, str]:
        return {"ID": "centos", "VERSION_ID": "7.6"}

    async def partition_layout(self, server_id: str, record: SystemDisk) -> list[Partition]:
        return [Partition("root", "/", 4096)]

    def _flat(self, image_id: str) -> Path:
        return self.root / f".capture-{image_id}.disk"

    async def flatten(self, server_id: str, record: SystemDisk, image_id: str) -> Path:
        self.flattened.append(image_id)
        self._flat(image_id).write_bytes(f"flat {server_id} {record.top}".encode())
        return self._flat(image_id)

    async def discard_flat(self, image_id: str) -> None:
        self._flat(image_id).unlink(missing_ok=True)

    async def remove_scratch(self) -> None:
        self.scratch_removed += 1


class FakePublicImages:
    """fleet_ports.PublicImages over a fixed answer; records each caller's token."""

    def __init__(self, by_flavor: Mapping[str, list[str]] | None = None) -> None:
        self.answer = dict(by_flavor or {})
        self.tokens: list[str] = []

    async def by_flavor(self, token: str) -> Mapping[str, list[str]]:
        self.tokens.append(token)
        return self.answer


def _conforms(
    blobs: FakeBlobStore,
    staging: FakeStaging,
    release: FakeRelease,
    inspector: FakeInspector,
    members: FakeMembers,
    captures: FakeCaptures,
    servers: FakeServerRepository,
    images: FakeImageSource,
    cloud_init: FakeCloudInit,
    disks: FakeServerDisks,
    public_images: FakePublicImages,
) -> None:
    """Never called: mypy checks here that each fake satisfies its port."""
    checked: tuple[
        image_ports.BlobStore,
        image_ports.ByteStaging,
        image_ports.ByteRelease,
        image_ports.Inspector,
        image_ports.MemberRepository,
        image_ports.CaptureProvider,
        fleet_ports.ServerRepository,
        fleet_ports.ImageSource,
        fleet_ports.CloudInit,
        fleet_ports.ServerDisks,
        fleet_ports.PublicImages,
    ] = (
        blobs, staging, release, inspector, members, captures, servers, images, cloud_init,
        disks, public_images,
    )  # fmt: skip
    del checked
