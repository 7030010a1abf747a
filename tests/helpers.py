"""Helpers shared by test modules (import them as `from helpers import ...`;
never import from a conftest module, whose name is not unique)."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
from collections.abc import Awaitable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from sqlalchemy import make_url

from bms_image.common import disk_format as disks
from bms_image.common.config import Settings
from bms_image.common.status import ERROR_DOMAIN
from bms_image.fleet.adapters.image_source import cache_entry
from bms_image.fleet.domain.system_disks import LOCAL_DISK_FILE, DiskKind, SystemDisk

TEST_SECRET = "test-secret-" + "0" * 52
Code = grpc.StatusCode


def make_settings(tmp_path: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "listen": "127.0.0.1:0",
        "data_dir": tmp_path,
        "token_secret": TEST_SECRET,
        "shutdown_grace_seconds": 1.0,
        "catalog_image_mib": 1,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


# -- rich gRPC errors ----------------------------------------------------------


@dataclass
class RichError:
    """A failed call with its decoded google.rpc.Status details."""

    error: grpc.aio.AioRpcError
    status: status_pb2.Status
    info: error_details_pb2.ErrorInfo
    bad_request: error_details_pb2.BadRequest | None = None
    quota_failure: error_details_pb2.QuotaFailure | None = None
    precondition_failure: error_details_pb2.PreconditionFailure | None = None

    @property
    def code(self) -> grpc.StatusCode:
        return self.error.code()

    @property
    def reason(self) -> str:
        return self.info.reason

    @property
    def message(self) -> str:
        return self.error.details() or ""

    @property
    def fields(self) -> list[str]:
        assert self.bad_request is not None
        return [v.field for v in self.bad_request.field_violations]

    def everything(self) -> str:
        """All the caller learns from this error, as text: for leak checks."""
        return "\n".join(
            [self.message, str(self.status), str(self.error.trailing_metadata() or "")]
        )


def decode(error: grpc.aio.AioRpcError) -> RichError:
    """Decodes and checks a rich status: exactly one ErrorInfo of our domain,
    the detail each code promises, and no traceback anywhere."""
    code = error.code()
    assert code not in (Code.INTERNAL, Code.UNKNOWN), (
        f"the service failed with {code.name}: {error.details()}"
    )
    assert "Traceback" not in (error.details() or "")
    assert "Traceback" not in (error.debug_error_string() or "")
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, f"{code.name} without google.rpc.Status: {error.details()}"
    assert status.code == code.value[0]
    assert status.message == error.details()
    infos = [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    assert len(infos) == 1, f"expected exactly one ErrorInfo, got {status.details}"
    info = error_details_pb2.ErrorInfo()
    infos[0].Unpack(info)
    assert info.domain == ERROR_DOMAIN
    assert info.reason and info.reason == info.reason.upper()
    rich = RichError(error=error, status=status, info=info)
    for packed in status.details:
        for attribute, message_type in (
            ("bad_request", error_details_pb2.BadRequest),
            ("quota_failure", error_details_pb2.QuotaFailure),
            ("precondition_failure", error_details_pb2.PreconditionFailure),
        ):
            if packed.Is(message_type.DESCRIPTOR):
                message = message_type()
                packed.Unpack(message)
                setattr(rich, attribute, message)
    if code == Code.INVALID_ARGUMENT:
        assert rich.bad_request is not None, "INVALID_ARGUMENT without google.rpc.BadRequest"
        assert rich.bad_request.field_violations
    if code == Code.RESOURCE_EXHAUSTED:
        assert rich.quota_failure is not None, "RESOURCE_EXHAUSTED without QuotaFailure"
        assert rich.quota_failure.violations
    # FAILED_PRECONDITION carries a PreconditionFailure only where the domain
    # names the violated condition (not every one does; the proto promises
    # only ErrorInfo): the tests check it where it matters.
    return rich


async def outcome(call: Awaitable[Any]) -> tuple[Any, RichError | None]:
    """(response, None) or (None, decoded error)."""
    try:
        return await call, None
    except grpc.aio.AioRpcError as error:
        return None, decode(error)


async def expect_error(call: Awaitable[Any], code: grpc.StatusCode, reason: str = "") -> RichError:
    """Awaits a call that must fail with `code` (and `reason`, when given)."""
    response, rich = await outcome(call)
    assert rich is not None, f"expected {code.name}, the call succeeded: {response}"
    assert rich.code == code, f"expected {code.name}, got {rich.code.name}: {rich.message}"
    if reason:
        assert rich.reason == reason, f"expected {reason}, got {rich.reason}: {rich.message}"
    return rich


async def expect_invalid(call: Awaitable[Any], field: str) -> RichError:
    rich = await expect_error(call, Code.INVALID_ARGUMENT)
    assert field in rich.fields, f"expected a violation of {field!r}, got {rich.fields}"
    return rich


# -- the fleet's disks ----------------------------------------------------------


def recorded_disk(data_dir: Path, server: str, database_url: str = "") -> disks.Layers:
    """A server's system disk as its provisioner recorded it in its database
    (SQLite: `database_url`, or the file in data_dir): the fleet never reads
    what a disk is made of from the disk itself, and neither do tests. A
    server with no record yet gets where its local disk would be."""
    server_id = server.removeprefix("servers/")
    path = make_url(database_url).database if database_url else str(data_dir / "bms-image.db")
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as connection:
        row = connection.execute(
            "SELECT disk_kind, disk_top, disk_base_image, disk_base_sha256 FROM servers "
            "WHERE id = ?",
            (server_id,),
        ).fetchone()
    directory = data_dir / "fleet" / "servers" / server_id
    if row is None or not row[0]:
        return disks.Layers(directory / LOCAL_DISK_FILE)
    record = SystemDisk(DiskKind(row[0]), row[1], row[2], row[3])
    if record.kind is DiskKind.LOCAL:
        return disks.Layers(directory / record.top)
    base = cache_entry(data_dir / "fleet" / "image-cache", record.base_sha256)
    return disks.Layers(directory / record.top, base)


# -- a small file system -------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size_bytes: int) -> Iterator[Path]:
    """A tmpfs of `size_bytes` mounted on `path` (created if missing), for
    real ENOSPC; skips the test where mounting is not allowed (not root).
    `remount(path, size)` grows or shrinks it while mounted."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def remount(path: Path, size_bytes: int) -> None:
    subprocess.run(
        ["mount", "-o", f"remount,size={size_bytes}", str(path)], check=True, capture_output=True
    )
