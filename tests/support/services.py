"""The one in-process service starter, and its fixtures.

`serving(settings)` starts the service (both processes, in this process) on
a loopback port and yields a `Serving`: the running service, a channel to it,
stubs and call metadata. The fixtures (`settings`, `service`, `channel`,
`images`, `provisioning`, `as_project`) are what tests/conftest.py offers
(`sharing` and `projects` are tests/sharing/conftest.py's);
`shared_service_fixtures()` gives a module one service for all its tests.
"""

from __future__ import annotations

import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from bms.image.v1 import image_pb2_grpc, provisioning_pb2_grpc, sharing_pb2_grpc
from bms_image.common.config import Settings
from bms_image.common.serving import RunningService
from bms_image.processes import start as start_process
from support.tokens import TEST_SECRET, Metadata, bearer

ImageStub = image_pb2_grpc.ImageServiceStub
SharingStub = sharing_pb2_grpc.SharingServiceStub
ProvisioningStub = provisioning_pb2_grpc.ProvisioningServiceStub


def make_settings(tmp_path: Path, **overrides: object) -> Settings:
    """Settings for a test's service: a loopback port, the tests' secret,
    a short grace and 1 MiB catalog images, plus `overrides`."""
    values: dict[str, object] = {
        "listen": "127.0.0.1:0",
        "data_dir": tmp_path,
        "token_secret": TEST_SECRET,
        "shutdown_grace_seconds": 1.0,
        "catalog_image_mib": 1,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def token_metadata(service: RunningService, project: str, admin: bool = False) -> Metadata:
    """Call metadata of exactly `project` (its admin with `admin`)."""
    return bearer(service.authority.issue(project, admin))


def fresh_project(prefix: str = "p") -> str:
    """A project name no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class ProjectMetadata:
    """`as_project("alpha")`: call metadata of project `alpha-<suffix>`, the
    suffix being unique to the test, so tests sharing a service never see each
    other's private images. `.name("alpha")` is the real project name."""

    def __init__(self, service: RunningService) -> None:
        self._service = service
        self._suffix = uuid.uuid4().hex[:10]

    def name(self, project: str) -> str:
        return f"{project}-{self._suffix}"

    def __call__(self, project: str, admin: bool = False) -> Metadata:
        return token_metadata(self._service, self.name(project), admin)


@dataclass
class Serving:
    """A service started by a test itself, a channel to it and its stubs."""

    service: RunningService
    channel: grpc.aio.Channel

    @property
    def settings(self) -> Settings:
        return self.service.settings

    @property
    def data_dir(self) -> Path:
        return Path(self.service.settings.data_dir)

    @property
    def images(self) -> ImageStub:
        return ImageStub(self.channel)

    @property
    def sharing(self) -> SharingStub:
        return SharingStub(self.channel)

    @property
    def provisioning(self) -> ProvisioningStub:
        return ProvisioningStub(self.channel)

    def md(self, project: str, admin: bool = False) -> Metadata:
        """Call metadata of exactly `project`."""
        return token_metadata(self.service, project, admin)

    project = metadata = md

    @cached_property
    def projects(self) -> ProjectMetadata:
        """Call metadata of projects suffixed for this service's test."""
        return ProjectMetadata(self.service)


@asynccontextmanager
async def serving(
    settings: Settings, channel_options: Sequence[tuple[str, Any]] | None = None
) -> AsyncIterator[Serving]:
    """Starts a service with `settings` on the running event loop; stops it."""
    running = await start(settings)
    try:
        async with grpc.aio.insecure_channel(running.address, options=channel_options) as opened:
            yield Serving(running, opened)
    finally:
        await running.stop(0)


#: The services started in this process, by data directory (for helpers that
#: read a service's own figures, such as the bytes it has received); weak, so
#: that a stopped service is not kept alive for the rest of the session.
_RUNNING: weakref.WeakValueDictionary[str, RunningService] = weakref.WeakValueDictionary()


async def start(settings: Settings) -> RunningService:
    """Starts a service in this process (bms_image.processes.start)."""
    running = await start_process(settings)
    _RUNNING[str(settings.data_dir)] = running
    return running


def running_at(data_dir: Path) -> RunningService:
    """The service of this process that runs on `data_dir`."""
    return _RUNNING[str(data_dir)]


def received_upload_bytes(service: RunningService) -> float:
    """The bytes of UploadImageData messages the service has taken in (its
    `bms_image_stream_bytes` counter, read through the counter itself:
    collecting the whole registry would count the inventory)."""
    return sum(
        sample.value
        for family in service.metrics.stream_bytes.collect()
        for sample in family.samples
        if sample.name.endswith("_total")
        and sample.labels.get("direction") == "received"
        and sample.labels.get("method") == "UploadImageData"
    )


# -- fixtures (tests/conftest.py imports them) -------------------------------------


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
async def service(settings: Settings) -> AsyncIterator[RunningService]:
    running = await start(settings)
    yield running
    await running.stop(0)


@pytest.fixture
async def channel(service: RunningService) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(service.address) as opened:
        yield opened


@pytest.fixture
def images(channel: grpc.aio.Channel) -> ImageStub:
    return ImageStub(channel)


@pytest.fixture
def provisioning(channel: grpc.aio.Channel) -> ProvisioningStub:
    return ProvisioningStub(channel)


@pytest.fixture
def sharing(channel: grpc.aio.Channel) -> SharingStub:
    return SharingStub(channel)


@pytest.fixture
def as_project(service: RunningService) -> Callable[..., Metadata]:
    """as_project("alpha") / as_project("ops", admin=True): call metadata."""

    def metadata(project: str, admin: bool = False) -> Metadata:
        return token_metadata(service, project, admin)

    return metadata


@pytest.fixture
def projects(service: RunningService) -> ProjectMetadata:
    """projects("alpha"): call metadata of a project suffixed for this test,
    so tests sharing a service never see each other's images."""
    return ProjectMetadata(service)


def shared_service_fixtures(label: str = "shared-service") -> tuple[Any, Any]:
    """Module-scoped replacements of conftest's `service` and `channel`, for
    modules whose tests cannot see each other's work (each uses projects of
    its own) and leave the public catalog alone. Starting the service
    (migrations, seeding the catalog with its bytes) is the dominant cost of
    a test, so such modules share one. They must run their tests on the
    module's event loop: `pytestmark = pytest.mark.asyncio(loop_scope="module")`.
    conftest's `images` and `provisioning` then use these."""

    @pytest_asyncio.fixture(scope="module", loop_scope="module")
    async def service(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningService]:
        running = await start(make_settings(tmp_path_factory.mktemp(label)))
        yield running
        await running.stop(0)

    @pytest_asyncio.fixture(scope="module", loop_scope="module")
    async def channel(service: RunningService) -> AsyncIterator[grpc.aio.Channel]:
        async with grpc.aio.insecure_channel(service.address) as opened:
            yield opened

    return service, channel
