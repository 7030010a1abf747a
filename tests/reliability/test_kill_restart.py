"""Crashes and restarts: `bms-image serve` (and `bms-image provisioner`) run
as real processes, are killed with SIGKILL in the middle of work — at a
moment the test observed (bytes staged, bytes streamed, responses
received), never after a fixed sleep — and restarted on the same data
directory and database. After each restart the recovery audit
(crash_support.audit) must find nothing wrong:

- no ACTIVE image has partial or unverified bytes (every one downloads
  whole and matches its size and SHA-256, and the uploaded content);
- nothing stays in a transitional state: no image SAVING, no capture left
  QUEUED, no server BUILDING, REBUILDING or held by a task; what was cut off
  is resumable (a client's upload), resumed, or failed with a reason;
- every blob and staged file belongs to an image that needs it, and no
  temporary or scratch file is left;
- counts match what is stored: acknowledged creates survived, the quota
  and the member limit can be filled exactly to their limits, not beyond.

Then the interrupted work is resumed or redone and must succeed."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from crash_support import (
    ACTIVE,
    CENTOS,
    ERROR,
    HANG_GUARD,
    KILL,
    KILLED,
    MISSED,
    QUEUED,
    SAVING,
    SERVER_ACTIVE,
    STAGE_ACTIVE,
    STOPPED,
    UBUNTU,
    WAIT,
    Client,
    MiB,
    World,
    audit,
    bytes_moving,
    connect,
    create_image,
    deploy,
    deploy_request,
    disk_image_bytes,
    download,
    fill_members_exactly,
    fill_quota_exactly,
    flattened,
    follow_until,
    key_of,
    kill_at,
    list_members,
    md,
    poll,
    private_image,
    provisioner_process,
    random_bytes,
    run_to_end,
    running,
    serve_process,
    server_dir,
    server_state,
    sha256_hex,
    staged_size,
    start,
    stored,
    system_disk,
    upload,
    upload_messages,
    upload_new_image,
)
from google.protobuf import field_mask_pb2

from bms.image.v1 import image_pb2, provisioning_pb2, sharing_pb2
from bms_image.common import disk_format as disks
from support import chunk_store
from support.errors import Code, decode
from support.processes import ServerProcess

pytestmark = pytest.mark.e2e

pb = provisioning_pb2


@pytest.fixture
def launched() -> Iterator[list[ServerProcess]]:
    """Processes a test starts; any still running at teardown is killed."""
    processes: list[ServerProcess] = []
    try:
        yield processes
    finally:
        for process in processes:
            process.kill()


def tracked(launched: list[ServerProcess], process: ServerProcess) -> ServerProcess:
    launched.append(process)
    return process


async def expect_unavailable(call: Awaitable[Any]) -> None:
    """A call that was in flight when its server was killed."""
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await asyncio.wait_for(call, HANG_GUARD)
    assert failed.value.code() in (Code.UNAVAILABLE, Code.CANCELLED), failed.value


async def share_accepted(client: Client, image: str, owner: str, member: str) -> None:
    await client.sharing.CreateImageMember(
        sharing_pb2.CreateImageMemberRequest(
            parent=image, member=sharing_pb2.ImageMember(member_project=member)
        ),
        metadata=md(owner),
    )
    await client.sharing.UpdateImageMember(
        sharing_pb2.UpdateImageMemberRequest(
            member=sharing_pb2.ImageMember(
                name=f"{image}/members/{member}", status=sharing_pb2.MEMBER_STATUS_ACCEPTED
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["status"]),
        ),
        metadata=md(member),
    )


# -- uploads and downloads ----------------------------------------------------------------


async def test_sigkill_during_an_upload_and_a_download(
    tmp_path: Path, launched: list[ServerProcess]
) -> None:
    """One crash with an upload half sent and a (shared) download half
    received: the upload is resumable from exactly the staged bytes, the
    download resumes from its offset, members and quota are intact."""
    quota, member_limit = 6, 4
    data_dir = tmp_path / "data"
    serve = tracked(
        launched,
        serve_process(
            data_dir, tmp_path / "logs", private_image_quota=quota, max_image_members=member_limit
        ),
    )
    await start(serve)
    shared_content = random_bytes(8 * MiB + 5)
    partial_content = random_bytes(24 * MiB + 3)
    sent = 13 * MiB + 12_345
    durable = 8 * MiB  # a batch of 8 chunks is stored at once: the rest was in flight

    async with connect(serve.address) as client:
        shared = await upload_new_image(client, "alpha", "shared", shared_content)
        await share_accepted(client, shared.name, "alpha", "beta")
        await client.sharing.CreateImageMember(  # gamma has not answered
            sharing_pb2.CreateImageMemberRequest(
                parent=shared.name, member=sharing_pb2.ImageMember(member_project="gamma")
            ),
            metadata=md("alpha"),
        )
        members_before = await list_members(client, "alpha", shared.name)

        queued = await create_image(client, "alpha", "in-flight")
        never = asyncio.Event()
        uploading = client.images.UploadImageData(
            upload_messages(queued.name, partial_content, pause_at=sent, resume=never),
            metadata=md("alpha"),
        )
        downloading = client.images.DownloadImageData(
            image_pb2.DownloadImageDataRequest(name=shared.name), metadata=md("beta")
        )
        received = b""
        while len(received) < 2 * MiB:  # beta has the first bytes, the stream is open
            message = await asyncio.wait_for(downloading.read(), HANG_GUARD)
            assert message is not grpc.aio.EOF and not message.last
            received += message.chunk
        await poll(
            lambda: asyncio.sleep(0, staged_size(data_dir, queued.name)), lambda n: n >= durable
        )
        assert (await client.image(queued.name)).status == SAVING

        serve.kill()
        await expect_unavailable(uploading)
        # Bytes the server sent before it died may still wait in the client's
        # flow-control window: the stream either breaks, or (if every byte
        # had been sent) ends with the image whole and verified.
        try:
            while True:
                message = await asyncio.wait_for(downloading.read(), HANG_GUARD)
                assert message is not grpc.aio.EOF, "the stream ended without its last message"
                received += message.chunk
                if message.last:
                    assert received == shared_content
                    assert message.sha256 == sha256_hex(shared_content)
                    break
        except grpc.aio.AioRpcError as broken:
            assert broken.code() == grpc.StatusCode.UNAVAILABLE, broken

    await start(serve)
    async with connect(serve.address) as client:
        world = World(
            client, data_dir, ["alpha", "beta", "gamma"], {shared.name: shared_content}, fleet=True
        )
        problems, _ = await audit(world)

        # The upload: QUEUED with exactly the staged bytes, resumed to ACTIVE.
        image = await client.image(queued.name)
        assert (image.status, image.uploaded_bytes) == (QUEUED, durable), image
        assert "restart" in image.status_reason, image.status_reason
        assert chunk_store.staged(data_dir, queued.name) == partial_content[:durable]
        await upload(client, "alpha", queued.name, partial_content, offset=durable)
        data, final = await download(client, "alpha", queued.name)
        assert data == partial_content and final == sha256_hex(partial_content)

        # The download: resumed from where it broke off, the whole verifies.
        rest, final = await download(client, "beta", shared.name, offset=len(received))
        assert received + rest == shared_content
        assert final == shared.sha256 == sha256_hex(shared_content)

        # Counts: members as they were, both limits fill exactly.
        assert await list_members(client, "alpha", shared.name) == members_before
        await fill_members_exactly(client, "alpha", shared.name, member_limit)
        await fill_quota_exactly(client, "alpha", quota)
        problems.check()


# -- a capture ----------------------------------------------------------------------------


async def kill_during_a_capture(
    serve: ServerProcess, client: Client, data_dir: Path, server: str
) -> image_pb2.Image:
    """Captures `server` and kills the service at a moment its stored state
    shows the capture half done: the image SAVING with at least 1 MiB of the
    disk staged. A capture that ends before it is caught is redone."""
    database = data_dir / "bms-image.db"
    for _ in range(5):
        created: image_pb2.Image = await client.images.CreateImage(
            image_pb2.CreateImageRequest(
                image=image_pb2.Image(display_name="backup"), source_server=server
            ),
            metadata=md("alpha"),
        )
        assert created.status == QUEUED, created

        def moment(name: str = created.name) -> str:
            rows = stored(database, "SELECT status FROM images WHERE id = ?", key_of(name))
            status = rows[0][0] if rows else "queued"
            if status == "saving":  # its bytes are on their way into the store
                return KILL
            return WAIT if status in ("queued", "saving") else MISSED

        if await kill_at(serve, moment, every=0.002):
            return created
        assert (await client.image(created.name)).status == ACTIVE
        await poll(lambda: client.server(server), lambda s: s.task == "")
    raise AssertionError("no capture could be caught moving bytes in 5 attempts")


async def test_sigkill_during_a_capture(tmp_path: Path, launched: list[ServerProcess]) -> None:
    """CreateImage with source_server, killed while the disk's bytes are
    being staged: after the restart the server is released and the image
    is either ACTIVE with the disk's exact bytes or KILLED with a reason —
    never QUEUED with no one to finish it; the capture can be done again."""
    quota = 6
    data_dir = tmp_path / "data"
    serve = tracked(
        launched,
        serve_process(data_dir, tmp_path / "logs", catalog_image_mib=1, private_image_quota=quota),
    )
    await start(serve)
    golden_bytes = await asyncio.to_thread(disk_image_bytes, tmp_path, 16 * MiB, "golden")

    async with connect(serve.address) as client:
        golden = await upload_new_image(client, "alpha", "golden", golden_bytes)
        (server,) = await deploy(client, "alpha", deploy_request(golden.name, 1, "cap"))
        await client.fleet.StopServer(pb.StopServerRequest(name=server), metadata=md("alpha"))
        flat = await asyncio.to_thread(flattened, system_disk(data_dir, server), tmp_path)
        capture = await kill_during_a_capture(serve, client, data_dir, server)

    await start(serve)
    async with connect(serve.address) as client:
        world = World(client, data_dir, ["alpha"], {golden.name: golden_bytes})
        problems, images = await audit(world)

        image = images[capture.name]
        if image.status == ACTIVE:
            assert (await download(client, "alpha", capture.name))[0] == flat
        elif image.status == KILLED:
            assert image.status_reason
        after = await client.server(server)
        assert (after.state, after.task) == (STOPPED, ""), after

        # The capture can be done again, and gives the disk's exact bytes.
        again: image_pb2.Image = await client.images.CreateImage(
            image_pb2.CreateImageRequest(
                image=image_pb2.Image(display_name="backup-again"), source_server=server
            ),
            metadata=md("alpha"),
        )
        done = await poll(
            lambda: client.image(again.name), lambda i: i.status not in (QUEUED, SAVING)
        )
        assert done.status == ACTIVE, done
        assert (await download(client, "alpha", again.name))[0] == flat
        await poll(lambda: client.server(server), lambda s: s.task == "")
        await fill_quota_exactly(client, "alpha", quota)
        problems.check()


# -- deployments and reinstalls -----------------------------------------------------------


FLEET_SETTINGS = {"catalog_image_mib": 4, "chunk_bytes": 256 * 1024}


async def test_sigkill_during_a_batch_deployment_then_during_a_reinstall(
    tmp_path: Path, launched: list[ServerProcess]
) -> None:
    """Two crashes of one service. First, three local-disk servers killed
    while the image streams: after the restart each is ERROR with a reason
    (or ACTIVE, had it been resumed), none BUILDING and failed builds leave
    no disk; they can be deleted and a new batch deploys. Then one of the new
    servers is stopped and reinstalled (CentOS -> Ubuntu) and killed while
    Ubuntu streams: after the restart it is ERROR with a reason (or ACTIVE on
    Ubuntu), its system disk is whole (the old or the new one, never a mix),
    its data disk is kept, and the reinstall can be retried."""
    data_dir = tmp_path / "data"
    serve = tracked(launched, serve_process(data_dir, tmp_path / "logs", **FLEET_SETTINGS))
    await start(serve)
    async with connect(serve.address) as client:
        call = client.fleet.CreateServers(deploy_request(CENTOS, 3, "batch"), metadata=md("alpha"))
        followed = await follow_until(call, bytes_moving)
        assert followed.finished() == [], "a server finished before the kill"
        serve.kill()
        call.cancel()
    batch = followed.servers
    assert len(batch) == 3, followed.events

    await start(serve)
    async with connect(serve.address) as client:
        problems, _ = await audit(World(client, data_dir, ["alpha"]))
        for name in batch:
            built = await client.server(name)
            assert built.state in (ERROR, SERVER_ACTIVE), built
            if built.state == ERROR:
                assert "interrupted" in built.state_reason, built.state_reason
                assert not server_dir(data_dir, name).exists(), "a failed build keeps its disk"
                await client.fleet.DeleteServer(
                    pb.DeleteServerRequest(name=name), metadata=md("alpha")
                )
        again = await deploy(client, "alpha", deploy_request(CENTOS, 2, "again", [1]))
        listed = {s.name: s for s in await client.list_servers("alpha")}
        assert all(listed[name].state == SERVER_ACTIVE for name in again), listed
        centos = await client.image(CENTOS)
        cache = sorted(p.name for p in (data_dir / "fleet" / "image-cache").iterdir())
        assert cache == [f"{centos.sha256}.raw"]
        problems.check()

        server = again[0]
        await client.fleet.StopServer(pb.StopServerRequest(name=server), metadata=md("alpha"))
        call = client.fleet.ReinstallServer(
            pb.ReinstallServerRequest(name=server, image=UBUNTU), metadata=md("alpha")
        )
        followed = await follow_until(call, bytes_moving)
        assert followed.finished() == [], "the reinstall finished before the kill"
        serve.kill()
        call.cancel()

    data_disk = server_dir(data_dir, server) / "data-1.disk"
    await start(serve)
    async with connect(serve.address) as client:
        problems, _ = await audit(World(client, data_dir, ["alpha"]))
        after = await client.server(server)
        assert after.state in (ERROR, SERVER_ACTIVE), server_state(after.state)
        if after.state == ERROR:
            assert "interrupted" in after.state_reason, after.state_reason
        release = await asyncio.to_thread(disks.os_release, system_disk(data_dir, server))
        expected = "ubuntu" if after.state == SERVER_ACTIVE else "centos"
        assert release.get("ID") == expected, release
        assert data_disk.stat().st_size == 1024**3, "the data disk was not kept"

        events = await run_to_end(
            client.fleet.ReinstallServer(
                pb.ReinstallServerRequest(name=server, image=UBUNTU), metadata=md("alpha")
            )
        )
        assert events[-1].stage == STAGE_ACTIVE, events
        rebuilt = await client.server(server)
        assert (rebuilt.state, rebuilt.image, rebuilt.task) == (SERVER_ACTIVE, UBUNTU, "")
        release = await asyncio.to_thread(disks.os_release, system_disk(data_dir, server))
        assert release.get("ID") == "ubuntu", release
        assert data_disk.stat().st_size == 1024**3
        problems.check()


# -- a burst of creates ---------------------------------------------------------------------


async def test_sigkill_during_a_burst_of_creates(
    tmp_path: Path, launched: list[ServerProcess], database_url: str
) -> None:
    """24 concurrent CreateImage (with request_ids) and 8 CreateImageMember
    against a quota of 10 and a member limit of 4, killed once the first
    creates are acknowledged: every acknowledged create survives, retrying
    every request_id creates exactly up to the quota, and both limits fill
    exactly — on SQLite and on PostgreSQL."""
    quota, member_limit, creates, joins = 10, 4, 24, 8
    data_dir = tmp_path / "data"
    serve = tracked(
        launched,
        serve_process(
            data_dir,
            tmp_path / "logs",
            database_url=database_url,
            catalog_image_mib=1,
            private_image_quota=quota,
            max_image_members=member_limit,
        ),
    )
    await start(serve)
    request_ids = [str(uuid.uuid4()) for _ in range(creates)]
    acked: dict[str, str] = {}
    joined: set[str] = set()

    async with connect(serve.address) as client:
        shared = await upload_new_image(client, "alpha", "shared", random_bytes(256 * 1024))
        enough = asyncio.Event()

        async def create(n: int, request_id: str) -> None:
            image = await client.images.CreateImage(
                image_pb2.CreateImageRequest(
                    image=private_image(f"burst-{n}"), request_id=request_id
                ),
                metadata=md("alpha"),
            )
            acked[request_id] = image.name
            if len(acked) >= 3:
                enough.set()

        async def join(project: str) -> None:
            await client.sharing.CreateImageMember(
                sharing_pb2.CreateImageMemberRequest(
                    parent=shared.name, member=sharing_pb2.ImageMember(member_project=project)
                ),
                metadata=md("alpha"),
            )
            joined.add(project)

        burst = [asyncio.ensure_future(create(n, r)) for n, r in enumerate(request_ids)]
        burst += [asyncio.ensure_future(join(f"member-{n}")) for n in range(joins)]
        await asyncio.wait_for(enough.wait(), HANG_GUARD)
        in_flight = len([task for task in burst if not task.done()])
        serve.kill()
        await asyncio.gather(*burst, return_exceptions=True)
    assert in_flight > 0, "the burst was over before the kill"

    await start(serve)
    async with connect(serve.address) as client:
        problems, images = await audit(
            World(client, data_dir, ["alpha"], fleet=True, database_url=database_url)
        )
        lost = [name for name in acked.values() if name not in images]
        assert lost == [], f"acknowledged creates lost in the crash: {lost}"
        members = await list_members(client, "alpha", shared.name)
        assert joined <= set(members), f"acknowledged members lost: {joined - set(members)}"
        assert len(members) <= member_limit, members

        # Every request_id again, all at once: the acknowledged ones answer
        # their image, and exactly the quota's free slots are taken.
        retries = await asyncio.gather(
            *(
                client.images.CreateImage(
                    image_pb2.CreateImageRequest(
                        image=private_image(f"burst-{n}"), request_id=request_id
                    ),
                    metadata=md("alpha"),
                )
                for n, request_id in enumerate(request_ids)
            ),
            return_exceptions=True,
        )
        made = {
            request_id: result.name
            for request_id, result in zip(request_ids, retries, strict=True)
            if isinstance(result, image_pb2.Image)
        }
        for request_id, name in acked.items():
            assert made.get(request_id) == name, (request_id, name, made.get(request_id))
        assert len(set(made.values())) == len(made) == quota - 1, made
        for result in retries:
            if not isinstance(result, image_pb2.Image):
                assert isinstance(result, grpc.aio.AioRpcError), result
                assert decode(result).code == Code.RESOURCE_EXHAUSTED, result
        await fill_quota_exactly(client, "alpha", quota)
        await fill_members_exactly(client, "alpha", shared.name, member_limit)
        problems.check()


async def test_sigkill_during_a_burst_of_replications(
    tmp_path: Path, launched: list[ServerProcess]
) -> None:
    """beta replicates an image alpha shares with it, 12 times at once (each
    with a request_id), and the service is killed at a moment it has stored
    a replica SAVING: after the restart every replica is ACTIVE with the
    source's exact bytes or KILLED with a reason, retrying every request_id
    gives ACTIVE replicas, and beta's quota then fills exactly."""
    quota = 20
    data_dir = tmp_path / "data"
    serve = tracked(launched, serve_process(data_dir, tmp_path / "logs", private_image_quota=quota))
    await start(serve)
    content = random_bytes(2 * MiB + 7)
    request_ids = [str(uuid.uuid4()) for _ in range(12)]
    database = data_dir / "bms-image.db"

    def replica_saving() -> str:
        rows = stored(
            database,
            "SELECT count(*) FROM images WHERE owner_project = 'beta' AND status = 'saving'",
        )
        return KILL if rows and rows[0][0] else WAIT

    async with connect(serve.address) as client:
        shared = await upload_new_image(client, "alpha", "shared", content)
        await share_accepted(client, shared.name, "alpha", "beta")
        burst = [
            asyncio.ensure_future(
                client.sharing.ReplicateImage(
                    sharing_pb2.ReplicateImageRequest(name=shared.name, request_id=request_id),
                    metadata=md("beta"),
                )
            )
            for request_id in request_ids
        ]
        assert await kill_at(serve, replica_saving)
        outcomes = await asyncio.gather(*burst, return_exceptions=True)
    acked = {o.name for o in outcomes if isinstance(o, image_pb2.Image)}

    await start(serve)
    async with connect(serve.address) as client:
        problems, images = await audit(
            World(client, data_dir, ["alpha", "beta"], {shared.name: content})
        )
        replicas = [i for i in images.values() if i.owner_project == "beta"]
        assert acked <= {i.name for i in replicas}, "acknowledged replicas were lost"
        for replica in replicas:
            assert replica.status in (ACTIVE, KILLED, QUEUED), replica
            if replica.status == ACTIVE:
                assert replica.sha256 == sha256_hex(content), replica
        problems.check()

        # A replication cut off by the crash never answered: retrying its
        # request_id starts it over; an acknowledged one is returned as is.
        retried = await asyncio.gather(
            *(
                client.sharing.ReplicateImage(
                    sharing_pb2.ReplicateImageRequest(name=shared.name, request_id=request_id),
                    metadata=md("beta"),
                )
                for request_id in request_ids
            )
        )
        assert acked <= {replica.name for replica in retried}
        for replica in retried:
            assert replica.status == ACTIVE, replica
            data, _ = await download(client, "beta", replica.name)
            assert data == content
        await fill_quota_exactly(client, "beta", quota)


# -- the provisioner as its own process -----------------------------------------------------


async def test_sigkill_of_the_provisioner_process_mid_deployment(
    tmp_path: Path, launched: list[ServerProcess]
) -> None:
    """`bms-image serve --provisioner none` and `bms-image provisioner`
    share a data directory; the provisioner is killed while it streams an
    image for two servers, the image service stays up. Restarted, the
    provisioner leaves none BUILDING (ERROR with a reason, or ACTIVE) and
    deploys anew."""
    data_dir = tmp_path / "data"
    logs = tmp_path / "logs"
    serve = tracked(launched, serve_process(data_dir, logs, provisioner="none", **FLEET_SETTINGS))
    provisioner = tracked(
        launched, provisioner_process(data_dir, logs, serve.address, **FLEET_SETTINGS)
    )
    await asyncio.gather(start(serve), start(provisioner))

    async with connect(serve.address, provisioner.address) as client:
        call = client.fleet.CreateServers(deploy_request(CENTOS, 2, "remote"), metadata=md("alpha"))
        followed = await follow_until(call, bytes_moving)
        assert followed.finished() == [], "a server finished before the kill"
        provisioner.kill()
        call.cancel()
    assert len(followed.servers) == 2, followed.events
    assert running(serve), serve.output()

    await start(provisioner)
    async with connect(serve.address, provisioner.address) as client:
        problems, _ = await audit(World(client, data_dir, ["alpha"]))
        for name in followed.servers:
            server = await client.server(name)
            assert server.state in (ERROR, SERVER_ACTIVE), server
            if server.state == ERROR:
                assert "interrupted" in server.state_reason, server.state_reason
        (fresh,) = await deploy(client, "alpha", deploy_request(CENTOS, 1, "fresh"))
        assert (await client.server(fresh)).state == SERVER_ACTIVE
        problems.check()
