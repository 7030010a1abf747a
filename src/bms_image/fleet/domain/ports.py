"""What the fleet's use cases drive: the server repository (the store), the
image source (ImageService and the image cache), Cloud-Init's reading of
user data, the servers' disks on the hosts, and the spans of a trace. Adapters implement these;
the bootstrap wires them. Flavors come through FlavorSource (the
common.flavors.FlavorCatalog the bootstrap loads)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Protocol

from bms_image.common.model import Flavor, Image, Partition, PluginKind
from bms_image.fleet.domain.servers import Server, ServerState
from bms_image.fleet.domain.system_disks import SystemDisk

#: (done, total) bytes of an image being fetched.
Progress = Callable[[int, int], Awaitable[None]]
#: For each plug-in on a disk: ("intact" | "modified" | "missing", version).
PluginStates = dict[PluginKind, tuple[str, str]]


class UnreadableDisk(Exception):
    """A disk holds no system disk a server can boot (no readable partition
    table and partitions)."""


class FlavorSource(Protocol):
    """The flavors servers are built on."""

    def get(self, name: str) -> Flavor:
        """The flavor (NotFound FLAVOR_NOT_FOUND if there is none)."""

    def names_for_model(self, hardware_model: str) -> list[str]:
        """The flavors of a hardware model (a private image deploys on them)."""


class ServerRepository(Protocol):
    async def add_all(self, servers: list[Server], limit: int) -> list[Server]:
        """Inserts the servers (numbered in order) unless their project would
        then have more than `limit` servers not deleted (QuotaExceeded)."""

    async def get(self, server_id: str) -> Server | None:
        """The stored server, deleted ones included; None if it never existed."""

    async def list_for_project(self, project: str, after_seq: int, limit: int) -> list[Server]:
        """The project's servers not deleted, by ascending seq after after_seq."""

    async def disk(self, server_id: str) -> SystemDisk | None:
        """The record of the server's system disk, if it has one."""

    async def in_states(self, states: Collection[ServerState]) -> list[Server]:
        """Every server in one of these states (for recovery after a restart)."""

    async def transition(
        self,
        server_id: str,
        from_states: Collection[ServerState],
        changes: Mapping[str, Any],
        task: str | None = None,
        disk: SystemDisk | None = None,
    ) -> Server | None:
        """Applies changes if the server is in one of from_states (and, when
        given, has exactly that task); None if not. `disk`, when given,
        becomes the record of its system disk in the same change."""

    async def claim_task_within_limit(
        self,
        server_id: str,
        state: ServerState,
        task: str,
        *,
        counted: Collection[str],
        limit: int,
    ) -> tuple[Server | None, int]:
        """Gives an idle server in `state` the task unless its project's
        servers already hold `limit` tasks among `counted`, atomically.
        Returns the claimed server and 0, or None and the project's count."""


class ImageSource(Protocol):
    """Images as the fleet sees them: through ImageService, with the caller's
    token, and their bytes through a cache verified by SHA-256."""

    async def describe(self, image_id: str, token: str) -> Image:
        """The image as the caller may see it (NotFound if it may not)."""

    async def authorize(self, image: Image, token: str) -> str:
        """Checks the caller may use the image's bytes now (visible, active,
        share accepted) and returns their SHA-256; no byte moves."""

    async def fetch(self, image_id: str, sha256: str, token: str, progress: Progress) -> Path:
        """The verified cache entry of the image's bytes, fetched once
        however many deployments ask at the same time."""

    async def verified(self, image_id: str, sha256: str) -> Path:
        """The cache entry an EVS clone reads through to, checked to be those
        bytes still (DataLoss if not)."""

    async def upload(
        self,
        image_id: str,
        produce: Callable[[], Awaitable[Path]],
        token: str,
        before_end: Callable[[], Awaitable[None]] | None = None,
    ) -> object:
        """Streams the file `produce` writes into a QUEUED capture image;
        `before_end` runs after the last byte, before the stream ends. A
        failure of `produce` is raised, after the image service killed the
        image."""

    async def close(self) -> None:
        """Stops fetches still running (on shutdown)."""


class CloudInit(Protocol):
    """What Cloud-Init does with a deployment's input."""

    async def parse_user_data(self, user_data: str) -> dict[str, bytes]:
        """The write_files of `#cloud-config` user data (InvalidArgument for
        bad or hostile YAML), parsed off the event loop."""

    def first_boot_files(
        self, host_name: str, ssh_public_key: str, user_data: str, user_files: dict[str, bytes]
    ) -> dict[str, bytes]:
        """What Cloud-Init writes at first boot."""


class ServerDisks(Protocol):
    """The servers' disks on the hosts: where their files are, how a system
    disk is written (a copy of the cache entry, or an EVS overlay over it),
    first boot's partition, flattening for a capture. A disk is named by its
    server and its record; `staged` names the new disk of a deployment
    before it is installed. Methods raise UnreadableDisk for a disk that is
    no system disk, OSError when the files fail."""

    async def write(self, server_id: str, record: SystemDisk, cached: Path) -> None:
        """A new system disk beside the one in use: an EVS record gets a new
        overlay over the cache entry, a local one a copy of `cached`."""

    async def plugin_states(
        self, server_id: str, record: SystemDisk, staged: bool = False
    ) -> PluginStates:
        """The plug-ins found on the disk, judged on its content."""

    async def append_first_boot(
        self, server_id: str, record: SystemDisk, files: Mapping[str, bytes]
    ) -> None:
        """Appends Cloud-Init's partition to the new (staged) disk's own file."""

    async def install(self, server: Server, record: SystemDisk) -> None:
        """Creates missing data disks and puts the new disk in place."""

    async def size(self, server_id: str, record: SystemDisk) -> int:
        """The bytes of the disk (all its layers)."""

    async def keep_only(self, server_id: str, record: SystemDisk | None) -> None:
        """Removes every file of the server but its data disks and the disk
        its record names (all of them without a record)."""

    async def remove(self, server_id: str) -> None:
        """Removes every file of the server."""

    async def os_release(self, server_id: str, record: SystemDisk) -> dict[str, str]:
        """The disk's /etc/os-release."""

    async def partition_layout(self, server_id: str, record: SystemDisk) -> list[Partition]:
        """The disk's partitions."""

    async def flatten(self, server_id: str, record: SystemDisk, image_id: str) -> Path:
        """The disk as one raw file, for its capture into the image."""

    async def discard_flat(self, image_id: str) -> None:
        """Removes the flattened disk of a capture."""

    async def remove_scratch(self) -> None:
        """Flattened disks and partial image downloads a crash left behind."""


class PublicImages(Protocol):
    """The public images published for each flavor, as the caller sees them."""

    async def by_flavor(self, token: str) -> Mapping[str, Sequence[str]]:
        """Flavor name -> ids of the public images deployable on it (not
        deleted; deprecated ones too), oldest first."""


class Spans(Protocol):
    """Spans of the fleet's own steps (a deployment, each server's stages, a
    capture), so a slow deployment can be followed step by step in a trace
    (the bootstrap passes tracing.OtelSpans while tracing is on). A span is
    current while its block runs: calls and tasks started inside it are its
    children, and an exception leaving it marks it failed. Attributes are our
    own ids and choices, never a caller's data."""

    def span(
        self, name: str, attributes: Mapping[str, str | int] | None = None
    ) -> AbstractContextManager[None]: ...


class _NoSpans:
    """Tracing off: every span is an empty block."""

    def span(
        self, name: str, attributes: Mapping[str, str | int] | None = None
    ) -> AbstractContextManager[None]:
        return nullcontext()


NO_SPANS: Spans = _NoSpans()
