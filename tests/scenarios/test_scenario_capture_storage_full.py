"""A capture that runs out of space (a real, tiny tmpfs under the image
service's chunk store, where captures are staged as they arrive: ENOSPC)
ends KILLED with a reason that says the storage is full and names no host
path; its staged chunks are removed and no descriptor stays open on them;
the server is released; and once there is room again the same server is
captured."""

from __future__ import annotations

import os
from pathlib import Path

from scenario_support import capture as capture_active
from scenario_support import capture_request, cloud, poll, stopped_server, wait_released

from bms.image.v1 import image_pb2
from support import chunk_store
from support.disks import remount, system_disk, tmpfs

MIB = 1024 * 1024


def held_files() -> list[str]:
    """What this process's descriptors point at."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue  # closed meanwhile (the listing's own descriptor)
    return found


async def test_a_capture_into_a_full_image_store_is_killed_with_a_reason(
    tmp_path: Path,
) -> None:
    async with cloud(tmp_path) as c:
        md = c.md("alpha")
        server = await stopped_server(c, md, "full")
        disk_bytes = system_disk(c.data_dir, server.name).top.stat().st_size
        store = chunk_store.chunks_root(c.data_dir)
        with tmpfs(store, MIB):  # (it hides the catalog's chunks, which the capture needs not)
            assert disk_bytes > MIB, "the disk must not fit in the store"
            created = await c.images.CreateImage(
                capture_request(server.name, "too-big"), metadata=md
            )
            image = await poll(
                lambda: c.images.GetImage(
                    image_pb2.GetImageRequest(name=created.name), metadata=md
                ),
                lambda image: image.status == image_pb2.IMAGE_STATUS_KILLED,
                60.0,
            )
            assert image.status == image_pb2.IMAGE_STATUS_KILLED, image
            assert "full" in image.status_reason, image.status_reason
            assert str(tmp_path) not in image.status_reason
            assert "Errno" not in image.status_reason
            await wait_released(c, md, server.name, within=30)
            assert [p for p in store.rglob("*") if p.is_file()] == [], "its bytes stayed"
            assert chunk_store.staged(c.data_dir, created.name) is None
            assert not [target for target in held_files() if target.startswith(str(store))]

            remount(store, disk_bytes + 64 * MIB)  # room again
            backup = await capture_active(c, md, server.name, "fits-now")
            assert backup.size_bytes == disk_bytes
