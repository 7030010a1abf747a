"""The servers once deployed: Get/List with paging and project isolation,
power on and off, deletion, following a deployment with WatchServer after the
caller's stream dropped, malformed names and missing tokens."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid

import grpc
import provisioning_support as prov
import pytest
from provisioning_support import CENTOS, S4

from bms.image.v1 import provisioning_pb2
from bms_image.fleet.adapters.image_source import ImageSource
from bms_image.fleet.domain import fleet as fleet_module
from bms_image.fleet.domain.servers import ServerState
from support.errors import Code, expect_error, expect_invalid
from support.fleet_events import (
    ACTIVE,
    BUILDING,
    LOCAL,
    STAGE_ACTIVE,
    STOPPED,
    VALIDATING,
    stage_name,
    state_name,
)

pb = provisioning_pb2


async def test_get_and_list_servers_page_by_page(provisioning, as_project) -> None:
    md = as_project("alpha")
    first = await prov.deploy(provisioning, md, prov.create_request(CENTOS, S4, 3, "first"))
    second = await prov.deploy(provisioning, md, prov.create_request(CENTOS, S4, 2, "second"))
    created = first.servers + second.servers

    pages: list[list[str]] = []
    token = ""
    for _ in range(10):
        response = await provisioning.ListServers(
            pb.ListServersRequest(page_size=1, page_token=token), metadata=md
        )
        pages.append([s.name for s in response.servers])
        token = response.next_page_token
        if not token:
            break
        assert len(response.servers) == 1
    assert all(len(page) == 1 for page in pages), pages
    listed = [page[0] for page in pages]
    assert sorted(listed) == sorted(created)
    servers = {s.name: s for s in await prov.list_servers(provisioning, md)}
    assert list(servers) == listed, "every page size lists the same order"
    # oldest first: the first batch before the second
    assert {servers[n].host_name for n in listed[:3]} == {"first-1", "first-2", "first-3"}
    assert [servers[n].create_time.ToDatetime() for n in listed] == sorted(
        servers[n].create_time.ToDatetime() for n in listed
    )
    for name in created:
        server = await prov.get_server(provisioning, md, name)
        assert server == servers[name]
        assert server.state == ACTIVE

    other = as_project("beta")
    assert await prov.list_servers(provisioning, other) == []
    for name in created:
        await expect_error(
            provisioning.GetServer(pb.GetServerRequest(name=name), metadata=other),
            Code.NOT_FOUND,
            "SERVER_NOT_FOUND",
        )
        await expect_error(
            prov.collect(
                provisioning.WatchServer(pb.WatchServerRequest(name=name), metadata=other)
            ),
            Code.NOT_FOUND,
            "SERVER_NOT_FOUND",
        )
    # alpha's page token means nothing to beta, nor a tampered one to alpha
    response = await provisioning.ListServers(pb.ListServersRequest(page_size=2), metadata=md)
    assert response.next_page_token
    await expect_invalid(
        provisioning.ListServers(
            pb.ListServersRequest(page_size=2, page_token=response.next_page_token),
            metadata=other,
        ),
        "page_token",
    )
    await expect_invalid(
        provisioning.ListServers(
            pb.ListServersRequest(page_token=response.next_page_token[:-2] + "xx"), metadata=md
        ),
        "page_token",
    )
    for size in (-1, 1001):
        await expect_invalid(
            provisioning.ListServers(pb.ListServersRequest(page_size=size), metadata=md),
            "page_size",
        )


async def test_stop_and_start(provisioning, as_project) -> None:
    md = as_project("alpha")
    deployment = await prov.deploy(provisioning, md, prov.create_request(CENTOS, S4, 1, "power"))
    (name,) = deployment.servers
    before = await prov.get_server(provisioning, md, name)

    stopped = await provisioning.StopServer(pb.StopServerRequest(name=name), metadata=md)
    assert stopped.state == STOPPED
    assert stopped.host_name == before.host_name and stopped.image == before.image
    assert stopped.update_time.ToDatetime() >= before.update_time.ToDatetime()
    assert (await prov.get_server(provisioning, md, name)).state == STOPPED
    assert [s.state for s in await prov.list_servers(provisioning, md)] == [STOPPED]
    rich = await expect_error(
        provisioning.StopServer(pb.StopServerRequest(name=name), metadata=md),
        Code.FAILED_PRECONDITION,
        "SERVER_STATE_CONFLICT",
    )
    assert name in rich.message

    started = await provisioning.StartServer(pb.StartServerRequest(name=name), metadata=md)
    assert started.state == ACTIVE
    assert started.network_state == pb.NETWORK_STATE_UP
    await expect_error(
        provisioning.StartServer(pb.StartServerRequest(name=name), metadata=md),
        Code.FAILED_PRECONDITION,
        "SERVER_STATE_CONFLICT",
    )
    assert (await prov.get_server(provisioning, md, name)).state == ACTIVE

    other = as_project("beta")
    await expect_error(
        provisioning.StopServer(pb.StopServerRequest(name=name), metadata=other),
        Code.NOT_FOUND,
        "SERVER_NOT_FOUND",
    )
    await provisioning.StopServer(pb.StopServerRequest(name=name), metadata=md)
    await expect_error(
        provisioning.StartServer(pb.StartServerRequest(name=name), metadata=other),
        Code.NOT_FOUND,
        "SERVER_NOT_FOUND",
    )
    assert (await prov.get_server(provisioning, md, name)).state == STOPPED
    await provisioning.StartServer(pb.StartServerRequest(name=name), metadata=md)
    assert (await prov.get_server(provisioning, md, name)).state == ACTIVE


async def test_delete_removes_the_server_and_its_disks(provisioning, as_project, settings) -> None:
    md = as_project("alpha")
    deployment = await prov.deploy(provisioning, md, prov.create_request(CENTOS, S4, 2, "gone"))
    evs = await prov.deploy(
        provisioning, md, prov.create_request(CENTOS, S4, 1, "quick", boot_source=2)
    )
    local, stopped = deployment.servers
    (quick,) = evs.servers
    await provisioning.StopServer(pb.StopServerRequest(name=stopped), metadata=md)
    for name in (local, stopped, quick):
        assert prov.server_dir(settings, name).is_dir()

    await expect_error(
        provisioning.DeleteServer(pb.DeleteServerRequest(name=local), metadata=as_project("beta")),
        Code.NOT_FOUND,
        "SERVER_NOT_FOUND",
    )
    assert prov.server_dir(settings, local).is_dir()

    for name in (local, stopped, quick):  # active, stopped, and an EVS clone
        await provisioning.DeleteServer(pb.DeleteServerRequest(name=name), metadata=md)
        assert not prov.server_dir(settings, name).exists()
        await expect_error(
            provisioning.GetServer(pb.GetServerRequest(name=name), metadata=md),
            Code.NOT_FOUND,
            "SERVER_NOT_FOUND",
        )
        await expect_error(
            provisioning.DeleteServer(pb.DeleteServerRequest(name=name), metadata=md),
            Code.NOT_FOUND,
            "SERVER_NOT_FOUND",
        )
        await expect_error(
            provisioning.StartServer(pb.StartServerRequest(name=name), metadata=md),
            Code.NOT_FOUND,
            "SERVER_NOT_FOUND",
        )
    assert await prov.list_servers(provisioning, md) == []
    # the shared image copies stay for the next deployment
    assert list((settings.data_dir / "fleet" / "image-cache").iterdir())


class Gate:
    """Holds every image download until opened: deployments stay BUILDING."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.opened = asyncio.Event()
        self.waiting = asyncio.Event()
        real = ImageSource._download
        gate = self

        async def held(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            gate.waiting.set()
            await gate.opened.wait()
            return await real(self, *args, **kwargs)

        monkeypatch.setattr(ImageSource, "_download", held)


async def test_watch_follows_a_deployment_whose_stream_dropped(
    provisioning, images, as_project, settings, monkeypatch
) -> None:
    md = as_project("alpha")
    image, data = await prov.create_disk_image(images, md, bulk_bytes=512 * 1024)
    gate = Gate(monkeypatch)
    call = provisioning.CreateServers(
        prov.create_request(image.name, S4, 3, "watched", boot_source=LOCAL), metadata=md
    )
    first = await asyncio.wait_for(call.read(), 10)
    assert first.stage == VALIDATING and first.state == BUILDING
    call.cancel()  # the caller goes away after the first event
    assert await call.code() == grpc.StatusCode.CANCELLED
    await asyncio.wait_for(gate.waiting.wait(), 10)

    listed = await prov.list_servers(provisioning, md)
    assert len(listed) == 3 and first.server in [s.name for s in listed]
    assert {s.state for s in listed} == {BUILDING}
    assert {s.host_name for s in listed} == {"watched-1", "watched-2", "watched-3"}
    # while building, it cannot be deleted nor powered
    await expect_error(
        provisioning.DeleteServer(pb.DeleteServerRequest(name=first.server), metadata=md),
        Code.FAILED_PRECONDITION,
    )
    await expect_error(
        provisioning.StopServer(pb.StopServerRequest(name=first.server), metadata=md),
        Code.FAILED_PRECONDITION,
    )

    watchers = [asyncio.create_task(prov.watch(provisioning, md, server.name)) for server in listed]
    await asyncio.sleep(0.2)
    assert not any(w.done() for w in watchers), "a prov.watch ended while the work was held"
    gate.opened.set()
    for server, watcher in zip(listed, watchers, strict=True):
        events = await asyncio.wait_for(watcher, 30)
        stages = [e.stage for e in events]
        assert stages[0] == VALIDATING, [stage_name(s) for s in stages]
        assert stages[-1] == STAGE_ACTIVE, [stage_name(s) for s in stages]
        assert {e.server for e in events} == {server.name}
        assert events[-1].state == ACTIVE
        streamed = [
            e.bytes_done for e in events if e.stage == pb.PROVISIONING_STAGE_IMAGE_STREAMING
        ]
        assert streamed and streamed[-1] == len(data)
        assert (await prov.get_server(provisioning, md, server.name)).state == ACTIVE
        assert prov.server_dir(settings, server.name).is_dir()


async def test_watch_after_completion_is_one_event_of_the_current_state(
    provisioning, as_project
) -> None:
    """The proto: WatchServer streams the work in progress from the start, or
    only the server's current state when nothing is in progress."""
    md = as_project("alpha")
    deployment = await prov.deploy(provisioning, md, prov.create_request(CENTOS, S4, 1, "done"))
    (name,) = deployment.servers
    events = await prov.watch(provisioning, md, name)
    assert [stage_name(e.stage) for e in events] == ["PROVISIONING_STAGE_ACTIVE"]
    assert events[0].state == ACTIVE and events[0].server == name


async def test_watch_of_a_stopped_server_says_stopped(provisioning, as_project) -> None:
    md = as_project("alpha")
    deployment = await prov.deploy(provisioning, md, prov.create_request(CENTOS, S4, 1, "off"))
    (name,) = deployment.servers
    await provisioning.StopServer(pb.StopServerRequest(name=name), metadata=md)
    events = await prov.watch(provisioning, md, name)
    assert events, "WatchServer must send at least the current state"
    assert state_name(events[-1].state) == "SERVER_STATE_STOPPED", [
        (stage_name(e.stage), state_name(e.state)) for e in events
    ]


MALFORMED_NAMES = [
    "",
    "servers/",
    "servers/not-a-uuid",
    "servers/6F1C2A52-3B0E-4F4E-9F39-5D8F0B1F6A10",  # not in canonical lower case
    str(uuid.uuid4()),
    f"images/{uuid.uuid4()}",
    f"servers/{uuid.uuid4()}/extra",
]


async def test_malformed_server_names_are_invalid(provisioning, as_project) -> None:
    md = as_project("alpha")
    for name in MALFORMED_NAMES:
        await expect_invalid(
            provisioning.GetServer(pb.GetServerRequest(name=name), metadata=md), "name"
        )
        await expect_invalid(
            provisioning.StartServer(pb.StartServerRequest(name=name), metadata=md), "name"
        )
        await expect_invalid(
            provisioning.StopServer(pb.StopServerRequest(name=name), metadata=md), "name"
        )
        await expect_invalid(
            provisioning.DeleteServer(pb.DeleteServerRequest(name=name), metadata=md), "name"
        )
        await expect_invalid(
            prov.collect(provisioning.WatchServer(pb.WatchServerRequest(name=name), metadata=md)),
            "name",
        )
    unknown = f"servers/{uuid.uuid4()}"
    await expect_error(
        provisioning.GetServer(pb.GetServerRequest(name=unknown), metadata=md), Code.NOT_FOUND
    )
    await expect_error(
        prov.collect(provisioning.WatchServer(pb.WatchServerRequest(name=unknown), metadata=md)),
        Code.NOT_FOUND,
    )


@pytest.mark.parametrize(
    "metadata",
    [(), (("authorization", "Bearer not-a-token"),), (("authorization", "Basic abc"),)],
    ids=["no token", "garbage token", "not bearer"],
)
async def test_every_call_needs_a_token(provisioning, as_project, metadata) -> None:
    deployment = await prov.deploy(
        provisioning, as_project("alpha"), prov.create_request(CENTOS, S4)
    )
    (name,) = deployment.servers
    calls = [
        provisioning.GetServer(pb.GetServerRequest(name=name), metadata=metadata),
        provisioning.ListServers(pb.ListServersRequest(), metadata=metadata),
        provisioning.StopServer(pb.StopServerRequest(name=name), metadata=metadata),
        provisioning.StartServer(pb.StartServerRequest(name=name), metadata=metadata),
        provisioning.DeleteServer(pb.DeleteServerRequest(name=name), metadata=metadata),
        prov.collect(provisioning.WatchServer(pb.WatchServerRequest(name=name), metadata=metadata)),
        prov.collect(
            provisioning.CreateServers(prov.create_request(CENTOS, S4), metadata=metadata)
        ),
    ]
    for call in calls:
        await expect_error(call, Code.UNAUTHENTICATED)
    server = await prov.get_server(provisioning, as_project("alpha"), name)
    assert server.state == ACTIVE
    assert len(await prov.list_servers(provisioning, as_project("alpha"))) == 1


async def test_watch_attaching_as_the_work_ends_tells_it_in_full(
    provisioning, as_project, monkeypatch
) -> None:
    """The server is read while BUILDING and its deployment ends before the
    events are looked at: the watcher still gets every event up to ACTIVE,
    not a stale BUILDING snapshot."""
    md = as_project("alpha")
    deployment = await prov.deploy(provisioning, md, prov.create_request())
    (server_name,) = deployment.servers
    read = fleet_module.Fleet.get

    async def read_just_before_the_end(self, caller, server_id):  # type: ignore[no-untyped-def]
        server = await read(self, caller, server_id)
        return dataclasses.replace(server, state=ServerState.BUILDING)

    monkeypatch.setattr(fleet_module.Fleet, "get", read_just_before_the_end)
    watched = await prov.watch(provisioning, md, server_name)
    assert [e.stage for e in watched] == deployment.stages(server_name)
    assert watched[-1].stage == STAGE_ACTIVE
