"""What makes up a system disk is the fleet's own record in its database
(servers.disk_*), never a disk's bytes: reinstall swaps a new disk in and
a failed one discards only the new disk, recovery and another process read
the record, delete removes the server's files and never the cached image.
The image cache is content-addressed, read-only, and an entry that is not
provably untouched is hashed again before it is used."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path

import provisioning_support as prov
import pytest
from provisioning_support import CENTOS, S4

from bms.image.v1 import image_pb2, provisioning_pb2
from bms_image.fleet.adapters import firstboot
from support.builders import new_ssh_key
from support.fleet_events import ACTIVE, ERROR, EVS, FAILED, LOCAL, STAGE_ACTIVE, Events
from support.services import make_settings, serving

pb = provisioning_pb2


async def reinstall(provisioning, md, request: pb.ReinstallServerRequest) -> Events:  # type: ignore[no-untyped-def]
    return Events(await prov.collect(provisioning.ReinstallServer(request, metadata=md)))


async def stopped_server(provisioning, md, boot_source: int, prefix: str = "rec") -> str:  # type: ignore[no-untyped-def]
    deployment = await prov.deploy(
        provisioning, md, prov.create_request(CENTOS, S4, 1, prefix, boot_source=boot_source)
    )
    (name,) = deployment.servers
    assert deployment.final(name).stage == STAGE_ACTIVE, deployment.final(name)
    await provisioning.StopServer(pb.StopServerRequest(name=name), metadata=md)
    return name


async def settled(images, md, name: str) -> image_pb2.Image:  # type: ignore[no-untyped-def]
    """The image once it is neither QUEUED nor SAVING (a capture ended)."""

    async def wait() -> image_pb2.Image:
        while True:
            image = await images.GetImage(image_pb2.GetImageRequest(name=name), metadata=md)
            if image.status not in (image_pb2.IMAGE_STATUS_QUEUED, image_pb2.IMAGE_STATUS_SAVING):
                return image
            await asyncio.sleep(0.05)

    return await asyncio.wait_for(wait(), 60)  # a hang guard only


def read_at(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(size)


@pytest.fixture
async def centos(images, as_project) -> image_pb2.Image:  # type: ignore[no-untyped-def]
    """The public CentOS image, as project alpha reads it."""
    return await prov.get_image(images, as_project("alpha"), CENTOS)


def files_of(settings, name: str) -> set[str]:  # type: ignore[no-untyped-def]
    return {p.name for p in prov.server_dir(settings, name).iterdir()}


async def test_evs_reinstall_swaps_in_a_new_overlay_and_never_writes_the_base(
    provisioning, as_project, settings, centos
) -> None:
    md = as_project("alpha")
    name = await stopped_server(provisioning, md, EVS)
    before = prov.system_disk(settings, name)
    entry = prov.cache_file(settings, centos.sha256)
    assert before.base == entry
    assert files_of(settings, name) == {before.top.name}
    untouched = entry.stat()

    key = new_ssh_key()
    done = await reinstall(
        provisioning, md, pb.ReinstallServerRequest(name=name, ssh_public_key=key.line)
    )
    assert done.final(name).stage == STAGE_ACTIVE, done.final(name)
    after = prov.system_disk(settings, name)
    assert after.base == entry and after.top != before.top
    assert files_of(settings, name) == {after.top.name}, "the old overlay was not removed"
    assert (
        prov.read_disk_file(settings, name, "root/.ssh/authorized_keys")
        == key.line.encode() + b"\n"
    )
    assert prov.read_disk_file(settings, name, "etc/hostname") == b"rec-1\n"
    now = entry.stat()
    assert (now.st_ino, now.st_mtime_ns, now.st_ctime_ns) == (
        untouched.st_ino,
        untouched.st_mtime_ns,
        untouched.st_ctime_ns,
    ), "the base was written"
    assert (now.st_mode & 0o777, now.st_nlink) == (0o444, 1)
    assert prov.sha256_file(entry) == centos.sha256


@pytest.mark.parametrize("boot_source", [LOCAL, EVS])
async def test_a_failed_reinstall_discards_only_the_new_disk(
    provisioning, as_project, settings, monkeypatch, boot_source
) -> None:
    md = as_project("alpha")
    name = await stopped_server(provisioning, md, boot_source)
    before = prov.system_disk(settings, name)
    kept = prov.sha256_file(before.top)

    def broken(*args: object) -> dict[str, bytes]:
        raise RuntimeError("first boot broke")

    monkeypatch.setattr(firstboot, "first_boot_files", broken)
    done = await reinstall(
        provisioning, md, pb.ReinstallServerRequest(name=name, ssh_public_key=new_ssh_key().line)
    )
    final = done.final(name)
    assert (final.stage, final.state, final.error_reason) == (FAILED, ERROR, "DEPLOYMENT_FAILED")
    assert prov.system_disk(settings, name) == before, "the record changed"
    assert files_of(settings, name) == {before.top.name}, "the new disk was left"
    assert prov.sha256_file(before.top) == kept, "the disk in use was written"
    assert prov.read_disk_file(settings, name, "root/.ssh/authorized_keys") is None

    monkeypatch.undo()  # the server can be reinstalled again, from its record
    done = await reinstall(provisioning, md, pb.ReinstallServerRequest(name=name))
    assert done.final(name).stage == STAGE_ACTIVE, done.final(name)
    assert files_of(settings, name) == {prov.system_disk(settings, name).top.name}


async def test_recovery_and_a_new_process_read_the_record(tmp_path: Path) -> None:
    """A reinstall cut off by a crash (its new disks left in the server's
    directory): the next process finds the disk in use from the database,
    keeps it, discards the rest, and can still capture the server."""
    settings = make_settings(tmp_path)
    async with serving(settings) as running:
        md = running.project("alpha")
        name = await stopped_server(running.provisioning, md, EVS)
    recorded = prov.system_disk(settings, name)
    directory = prov.server_dir(settings, name)
    for stray in ("system.disk.new", "overlay-" + "0" * 32 + ".disk", "system.disk"):
        (directory / stray).write_bytes(b"half-written")
    with sqlite3.connect(tmp_path / "bms-image.db") as connection:
        connection.execute(
            "UPDATE servers SET state = 'rebuilding', task = 'reinstall', "
            "last_operation = 'reinstall' WHERE id = ?",
            (name.removeprefix("servers/"),),
        )

    async with serving(settings) as running:
        md = running.project("alpha")
        server = await prov.get_server(running.provisioning, md, name)
        assert server.state == ERROR and "interrupted" in server.state_reason, server
        assert prov.system_disk(settings, name) == recorded
        assert files_of(settings, name) == {recorded.top.name}
        assert prov.read_disk_file(settings, name, "etc/hostname") == b"rec-1\n"
        done = await reinstall(running.provisioning, md, pb.ReinstallServerRequest(name=name))
        assert done.final(name).stage == STAGE_ACTIVE, done.final(name)
        await running.provisioning.StopServer(pb.StopServerRequest(name=name), metadata=md)
        created = await running.images.CreateImage(
            image_pb2.CreateImageRequest(
                image=image_pb2.Image(display_name="after-restart"), source_server=name
            ),
            metadata=md,
        )
        captured = await settled(running.images, md, created.name)
        assert captured.status == image_pb2.IMAGE_STATUS_ACTIVE, captured


async def test_delete_removes_the_servers_files_never_the_cached_image(
    provisioning, as_project, settings, centos
) -> None:
    md = as_project("alpha")
    name = await stopped_server(provisioning, md, EVS)
    entry = prov.system_disk(settings, name).base
    assert entry is not None
    await provisioning.DeleteServer(pb.DeleteServerRequest(name=name), metadata=md)
    assert not prov.server_dir(settings, name).exists()
    assert prov.sha256_file(entry) == centos.sha256
    again = await prov.deploy(
        provisioning, md, prov.create_request(CENTOS, S4, 1, "next", boot_source=EVS)
    )
    assert all(again.final(s).stage == STAGE_ACTIVE for s in again.servers)


async def test_a_tampered_cache_entry_is_hashed_again_and_fetched_afresh(
    provisioning, as_project, settings, monkeypatch, centos
) -> None:
    """Bytes changed in place, even with the modification time put back:
    the entry's fingerprint (its ctime) no longer matches, so it is hashed
    before use, found wrong and replaced by a fresh download; no server gets
    the changed bytes."""
    downloads = prov.count_downloads(monkeypatch)
    md = as_project("alpha")
    first = await prov.deploy(
        provisioning, md, prov.create_request(CENTOS, S4, 1, "one", boot_source=LOCAL)
    )
    assert all(first.final(s).stage == STAGE_ACTIVE for s in first.servers)
    entry = prov.cache_file(settings, centos.sha256)
    assert entry.stat().st_mode & 0o777 == 0o444
    assert len(downloads) == 1

    offset = centos.size_bytes // 2
    original = read_at(entry, offset, 16)
    status = entry.stat()
    prov.corrupt(entry, offset, b"\xee" * 16)  # root writes through 0o444
    os.utime(entry, ns=(status.st_atime_ns, status.st_mtime_ns))

    for boot_source, prefix in ((LOCAL, "two"), (EVS, "three")):
        again = await prov.deploy(
            provisioning, md, prov.create_request(CENTOS, S4, 1, prefix, boot_source=boot_source)
        )
        (name,) = again.servers
        assert again.final(name).stage == STAGE_ACTIVE, again.final(name)
        disk = prov.system_disk(settings, name)
        got = read_at(disk.base or disk.top, offset, 16)
        assert got == original, "a server got the tampered bytes"
    assert len(downloads) == 2, "fetched again once, then reused"
    assert prov.sha256_file(entry) == centos.sha256
    assert entry.stat().st_mode & 0o777 == 0o444


async def test_an_unknown_cache_entry_is_verified_before_its_first_use(
    tmp_path: Path, monkeypatch
) -> None:
    """After a restart this process has no fingerprint of the entries: a
    right one is hashed and reused, a wrong one (here, changed while the
    service was down) is fetched again."""
    downloads = prov.count_downloads(monkeypatch)
    settings = make_settings(tmp_path)
    async with serving(settings) as running:
        md = running.project("alpha")
        centos = await prov.get_image(running.images, md, CENTOS)
        await prov.deploy(
            running.provisioning, md, prov.create_request(CENTOS, S4, 1, "a", boot_source=LOCAL)
        )
    entry = prov.cache_file(settings, centos.sha256)
    assert len(downloads) == 1

    async with serving(settings) as running:  # right: hashed, reused
        md = running.project("alpha")
        done = await prov.deploy(
            running.provisioning, md, prov.create_request(CENTOS, S4, 1, "b", boot_source=EVS)
        )
        assert all(done.final(s).stage == STAGE_ACTIVE for s in done.servers)
    assert len(downloads) == 1

    entry.chmod(0o644)
    entry.write_bytes(os.urandom(centos.size_bytes))
    async with serving(settings) as running:  # wrong: fetched again
        md = running.project("alpha")
        done = await prov.deploy(
            running.provisioning, md, prov.create_request(CENTOS, S4, 1, "c", boot_source=LOCAL)
        )
        (name,) = done.servers
        assert done.final(name).stage == STAGE_ACTIVE, done.final(name)
        server = await prov.get_server(running.provisioning, md, name)
        assert server.state == ACTIVE
    assert len(downloads) == 2
    assert prov.sha256_file(entry) == centos.sha256
    assert entry.stat().st_mode & 0o777 == 0o444
