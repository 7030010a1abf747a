"""disks.py reads disks whose bytes may be a tenant's: every read is
bounded (partitions, tar members, tar header blocks, bytes of a file), a
damaged disk is NotASystemDisk (IMAGE_NOT_BOOTABLE when deployed), member
names never reach a host path, and layers are what the caller says, never
what the bytes say."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import uuid
from pathlib import Path

import pytest

from bms_image.common import disk_format as disks
from bms_image.common.model import Plugin, PluginKind
from bms_image.fleet.adapters.firstboot import plugin_states

CLOUD_INIT = Plugin(PluginKind.CLOUD_INIT, "0.7.9")


def tar_of(members: dict[str, bytes], pax: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.pax_headers = dict(pax or {})
            archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def raw_disk(
    path: Path, partitions: list[bytes], table: list[dict[str, object]] | None = None
) -> Path:
    """A disk of these tar partitions; `table` replaces its partition table."""
    body, entries, offset = b"", [], disks.HEADER_BYTES
    for partition in partitions:
        padded = partition.ljust(-(-len(partition) // disks.ALIGN) * disks.ALIGN, b"\0")
        entries.append({"name": "root", "mount": "/", "offset": offset, "size": len(partition)})
        body += padded
        offset += len(padded)
    header = disks.MAGIC + json.dumps({"version": 1, "partitions": table or entries}).encode()
    path.write_bytes(header.ljust(disks.HEADER_BYTES, b"\0") + body)
    return path


def spec(files: dict[str, bytes] | None = None) -> disks.DiskSpec:
    return disks.DiskSpec({"ID": "centos"}, (CLOUD_INIT,), 4096, "bounds", files)


def test_a_partition_with_too_many_files_is_no_system_disk(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(disks, "MAX_MEMBERS", 50)
    fits = tmp_path / "fits.disk"
    disks.write_disk(fits, spec({f"srv/{n}": b"x" for n in range(40)}))
    assert len(disks.list_files(fits)) == 40 + 3
    crowded = tmp_path / "crowded.disk"
    disks.write_disk(crowded, spec({f"srv/{n}": b"x" for n in range(60)}))
    for read in (disks.list_files, disks.os_release, plugin_states):
        with pytest.raises(disks.NotASystemDisk, match="more than 50 files"):
            read(crowded)


def test_the_member_bound_counts_every_partition_of_a_disk(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(disks, "MAX_MEMBERS", 50)
    path = tmp_path / "layered.disk"
    disks.write_disk(path, spec({f"a/{n}": b"x" for n in range(30)}))
    disks.append_partition(path, "more", "/", {f"b/{n}": b"y" for n in range(30)})
    with pytest.raises(disks.NotASystemDisk):
        disks.list_files(path)


def test_the_default_bounds() -> None:
    assert disks.MAX_MEMBERS == 100_000
    assert disks.MAX_READ_BYTES == 1024 * 1024
    assert disks.HEADER_BYTES == 4096
    assert disks.MAX_PARTITIONS == 64


def test_a_partition_table_past_its_bounds_is_no_system_disk(tmp_path, monkeypatch) -> None:
    tar = tar_of({"etc/os-release": b'ID="centos"\n'})
    good = raw_disk(tmp_path / "good.disk", [tar])
    assert disks.os_release(good) == {"ID": "centos"}
    outside = {"name": "root", "mount": "/", "offset": 4096, "size": 10**12}
    before = {"name": "root", "mount": "/", "offset": 0, "size": 512}
    as_text = {"name": "root", "mount": "/", "offset": "4096", "size": len(tar)}
    for table in ([outside], [before], [as_text], [{"name": 1}], ["root"]):
        path = raw_disk(tmp_path / f"{uuid.uuid4().hex}.disk", [tar], table)  # type: ignore[list-item]
        with pytest.raises(disks.NotASystemDisk):
            disks.list_files(path)
    deep = tmp_path / "deep.disk"
    deep.write_bytes((disks.MAGIC + b"[" * 3000).ljust(disks.HEADER_BYTES, b"\0") + tar)
    with pytest.raises(disks.NotASystemDisk):
        disks.partition_layout(deep)

    monkeypatch.setattr(disks, "MAX_PARTITIONS", 2)
    many = raw_disk(tmp_path / "many.disk", [tar, tar, tar])
    with pytest.raises(disks.NotASystemDisk, match="more than 2 partitions"):
        disks.partition_layout(many)
    two = raw_disk(tmp_path / "two.disk", [tar, tar])
    size = two.stat().st_size
    with pytest.raises(disks.NotASystemDisk, match="full"):
        disks.append_partition(two, "cloud-init", "/", {"etc/hostname": b"h\n"})
    assert two.stat().st_size == size, "a refused partition left bytes behind"


def test_tar_headers_and_members_are_read_within_their_bounds(tmp_path) -> None:
    huge_pax = tar_of({"etc/os-release": b"ID=x\n"}, {"comment": "x" * 200_000})
    with pytest.raises(disks.NotASystemDisk, match="tar header"):
        disks.list_files(raw_disk(tmp_path / "pax.disk", [huge_pax]))
    # a member that runs past the end of its partition
    tar = tar_of({"var/lib/bulk": b"z" * 8192})
    table = [{"name": "root", "mount": "/", "offset": 4096, "size": 1024}]
    with pytest.raises(disks.NotASystemDisk):
        disks.read_file(raw_disk(tmp_path / "short.disk", [tar], table), "var/lib/bulk")
    junk = raw_disk(tmp_path / "junk.disk", [b"not a tar archive at all".ljust(2048, b"?")])
    with pytest.raises(disks.NotASystemDisk):
        disks.list_files(junk)


def test_read_file_reads_a_bounded_number_of_bytes(tmp_path) -> None:
    big = b"#!bms-plugin cloud_init 0.7.9\n" + b"\0" * (3 * 1024 * 1024)
    path = tmp_path / "big.disk"
    disks.write_disk(path, spec())
    disks.append_partition(path, "user", "/", {"usr/bin/cloud-init": big, "small": b"abc"})
    assert len(disks.read_file(path, "usr/bin/cloud-init") or b"") == disks.MAX_READ_BYTES + 1
    assert disks.read_file(path, "usr/bin/cloud-init", limit=10) == big[:11]
    assert disks.read_file(path, "small", limit=10) == b"abc"
    # a plug-in file larger than the bound is modified, whatever it starts with
    assert plugin_states(path)[PluginKind.CLOUD_INIT][0] == "modified"


def test_member_names_never_reach_a_host_path(tmp_path) -> None:
    escape = tmp_path / f"escaped-{uuid.uuid4().hex}"
    names = {f"../../../../..{escape}": b"out", str(escape): b"abs", "etc/os-release": b"ID=a\n"}
    path = raw_disk(tmp_path / "names.disk", [tar_of(names)])
    listed = disks.list_files(path)
    assert set(listed) >= {"etc/os-release"}
    for name in listed:
        disks.read_file(path, name)
    disks.flatten(path, tmp_path / "flat.disk")
    assert not escape.exists()


def test_layers_are_what_the_caller_names_never_what_the_bytes_say(tmp_path) -> None:
    """The format of EVS clone records of old is just bytes now."""
    base = tmp_path / "base.disk"
    disks.write_disk(base, spec())
    base_sha = hashlib.sha256(base.read_bytes()).hexdigest()
    record = tmp_path / "record.disk"
    record.write_bytes(
        b"BMSEVS1\n" + json.dumps({"base": str(base), "overlay": str(base)}).encode()
    )
    for read in (disks.list_files, disks.os_release, plugin_states):
        with pytest.raises(disks.NotASystemDisk):
            read(record)
    with pytest.raises(disks.NotASystemDisk):
        disks.append_partition(record, "cloud-init", "/", {"etc/hostname": b"evil\n"})

    overlay = tmp_path / "overlay.disk"
    disks.new_overlay(overlay)
    clone = disks.Layers(overlay, base)
    disks.append_partition(clone.top, "cloud-init", "/", {"etc/hostname": b"mine\n"})
    assert disks.read_file(clone, "etc/hostname") == b"mine\n"
    assert disks.read_file(base, "etc/hostname") is None
    assert hashlib.sha256(base.read_bytes()).hexdigest() == base_sha, "the base was written"
    flat = tmp_path / "flat.disk"
    disks.flatten(clone, flat)
    assert disks.read_file(flat, "etc/hostname") == b"mine\n"
    assert disks.os_release(flat) == {"ID": "centos"}
    assert [p[0] for p in disks.partition_layout(flat)] == ["root", "cloud-init"]
