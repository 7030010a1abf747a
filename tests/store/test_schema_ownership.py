"""Each process owns its data: the image service's tables and the fleet's are
declared apart (images/adapters/tables.py, fleet/adapters/tables.py), each
migrated by its own chain into its own version table, and neither process
imports the other's code. A database made before the split (by 5a27b31,
whose head was 0005, and by main before the split, head 0008) upgrades into
this layout with its rows kept, whichever process starts first. A
provisioner on a database of its own lists flavors with the public images
the image service publishes, over gRPC. SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from alembic.script import ScriptDirectory
from schema_support import schema_diff
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection

from bms.image.v1 import image_pb2, image_pb2_grpc, provisioning_pb2, provisioning_pb2_grpc
from bms_image.common.config import Settings
from bms_image.common.serving import RunningService
from bms_image.fleet.adapters.servers import SqlServerRepository
from bms_image.fleet.adapters.tables import Base as FleetBase
from bms_image.images.adapters.catalog import load_catalog
from bms_image.images.adapters.members import SqlMemberRepository
from bms_image.images.adapters.repository import SqlImageRepository
from bms_image.images.adapters.tables import Base as ImageBase
from bms_image.processes import start, start_provisioner
from bms_image.store.db import FLEET, IMAGES, Database, Schema, alembic_config
from support import chunk_store

REPOSITORY = Path(__file__).resolve().parents[2]
IMAGE_TABLES = {
    "projects",
    "images",
    "image_tags",
    "image_flavors",
    "flavors",
    "image_members",
    "deployment",
    "chunks",
    "manifests",
    "manifest_chunks",
}
FLEET_TABLES = {"servers"}
#: The state before the trust-boundaries work (image chain at 0005, servers
#: without their disk record) and main just before the split (head 0008).
LEGACY = {"5a27b31": "0005", "6c7b919": "0008"}
SECRET = "ownership-secret-" + "0" * 47
S4 = "physical.s4.large"


def _head(schema: Schema) -> str:
    head = ScriptDirectory.from_config(alembic_config(schema=schema)).get_current_head()
    assert head is not None
    return head


def _tables(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names())


def _versions(connection: Connection) -> dict[str, list[str]]:
    found = _tables(connection)
    return {
        schema.version_table: [
            str(version)
            for version in connection.execute(
                text(f"SELECT version_num FROM {schema.version_table}")
            ).scalars()
        ]
        for schema in (IMAGES, FLEET)
        if schema.version_table in found
    }


# --- who declares what ------------------------------------------------------------


def test_each_process_declares_only_its_own_tables() -> None:
    assert set(ImageBase.metadata.tables) == IMAGE_TABLES
    assert set(FleetBase.metadata.tables) == FLEET_TABLES
    assert ImageBase.metadata is not FleetBase.metadata
    # no foreign key crosses from one process's tables to the other's
    for metadata, own in ((ImageBase.metadata, IMAGE_TABLES), (FleetBase.metadata, FLEET_TABLES)):
        for table in metadata.tables.values():
            for key in table.foreign_keys:
                assert key.column.table.name in own, f"{table.name} -> {key.target_fullname}"


@pytest.mark.parametrize(
    ("entry", "other"),
    [
        ("bms_image.fleet.bootstrap", "bms_image.images"),
        ("bms_image.images.bootstrap", "bms_image.fleet"),
    ],
)
def test_a_process_loads_no_module_of_the_other(entry: str, other: str) -> None:
    """The standalone provisioner (fleet.bootstrap) runs without any module
    of the image service, and the image service without the fleet's."""
    script = (
        f"import sys, importlib; importlib.import_module({entry!r}); "
        f"print(' '.join(m for m in sys.modules if m.split('.')[:2] == {other.split('.')!r}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPOSITORY / "src")},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [], f"{entry} loaded {done.stdout.split()}"


# --- each migrates its own ----------------------------------------------------------


@pytest.mark.parametrize("first", ["images", "fleet"])
async def test_each_process_migrates_only_its_own_tables(database_url: str, first: str) -> None:
    db = Database(database_url)
    own = {
        "images": IMAGE_TABLES | {IMAGES.version_table},
        "fleet": FLEET_TABLES | {FLEET.version_table},
    }
    schemas = {"images": IMAGES, "fleet": FLEET}
    second = "fleet" if first == "images" else "images"
    try:
        await db.migrate(schemas[first])
        assert await db.run(_tables) == own[first]
        await db.migrate(schemas[second])
        assert await db.run(_tables) == own[first] | own[second]
        assert await db.run(_versions) == {
            IMAGES.version_table: [_head(IMAGES)],
            FLEET.version_table: [_head(FLEET)],
        }
        assert await db.run(schema_diff) == []
    finally:
        await db.close()


# --- upgrading a database made before the split --------------------------------------

_NOW = "now"
#: Rows a deployment of the old layout holds: a public image on a flavor, a
#: private one with a tag shared with beta, a server on a local disk and one
#: on EVS. Columns an old revision lacks are left out when inserted.
_IMAGE = {
    "description": "", "os_type": "linux", "os_distro": "centos", "os_version": "7.6",
    "architecture": "x86_64", "disk_format": "raw", "size_bytes": 4096, "min_disk_gb": 40,
    "sha256": "0" * 64, "uploaded_bytes": 4096, "status": "active", "status_reason": "",
    "plugins": [], "partitions": [], "source_server": "", "protected": False,
    "deprecated": False, "request_id": None, "request_method": "create", "revision": 3,
    "create_time": _NOW, "update_time": _NOW,
}  # fmt: skip
_SERVER = {
    "project": "alpha", "flavor": S4, "hardware_model": "s4-2288h-v5", "state": "active",
    "state_reason": "", "network_state": "up", "system_disk_bytes": 4096,
    "ssh_key_fingerprint": "", "plugins": [], "data_disks_gb": [], "task": "",
    "last_operation": "deploy", "revision": 2, "create_time": _NOW, "update_time": _NOW,
}  # fmt: skip

_MAKE_OLD_DATABASE = textwrap.dedent(
    """
    import asyncio, json, sys
    from datetime import UTC, datetime
    from sqlalchemy import MetaData, insert
    from bms_image.store.db import Database

    url, rows = sys.argv[1], json.loads(sys.argv[2])

    def fill(connection):
        tables = MetaData()
        tables.reflect(connection)
        for name, entries in rows.items():
            if name not in tables.tables:
                continue
            table = tables.tables[name]
            values = [
                {k: (datetime.now(UTC) if v == "now" else v)
                 for k, v in entry.items() if k in table.c}
                for entry in entries
            ]
            connection.execute(insert(table), values)
        return sorted(tables.tables)

    async def main():
        database = Database(url)
        await database.migrate()
        print(json.dumps(await database.run(fill, write=True)))
        await database.close()

    asyncio.run(main())
    """
)


def _old_rows(ids: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    return {
        "flavors": [
            {
                "name": S4,
                "hardware_model": "s4-2288h-v5",
                "cpu_cores": 36,
                "cpu_model": "Xeon",
                "memory_gib": 192,
                "local_disks": "2 x 800 GB",
                "local_disk_gb": 800,
                "evs_boot": True,
                "description": "",
            },
        ],
        "projects": [{"id": "alpha", "create_time": _NOW}],
        "images": [
            {
                **_IMAGE,
                "id": ids["public"],
                "display_name": "CentOS",
                "visibility": "public",
                "owner_project": None,
                "creator_project": "",
                "hardware_model": "",
            },
            {
                **_IMAGE,
                "id": ids["private"],
                "display_name": "golden",
                "visibility": "private",
                "owner_project": "alpha",
                "creator_project": "alpha",
                "hardware_model": "s4-2288h-v5",
                "request_id": ids["request"],
            },
        ],
        "image_tags": [{"image_id": ids["private"], "tag": "web", "position": 0}],
        "image_flavors": [{"image_id": ids["public"], "flavor": S4}],
        "image_members": [
            {
                "image_id": ids["private"],
                "project": "beta",
                "status": "accepted",
                "create_time": _NOW,
                "update_time": _NOW,
            },
        ],
        "servers": [
            {
                **_SERVER,
                "id": ids["local"],
                "host_name": "web-1",
                "image_id": ids["public"],
                "boot_source": "local_disk",
                "disk_kind": "local",
                "disk_top": "system.disk",
            },
            {
                **_SERVER,
                "id": ids["evs"],
                "host_name": "web-2",
                "image_id": ids["public"],
                "boot_source": "evs",
                "disk_kind": "",
                "disk_top": "",
            },
        ],
        "deployment": [{"id": ids["deployment"], "create_time": _NOW}],
    }


_OLD_STORE = ("src/bms_image/__init__.py", "src/bms_image/store")


def _make_old_database(commit: str, url: str, rows: dict[str, Any], scratch: Path) -> list[str]:
    """The database `commit`'s own code migrates, with `rows` added: its
    store, taken from git, run in a process of its own. Returns its tables."""
    if shutil.which("git") is None:
        pytest.skip("needs git, to take the store of an earlier commit")
    source = scratch / f"src-{commit}"
    source.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(REPOSITORY), "archive", commit, *_OLD_STORE],
        capture_output=True,
        timeout=60,
    )
    if archive.returncode != 0:
        pytest.skip(f"commit {commit} is not in this clone: {archive.stderr.decode()[:200]}")
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive.stdout, check=True, timeout=60)
    made = subprocess.run(
        [sys.executable, "-c", _MAKE_OLD_DATABASE, url, json.dumps(rows)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(source / "src")},
    )
    assert made.returncode == 0, made.stderr
    return list(json.loads(made.stdout.splitlines()[-1]))


@pytest.mark.parametrize("first", ["images", "fleet"])
@pytest.mark.parametrize("commit", sorted(LEGACY))
async def test_a_database_made_before_the_split_upgrades_with_its_rows(
    database_url: str, tmp_path: Path, commit: str, first: str
) -> None:
    """Either process may start first on the shared database (the fleet's
    chain adopts `servers` while the image chain is still at the old
    revision, or after); the embedded mode runs both."""
    names = ("public", "private", "request", "local", "evs", "deployment")
    ids = {name: str(uuid.uuid4()) for name in names}
    old_tables = _make_old_database(commit, database_url, _old_rows(ids), tmp_path)
    assert "servers" in old_tables and "alembic_version" in old_tables
    assert FLEET.version_table not in old_tables
    had_deployment = "deployment" in old_tables

    db = Database(database_url)
    try:
        before = await db.run(_versions)
        assert before == {IMAGES.version_table: [LEGACY[commit]]}
        order = [IMAGES, FLEET] if first == "images" else [FLEET, IMAGES]
        for schema in order:
            await db.migrate(schema)
        assert await db.run(_versions) == {
            IMAGES.version_table: [_head(IMAGES)],
            FLEET.version_table: [_head(FLEET)],
        }
        assert await db.run(schema_diff) == []

        images = SqlImageRepository(db)
        public = await images.get(ids["public"])
        private = await images.get(ids["private"])
        assert public is not None and public.supported_flavors == [S4]
        assert private is not None and private.owner_project == "alpha"
        assert private.tags == ["web"] and private.request_method.value == "create"
        member = await SqlMemberRepository(db).get(ids["private"], "beta")
        assert member is not None and member.status.value == "accepted"

        servers = SqlServerRepository(db)
        local, evs = await servers.get(ids["local"]), await servers.get(ids["evs"])
        assert local is not None and local.host_name == "web-1" and local.state.value == "active"
        assert evs is not None and evs.host_name == "web-2"
        records = text("SELECT id, disk_kind || '/' || disk_top FROM servers")
        disks = await db.run(lambda c: dict(c.execute(records).all()))
        # the disk record: a local disk's is known (written, or set by the
        # fleet's migration); an EVS clone made before it has none
        assert disks == {ids["local"]: "local/system.disk", ids["evs"]: "/"}
        deployment = await db.run(
            lambda c: c.execute(text("SELECT id FROM deployment")).scalars().all()
        )
        assert deployment == ([ids["deployment"]] if had_deployment else [])

        # and a second start migrates nothing and loses nothing
        await db.migrate()
        assert await db.run(_versions) == {
            IMAGES.version_table: [_head(IMAGES)],
            FLEET.version_table: [_head(FLEET)],
        }
        assert await servers.get(ids["evs"]) is not None
    finally:
        await db.close()


# --- ListFlavors asks the image service ----------------------------------------------


def _settings(data_dir: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "listen": "127.0.0.1:0",
        "data_dir": data_dir,
        "token_secret": SECRET,
        "shutdown_grace_seconds": 1.0,
        "catalog_image_mib": 1,
    }
    return Settings(**{**values, **overrides})  # type: ignore[arg-type]


@pytest.fixture
async def apart(tmp_path: Path) -> AsyncIterator[tuple[RunningService, RunningService, str]]:
    """The image service and a provisioner, each on a database of its own."""
    images = await start(
        _settings(
            tmp_path / "images",
            provisioner="none",
            database_url=f"sqlite:///{tmp_path / 'images.db'}",
        )
    )
    fleet_url = f"sqlite:///{tmp_path / 'fleet.db'}"
    try:
        fleet = await start_provisioner(
            _settings(tmp_path / "fleet", database_url=fleet_url, image_service=images.address)
        )
    except BaseException:
        await images.stop(0)
        raise
    yield images, fleet, fleet_url
    await fleet.stop(0)
    await images.stop(0)


async def test_a_provisioner_on_its_own_database_lists_the_image_services_public_images(
    apart: tuple[RunningService, RunningService, str],
) -> None:
    images, fleet, fleet_url = apart
    alpha = (("authorization", f"Bearer {images.authority.issue('alpha')}"),)
    admin = (("authorization", f"Bearer {images.authority.issue('ops', admin=True)}"),)
    catalog = load_catalog()
    expected = {
        f"flavors/{flavor['name']}": {
            f"images/{image.id}"
            for image in catalog.images
            if flavor["name"] in image.supported_flavors
        }
        for flavor in catalog.flavors
    }
    async with (
        grpc.aio.insecure_channel(images.address) as image_channel,
        grpc.aio.insecure_channel(fleet.address) as fleet_channel,
    ):
        image_stub = image_pb2_grpc.ImageServiceStub(image_channel)
        provisioning = provisioning_pb2_grpc.ProvisioningServiceStub(fleet_channel)

        listed = await provisioning.ListFlavors(
            provisioning_pb2.ListFlavorsRequest(), metadata=alpha
        )
        assert {f.name: set(f.public_images) for f in listed.flavors} == expected
        assert all(len(set(f.public_images)) == len(f.public_images) for f in listed.flavors)

        # what the image service changes shows at once: a deprecated image is
        # still offered (as before), a deleted one no longer
        offered = sorted(expected[f"flavors/{S4}"])
        deprecated, deleted = offered[0], offered[1]
        await image_stub.DeprecateImage(
            image_pb2.DeprecateImageRequest(name=deprecated), metadata=admin
        )
        await image_stub.DeleteImage(image_pb2.DeleteImageRequest(name=deleted), metadata=admin)
        got = await provisioning.GetFlavor(
            provisioning_pb2.GetFlavorRequest(name=f"flavors/{S4}"), metadata=alpha
        )
        assert set(got.public_images) == expected[f"flavors/{S4}"] - {deleted}
        assert deprecated in got.public_images

    # the provisioner's database holds the fleet's tables only
    fleet_db = Database(fleet_url)
    try:
        assert await fleet_db.run(_tables) == FLEET_TABLES | {FLEET.version_table}
    finally:
        await fleet_db.close()


# --- image bytes stored whole before the chunk store ---------------------------------

_OLD_BLOBS = ("src/bms_image/__init__.py", "src/bms_image/blobs")
_PUT_OLD_BLOB = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from bms_image.blobs.local import LocalBlobStore

    root, key, source = sys.argv[1:4]
    asyncio.run(LocalBlobStore(Path(root)).put_file(key, Path(source)))
    """
)


def _put_old_blob(commit: str, root: Path, key: str, source: Path, scratch: Path) -> None:
    """Stores `source` as `commit`'s own blob store did: one whole file."""
    tree = scratch / f"blobs-{commit}"
    tree.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(REPOSITORY), "archive", commit, *_OLD_BLOBS],
        capture_output=True,
        timeout=60,
    )
    if archive.returncode != 0:
        pytest.skip(f"commit {commit} is not in this clone: {archive.stderr.decode()[:200]}")
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True, timeout=60)
    put = subprocess.run(
        [sys.executable, "-c", _PUT_OLD_BLOB, str(root), key, str(source)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(tree / "src")},
    )
    assert put.returncode == 0, put.stderr


async def _download(service: RunningService, project: str, image_id: str) -> bytes:
    metadata = (("authorization", f"Bearer {service.authority.issue(project)}"),)
    async with grpc.aio.insecure_channel(service.address) as channel:
        stub = image_pb2_grpc.ImageServiceStub(channel)
        request = image_pb2.DownloadImageDataRequest(name=f"images/{image_id}")
        return b"".join([r.chunk async for r in stub.DownloadImageData(request, metadata=metadata)])


async def test_an_image_stored_whole_by_5a27b31_is_read_then_converted(tmp_path: Path) -> None:
    """A data directory and database made by 5a27b31 (an active image's
    bytes in one whole blob): the new service serves the bytes at once, and
    its background conversion turns the blob into a manifest of chunks, after
    which the whole blob is gone and the bytes are the same."""
    commit = "5a27b31"
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    url = f"sqlite:///{data_dir / 'bms-image.db'}"
    names = ("public", "private", "request", "local", "evs", "deployment")
    ids = {name: str(uuid.uuid4()) for name in names}
    data = os.urandom(3 * 1024 * 1024) + bytes(1024 * 1024) + os.urandom(100)
    rows = _old_rows(ids)
    for image in rows["images"]:
        if image["id"] == ids["private"]:
            digest = hashlib.sha256(data).hexdigest()
            image.update(size_bytes=len(data), uploaded_bytes=len(data), sha256=digest)
    _make_old_database(commit, url, rows, tmp_path)
    source = tmp_path / "golden.raw"
    source.write_bytes(data)
    _put_old_blob(commit, data_dir / "blobs", ids["private"], source, tmp_path)
    whole = chunk_store.whole_blob(data_dir, ids["private"])
    assert whole.exists()

    service = await start(_settings(data_dir, database_url=url))
    try:
        assert await _download(service, "alpha", ids["private"]) == data
        for _ in range(200):
            if not whole.exists():
                break
            await asyncio.sleep(0.05)
        assert not whole.exists(), "the whole blob was converted and removed"
        assert chunk_store.stored(data_dir, ids["private"])
        assert len(chunk_store.chunk_files(data_dir, ids["private"])) == 4, "zeros not stored"
        assert await _download(service, "alpha", ids["private"]) == data
    finally:
        await service.stop(0)
