"""Configuration: environment variables, overridable by command-line flags."""

from __future__ import annotations

import os
import secrets
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ENV_PREFIX = "BMS_IMAGE_"


@dataclass(frozen=True)
class Settings:
    """Every setting, its environment variable being BMS_IMAGE_<NAME>."""

    listen: str = "127.0.0.1:50051"
    data_dir: Path = Path("data")
    database_url: str = ""
    token_secret: str = ""
    private_image_quota: int = 50
    max_image_members: int = 256
    shutdown_grace_seconds: float = 10.0
    max_message_bytes: int = 8 * 1024 * 1024
    #: Concurrent streams (calls) one HTTP/2 connection may open; further
    #: calls on that connection wait for one to end. The benchmarks open
    #: 1,000 WatchServer streams on one channel.
    max_streams_per_connection: int = 2048
    #: Concurrent RPCs of the whole process; beyond it a call is refused at
    #: once with RESOURCE_EXHAUSTED.
    max_concurrent_rpcs: int = 10_000
    log_level: str = "INFO"
    max_image_bytes: int = 1024**4
    #: The largest raw disk converting an uploaded qcow2/vmdk/vhd/vhdx may
    #: produce; a larger claimed virtual size is refused before qemu-img runs.
    max_virtual_bytes: int = 256 * 1024**3
    #: How long one qemu-img conversion may take before it is killed.
    convert_timeout_seconds: float = 1800.0
    chunk_bytes: int = 1024 * 1024
    catalog_image_mib: int = 32
    blob_backend: str = "local"
    s3_endpoint_url: str = ""
    s3_bucket: str = "bms-images"
    s3_region: str = "us-east-1"
    s3_access_key: str = ""
    s3_secret_key: str = ""
    s3_prefix: str = "images/"
    #: Tries of one S3 request (the first included) before the store is
    #: taken for unreachable: throttling, 5xx answers and refused
    #: connections are retried with botocore's backoff in between.
    s3_max_attempts: int = 5
    #: Multipart uploads under the prefix older than this are aborted at
    #: start (a crash left them; younger ones may be another replica's).
    s3_abort_incomplete_after_seconds: float = 24 * 3600.0
    #: Health turns NOT_SERVING while the data directory (staging area,
    #: local blobs) has less free space than this.
    min_free_bytes: int = 256 * 1024 * 1024
    #: Concurrent uploads (UploadImageData streams) per project, per process.
    max_uploads_per_project: int = 16
    #: Concurrent downloads (DownloadImageData streams) per project, per process.
    max_downloads_per_project: int = 256
    #: "embedded": this process also runs the fleet (ProvisioningService);
    #: "none": the fleet runs as its own process (`bms-image provisioner`).
    provisioner: str = "embedded"
    #: For `bms-image provisioner`: the ImageService it fetches images from.
    image_service: str = ""
    #: With provisioner "none": where `bms-image provisioner` listens, so that
    #: CreateImage can capture its servers; with its TLS, as for image_service.
    provisioner_address: str = ""
    provisioner_ca_file: str = ""
    provisioner_cert_file: str = ""
    provisioner_key_file: str = ""
    #: host:port of the Prometheus endpoint (/metrics); empty: no endpoint.
    #: The host must be a loopback address unless metrics_allow_remote.
    metrics_listen: str = ""
    #: Let metrics_listen bind a non-loopback address (or every address, for
    #: a bare port): the endpoint has no authentication and names projects.
    metrics_allow_remote: bool = False
    #: "text" for people, "json" (one object per line) for log pipelines.
    log_format: str = "text"
    #: SQLite durability: NORMAL (acknowledged writes survive any crash of the
    #: process; a power loss may drop the last ones, never corrupting) or FULL
    #: (an fsync per commit).
    sqlite_synchronous: str = "FULL"
    #: GetImage may answer from images read this many seconds ago; changes
    #: made through this process show at once, other replicas' within it.
    #: 0 reads the database every time.
    metadata_cache_seconds: float = 1.0
    #: Memory for images rendered as messages (bytes each caller type sees,
    #: reused by ListImages pages and GetImage), in MiB; at least 1.
    rendered_images_mib: int = 64
    #: How often the chunk store's collector frees unreferenced chunks, in
    #: seconds; 0 never (another replica on the same store does it).
    gc_seconds: float = 60.0
    #: How often health re-checks the database and blob store.
    health_check_seconds: float = 5.0
    #: "uvloop" (libuv: less CPU per call) or "asyncio" (the standard loop).
    event_loop: str = "uvloop"
    #: Secrets that signed tokens before the current one and are still
    #: accepted (comma-separated): the window of a token key rotation.
    token_previous_secrets: str = ""
    #: TLS for the listening port: PEM certificate chain and private key.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    #: Mutual TLS: clients must present a certificate signed by this CA.
    tls_client_ca_file: str = ""
    #: The provisioner's channel to the ImageService: the CA that signed its
    #: certificate (TLS when set) and, for mutual TLS, its own certificate.
    image_service_ca_file: str = ""
    image_service_cert_file: str = ""
    image_service_key_file: str = ""
    #: Servers a project may have (not deleted): CreateServers past it is
    #: RESOURCE_EXHAUSTED SERVER_QUOTA_EXCEEDED.
    max_servers_per_project: int = 2000
    #: Servers of one project that one provisioner process builds or
    #: reinstalls at once: past it RESOURCE_EXHAUSTED DEPLOYMENT_LIMIT.
    max_deployments_per_project: int = 1000

    @classmethod
    def from_env(
        cls, overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
    ) -> Settings:
        """Environment first, then the non-None overrides (command-line flags)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, caster in _CASTERS.items():
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is not None and raw != "":
                values[name] = caster(raw)
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls(**values)

    def resolved(self) -> Settings:
        """Fills derived defaults: the SQLite file and the token secret live in data_dir."""
        database_url = self.database_url or f"sqlite:///{self.data_dir / 'bms-image.db'}"
        return replace(self, database_url=database_url, token_secret=self.secret())

    def previous_token_secrets(self) -> tuple[str, ...]:
        return tuple(key.strip() for key in self.token_previous_secrets.split(",") if key.strip())

    def secret(self) -> str:
        """The token secret: token_secret, else the file data_dir/token-secret,
        made on first use. InsecureSecretFile when that file may be read or
        written by others (group or other permission bits) or is empty."""
        if self.token_secret:
            return self.token_secret
        path = self.data_dir / SECRET_FILE
        if not path.exists():
            _create_secret_file(path)
        return _read_secret_file(path)


#: The token secret's file in the data directory (without BMS_IMAGE_TOKEN_SECRET).
SECRET_FILE = "token-secret"


class InsecureSecretFile(RuntimeError):
    """The token secret file is not private to this user, or is unusable."""


def _create_secret_file(path: Path) -> None:
    """Writes a new random secret to `path`, atomically and durably: a 0600
    temporary file in the same directory, fsynced, then hard-linked to the
    final name, which fails if the name exists (so two processes starting
    together agree on one secret: the loser reads the winner's), and the
    directory fsynced. A crash leaves no file or a whole one, never an empty
    or partial secret."""
    directory = path.parent
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".new")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass
    finally:
        os.unlink(temporary)
    directory_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)


def _read_secret_file(path: Path) -> str:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise InsecureSecretFile(
            f"the token secret {path} has mode {mode:04o}: other users may read or change it, "
            f"and so sign tokens for any project. Restrict it with `chmod 600 {path}` "
            "(and consider making a new secret: delete the file to have one made at the "
            "next start, which ends every token signed with the old one)"
        )
    secret = path.read_text().strip()
    if not secret:
        raise InsecureSecretFile(
            f"the token secret {path} is empty; delete it to have a new one made at the next "
            "start (tokens signed with the old secret stop working), or set "
            "BMS_IMAGE_TOKEN_SECRET"
        )
    return secret


def _boolean(raw: str) -> bool:
    """true/false, 1/0, yes/no, on/off (any case); anything else is refused
    rather than read as false."""
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{raw!r} is not a boolean: use true or false")


_CASTERS: dict[str, Any] = {
    "listen": str,
    "data_dir": Path,
    "database_url": str,
    "token_secret": str,
    "private_image_quota": int,
    "max_image_members": int,
    "shutdown_grace_seconds": float,
    "max_message_bytes": int,
    "max_streams_per_connection": int,
    "max_concurrent_rpcs": int,
    "log_level": str,
    "max_image_bytes": int,
    "max_virtual_bytes": int,
    "convert_timeout_seconds": float,
    "chunk_bytes": int,
    "catalog_image_mib": int,
    "blob_backend": str,
    "s3_endpoint_url": str,
    "s3_bucket": str,
    "s3_region": str,
    "s3_access_key": str,
    "s3_secret_key": str,
    "s3_prefix": str,
    "s3_max_attempts": int,
    "s3_abort_incomplete_after_seconds": float,
    "min_free_bytes": int,
    "max_uploads_per_project": int,
    "max_downloads_per_project": int,
    "provisioner": str,
    "image_service": str,
    "provisioner_address": str,
    "provisioner_ca_file": str,
    "provisioner_cert_file": str,
    "provisioner_key_file": str,
    "metrics_listen": str,
    "metrics_allow_remote": _boolean,
    "log_format": str,
    "health_check_seconds": float,
    "event_loop": str,
    "metadata_cache_seconds": float,
    "rendered_images_mib": int,
    "gc_seconds": float,
    "sqlite_synchronous": str,
    "token_previous_secrets": str,
    "tls_cert_file": str,
    "tls_key_file": str,
    "tls_client_ca_file": str,
    "image_service_ca_file": str,
    "image_service_cert_file": str,
    "image_service_key_file": str,
    "max_servers_per_project": int,
    "max_deployments_per_project": int,
}
