"""Scenario 4a, deployments that go wrong: image bytes that rotted in the
blob store, an image deleted while it is being streamed, and a client that
hangs up — which must not stop the work."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
from scenario_support import (
    Cloud,
    cloud,
    collect,
    create_request,
    disk_spec,
    get_server,
    image_id,
    new_ssh_key,
    upload_disk_image,
)

from bms.image.v1 import image_pb2
from bms_image.common.disk_format import DiskSpec
from support import chunk_store
from support.disks import cache_dir, server_dir, write_disk_file
from support.errors import Code, expect_error
from support.fleet_events import (
    ACTIVE,
    ERROR,
    FAILED,
    LOCAL,
    STAGE_ACTIVE,
    STREAMING,
    VALIDATING,
    Events,
    pb,
    stage_name,
)
from support.tokens import Metadata

MIB = 1024 * 1024


async def uploaded(
    c: Cloud, md: Metadata, disk: Path, spec: DiskSpec, display_name: str = "golden"
) -> image_pb2.Image:
    """`spec` written to `disk`, then uploaded as an ACTIVE private image."""
    await asyncio.to_thread(write_disk_file, disk, spec)
    return await upload_disk_image(c, md, disk, display_name)


async def test_rotten_image_bytes_end_in_data_loss(tmp_path: Path) -> None:
    async with cloud(tmp_path) as c:
        md = c.md("alpha")
        image = await uploaded(c, md, tmp_path / "golden.disk", disk_spec(bulk_bytes=MIB))
        stored = chunk_store.stored_bytes(c.data_dir, image.name)
        assert len(stored) == image.size_bytes
        chunk_store.damage_bytes(c.data_dir, image.name, image.size_bytes // 2)  # bit rot
        rotten = chunk_store.stored_bytes(c.data_dir, image.name)
        assert len(rotten) == image.size_bytes and rotten != stored

        events = await collect(
            c.provisioning.CreateServers(
                create_request(image.name, 2, "rot", new_ssh_key().line, boot_source=LOCAL),
                metadata=md,
            )
        )
        assert len(events.servers) == 2
        for name in events.servers:
            stages = events.stages(name)
            assert STAGE_ACTIVE not in stages, events.describe(name)
            assert all(e.state != ACTIVE for e in events.by_server[name])
            final = events.final(name)
            assert final.stage == FAILED, events.describe(name)
            assert final.state == ERROR
            assert final.error_code == "DATA_LOSS", final
            # The image service finds the rotten chunk as it reads it, before
            # the fleet's SHA-256 would: no rotten byte is ever sent.
            assert final.error_reason == "IMAGE_DATA_DAMAGED", final
            assert image.name in final.message and "damaged" in final.message, final.message
            server = await get_server(c, md, name)
            assert server.state == ERROR, server
            assert server.state_reason, server
            assert not (server_dir(c.data_dir, name) / "system.disk").exists()
        # nothing unverified was kept for a later deployment
        assert not list(cache_dir(c.data_dir).glob(f"{image.sha256}*")), list(
            cache_dir(c.data_dir).iterdir()
        )


async def test_image_deleted_while_streaming_fails_the_deployment(tmp_path: Path) -> None:
    async with cloud(tmp_path) as c:
        md = c.md("alpha")
        disk = tmp_path / "big.disk"
        spec = disk_spec(bulk_bytes=200 * MIB, seed="big")
        image = await uploaded(c, md, disk, spec, "big-golden")
        disk.unlink()
        assert image.size_bytes > 200 * MIB

        call = c.provisioning.CreateServers(
            create_request(image.name, 1, "doomed", boot_source=LOCAL), metadata=md
        )
        received = []
        deleted = False

        async def follow() -> None:
            nonlocal deleted
            async for event in call:
                received.append(event)
                if event.stage == STREAMING and not deleted:
                    deleted = True
                    assert event.bytes_done < event.bytes_total, event
                    await c.images.DeleteImage(
                        image_pb2.DeleteImageRequest(name=image.name), metadata=md
                    )

        await asyncio.wait_for(follow(), 60)
        assert deleted, [stage_name(e.stage) for e in received]
        events = Events(received)
        (name,) = events.servers
        final = events.final(name)
        assert final.stage == FAILED, (
            f"images/{image_id(image.name)} was deleted during IMAGE_STREAMING, yet the "
            f"deployment ended {stage_name(final.stage)} ({final.message!r})"
        )
        assert STAGE_ACTIVE not in events.stages(name), events.describe(name)
        assert final.state == ERROR
        assert final.error_code in ("NOT_FOUND", "FAILED_PRECONDITION", "DATA_LOSS"), final
        assert image_id(image.name) in final.message, final.message
        server = await get_server(c, md, name)
        assert server.state == ERROR, server
        assert server.state_reason, server
        await expect_error(
            c.images.GetImage(image_pb2.GetImageRequest(name=image.name), metadata=md),
            Code.NOT_FOUND,
        )


async def test_a_client_that_hangs_up_does_not_stop_the_deployment(tmp_path: Path) -> None:
    async with cloud(tmp_path) as c:
        md = c.md("alpha")
        spec = disk_spec(bulk_bytes=24 * MIB, seed="mid")
        image = await uploaded(c, md, tmp_path / "mid.disk", spec, "mid-golden")

        call = c.provisioning.CreateServers(
            create_request(image.name, 2, "orphan", boot_source=LOCAL), metadata=md
        )
        first = await asyncio.wait_for(call.read(), 30)
        assert first.stage == VALIDATING, first
        assert call.cancel()
        assert await call.code() == grpc.StatusCode.CANCELLED
        listing = await c.provisioning.ListServers(pb.ListServersRequest(), metadata=md)
        mine = list(listing.servers)
        assert len(mine) == 2
        building = [s.name for s in mine if s.state == pb.SERVER_STATE_BUILDING]
        assert building, mine  # the hang-up came while the work was going on

        # WatchServer follows work in progress from its start, to the end
        watched = await asyncio.gather(
            *(
                collect(c.provisioning.WatchServer(pb.WatchServerRequest(name=s.name),
                                                   metadata=md))
                for s in mine
            )
        )  # fmt: skip
        for server, events in zip(mine, watched, strict=True):
            assert events.servers == [server.name]
            assert events.final(server.name).stage == STAGE_ACTIVE, events.describe(server.name)
            if server.name in building:
                assert events.stages(server.name)[0] == VALIDATING, events.describe(server.name)
            done = await get_server(c, md, server.name)
            assert done.state == ACTIVE, done
            assert done.host_name.startswith("orphan-")
