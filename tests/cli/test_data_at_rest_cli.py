"""Data at rest (issue 14, item 8), with real `bms-image` processes: the data
directory is 0700 and what the service writes under it is its user's alone
(image bytes, staging, fleet disks of both boot sources and the image cache,
SQLite files, the token secret); a token secret others may read is refused at start
with the command that fixes it; the secret is made once, whole, even by
processes starting together."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from bms.image.v1 import image_pb2, image_pb2_grpc, provisioning_pb2, provisioning_pb2_grpc
from bms_image.common.config import SECRET_FILE, InsecureSecretFile, Settings
from bms_image.images.adapters.catalog import public_image_id
from support.builders import private_image
from support.processes import BMS_IMAGE, ServerProcess, clean_environ
from support.tokens import bearer

pytestmark = pytest.mark.e2e

CENTOS = f"images/{public_image_id('centos-7.6-x86_64')}"
pb = provisioning_pb2


def _upload(channel: grpc.Channel, md: tuple[tuple[str, str], ...]) -> None:
    images = image_pb2_grpc.ImageServiceStub(channel)
    created = images.CreateImage(
        image_pb2.CreateImageRequest(image=private_image("at-rest")),
        metadata=md,
        timeout=30,
    )
    data = bytes(range(256)) * 1024
    messages = [
        image_pb2.UploadImageDataRequest(
            metadata=image_pb2.UploadImageDataMetadata(
                name=created.name, size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest()
            )
        ),
        image_pb2.UploadImageDataRequest(chunk=data),
    ]
    uploaded = images.UploadImageData(iter(messages), metadata=md, timeout=60)
    assert uploaded.status == image_pb2.IMAGE_STATUS_ACTIVE


def _deploy(channel: grpc.Channel, md: tuple[tuple[str, str], ...], boot_source: int) -> None:
    fleet = provisioning_pb2_grpc.ProvisioningServiceStub(channel)
    request = pb.CreateServersRequest(
        flavor="flavors/physical.s4.large",
        image=CENTOS,
        count=1,
        name_prefix="rest",
        boot_source=boot_source,  # type: ignore[arg-type]
        user_data="#cloud-config\nwrite_files:\n- path: /etc/motd\n  content: hello\n",
    )
    events = list(fleet.CreateServers(request, metadata=md, timeout=120))
    assert events and events[-1].stage == pb.PROVISIONING_STAGE_ACTIVE, events[-1:]


def _not_private(root: Path, skip: set[str]) -> list[str]:
    """Paths under root that another user could reach: directories other
    than 0700-or-stricter, files with group or other bits (the image cache's
    read-only files excepted: 0444 under a 0700 directory)."""
    found = []
    for directory, directories, files in os.walk(root):
        for name in directories:
            path = Path(directory, name)
            if stat.S_IMODE(path.lstat().st_mode) & 0o077:
                found.append(f"{path}: {stat.S_IMODE(path.lstat().st_mode):04o}")
        for name in files:
            path = Path(directory, name)
            if path.relative_to(root).as_posix() in skip or path.is_symlink():
                continue
            mode = stat.S_IMODE(path.lstat().st_mode)
            read_only_cache = "image-cache" in path.parts and not mode & 0o222
            if mode & 0o077 and not read_only_cache:
                found.append(f"{path}: {mode:04o}")
    return found


def test_what_the_service_writes_is_private_to_its_user(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    os.chmod(data_dir, 0o755)  # as an operator may have made it
    server = ServerProcess(data_dir, catalog_image_mib="1", shutdown_grace_seconds="2")
    try:
        server.start()
        md = bearer(server.token("alpha"))
        with grpc.insecure_channel(server.address) as channel:
            _upload(channel, md)
            _deploy(channel, md, pb.BOOT_SOURCE_LOCAL_DISK)
            _deploy(channel, md, pb.BOOT_SOURCE_EVS)
        server.stop()
    finally:
        server.kill()

    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    written = {p.relative_to(data_dir).parts[0] for p in data_dir.rglob("*") if p.is_file()}
    # The walk below sees every kind of file the service writes.
    assert {"blobs", "fleet", "bms-image.db", SECRET_FILE} <= written, written
    fleet = {p.relative_to(data_dir / "fleet").parts[0] for p in (data_dir / "fleet").rglob("*")}
    assert {"servers", "image-cache"} <= fleet, fleet
    # serve.stdout and serve.stderr are the test's own files, made by its umask.
    assert _not_private(data_dir, {"serve.stdout", "serve.stderr"}) == []


def _run(*argv: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BMS_IMAGE), *argv, "--data-dir", str(data_dir)],
        env=clean_environ(BMS_IMAGE_LISTEN="127.0.0.1:0"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("argv", "exit_code"),
    [
        (["serve"], 1),
        (["provisioner", "--image-service", "127.0.0.1:1"], 1),
        (["migrate"], 1),
        (["token", "--project", "alpha"], 2),
    ],
)
def test_a_secret_others_may_read_is_refused_with_the_fix(
    tmp_path: Path, argv: list[str], exit_code: int
) -> None:
    secret = tmp_path / SECRET_FILE
    secret.write_text("s" * 64)
    os.chmod(secret, 0o644)

    done = _run(*argv, data_dir=tmp_path)

    assert done.returncode == exit_code, done
    assert f"chmod 600 {secret}" in done.stderr
    assert "0644" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "bms-image.db").exists(), "nothing was started"
    assert done.stdout == ""  # no token printed


def test_an_empty_secret_is_refused(tmp_path: Path) -> None:
    (tmp_path / SECRET_FILE).touch(mode=0o600)
    with pytest.raises(InsecureSecretFile, match="is empty"):
        Settings(data_dir=tmp_path).secret()


def test_processes_starting_together_make_one_whole_secret(tmp_path: Path) -> None:
    data_dir = tmp_path / "fresh"
    with ThreadPoolExecutor(16) as pool:
        secrets = list(pool.map(lambda _: Settings(data_dir=data_dir).secret(), range(32)))

    assert len(set(secrets)) == 1
    assert len(secrets[0]) == 64 and int(secrets[0], 16) >= 0
    assert [p.name for p in data_dir.iterdir()] == [SECRET_FILE]  # no temporary file left
    assert stat.S_IMODE((data_dir / SECRET_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE(data_dir.stat().st_mode) & 0o077 == 0
