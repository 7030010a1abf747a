"""What a project can make the fleet hold has a limit (issue 14 item 6):
servers per project (BMS_IMAGE_MAX_SERVERS_PER_PROJECT) and servers being
built or reinstalled at once per project and process
(BMS_IMAGE_MAX_DEPLOYMENTS_PER_PROJECT). Past either, CreateServers is
RESOURCE_EXHAUSTED with a QuotaFailure before any byte moves."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import provisioning_support as prov
from google.rpc.error_details_pb2 import QuotaFailure
from provisioning_support import CENTOS, S4

from bms.image.v1 import provisioning_pb2
from bms_image.common.config import Settings
from bms_image.fleet.adapters.image_source import ImageSource
from support.errors import RichError
from support.fleet_events import LOCAL, STAGE_ACTIVE, Events
from support.services import Serving, make_settings, serving
from support.tokens import Metadata

pb = provisioning_pb2
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


async def over_quota(
    running: Serving, md: Metadata, request: pb.CreateServersRequest, reason: str
) -> tuple[RichError, QuotaFailure.Violation]:
    """CreateServers refused RESOURCE_EXHAUSTED `reason` with one quota
    violation, on project alpha."""
    rich = await prov.create_error(running.provisioning, md, request, EXHAUSTED, reason)
    assert rich.quota_failure is not None
    (violation,) = rich.quota_failure.violations
    assert violation.subject == "projects/alpha"
    return rich, violation


def test_the_defaults_keep_the_benchmarks_working() -> None:
    """1,000 servers in one project; batches of 100 x 10 at once."""
    defaults = Settings()
    assert defaults.max_servers_per_project >= 1000
    assert defaults.max_deployments_per_project >= 100 * 10
    environ = {
        "BMS_IMAGE_MAX_SERVERS_PER_PROJECT": "7",
        "BMS_IMAGE_MAX_DEPLOYMENTS_PER_PROJECT": "3",
    }
    configured = Settings.from_env(environ=environ)
    assert (configured.max_servers_per_project, configured.max_deployments_per_project) == (7, 3)


async def test_servers_per_project_are_limited(tmp_path: Path) -> None:
    async with serving(make_settings(tmp_path, max_servers_per_project=3)) as running:
        alpha, beta = running.project("alpha"), running.project("beta")
        first = await prov.deploy(
            running.provisioning, alpha, prov.create_request(CENTOS, S4, 2, "a")
        )
        assert all(first.final(s).stage == STAGE_ACTIVE for s in first.servers)

        request = prov.create_request(CENTOS, S4, 2, "b")
        rich, violation = await over_quota(running, alpha, request, "SERVER_QUOTA_EXCEEDED")
        assert "3" in violation.description and "3" in rich.message, rich.message
        assert len(await prov.list_servers(running.provisioning, alpha)) == 2, "nothing was added"

        # another project has its own count; the last place can be taken
        other = await prov.deploy(
            running.provisioning, beta, prov.create_request(CENTOS, S4, 2, "c")
        )
        assert all(other.final(s).stage == STAGE_ACTIVE for s in other.servers)
        last = await prov.deploy(
            running.provisioning, alpha, prov.create_request(CENTOS, S4, 1, "d")
        )
        assert all(last.final(s).stage == STAGE_ACTIVE for s in last.servers)
        await prov.create_error(
            running.provisioning, alpha, prov.create_request(CENTOS, S4, 1, "e"), EXHAUSTED
        )
        # a deleted server frees its place
        await running.provisioning.DeleteServer(
            pb.DeleteServerRequest(name=first.servers[0]), metadata=alpha
        )
        freed = await prov.deploy(
            running.provisioning, alpha, prov.create_request(CENTOS, S4, 1, "f")
        )
        assert all(freed.final(s).stage == STAGE_ACTIVE for s in freed.servers)


async def test_concurrent_servers_per_project_never_pass_the_limit(
    tmp_path: Path, database_url: str
) -> None:
    """Batches asked for at once: the count and the insert are one step
    (on SQLite and on PostgreSQL, where an advisory lock queues them)."""
    settings = make_settings(tmp_path, max_servers_per_project=5, database_url=database_url)
    async with serving(settings) as running:
        alpha = running.project("alpha")

        async def one(n: int) -> bool:
            try:
                await prov.collect(
                    running.provisioning.CreateServers(
                        prov.create_request(CENTOS, S4, 2, f"r{n}"), metadata=alpha
                    )
                )
            except grpc.aio.AioRpcError as error:
                assert error.code() == EXHAUSTED, error
                return False
            return True

        accepted = await asyncio.gather(*(one(n) for n in range(6)))
        assert sum(accepted) == 2
        assert len(await prov.list_servers(running.provisioning, alpha)) == 4


async def test_deployments_per_project_are_limited(tmp_path: Path, monkeypatch) -> None:
    """Two servers being built hold the project's two places until they are
    done; other projects are not held back."""
    gate, fetching = asyncio.Event(), asyncio.Event()
    real = ImageSource.fetch

    async def held(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        fetching.set()  # the batch's servers are recorded and counted
        await gate.wait()
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(ImageSource, "fetch", held)
    settings = make_settings(tmp_path, max_deployments_per_project=2)
    async with serving(settings) as running:
        alpha, beta = running.project("alpha"), running.project("beta")
        await over_quota(
            running, alpha, prov.create_request(CENTOS, S4, 3, "big"), "DEPLOYMENT_LIMIT"
        )

        building = asyncio.create_task(
            prov.collect(
                running.provisioning.CreateServers(
                    prov.create_request(CENTOS, S4, 2, "slow", boot_source=LOCAL), metadata=alpha
                ),
                within=60,
            )
        )
        await asyncio.wait_for(fetching.wait(), 60)  # a hang guard only
        assert len(await prov.list_servers(running.provisioning, alpha)) == 2
        await prov.create_error(
            running.provisioning,
            alpha,
            prov.create_request(CENTOS, S4, 1, "more"),
            EXHAUSTED,
            "DEPLOYMENT_LIMIT",
        )
        elsewhere = asyncio.create_task(
            prov.collect(
                running.provisioning.CreateServers(
                    prov.create_request(CENTOS, S4, 2, "beta"), metadata=beta
                ),
                within=60,
            )
        )
        gate.set()
        for events in await asyncio.gather(building, elsewhere):
            done = Events(events)
            assert len(done.servers) == 2
            assert all(done.final(s).stage == STAGE_ACTIVE for s in done.servers), events
        # done: the places are free again
        again = await prov.deploy(
            running.provisioning, alpha, prov.create_request(CENTOS, S4, 2, "again")
        )
        assert all(again.final(s).stage == STAGE_ACTIVE for s in again.servers)
