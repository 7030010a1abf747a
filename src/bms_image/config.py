"""Configuration: environment variables, overridable by command-line flags."""

from __future__ import annotations

import os
import secrets
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
    metrics_listen: str = ""
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
        if self.token_secret:
            return self.token_secret
        path = self.data_dir / "token-secret"
        if not path.exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            # O_EXCL: two processes starting together agree on one secret.
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "w") as handle:
                    handle.write(secrets.token_hex(32))
        return path.read_text().strip()


_CASTERS: dict[str, Any] = {
    "listen": str,
    "data_dir": Path,
    "database_url": str,
    "token_secret": str,
    "private_image_quota": int,
    "max_image_members": int,
    "shutdown_grace_seconds": float,
    "max_message_bytes": int,
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
    "provisioner": str,
    "image_service": str,
    "provisioner_address": str,
    "provisioner_ca_file": str,
    "provisioner_cert_file": str,
    "provisioner_key_file": str,
    "metrics_listen": str,
    "log_format": str,
    "health_check_seconds": float,
    "event_loop": str,
    "metadata_cache_seconds": float,
    "sqlite_synchronous": str,
    "token_previous_secrets": str,
    "tls_cert_file": str,
    "tls_key_file": str,
    "tls_client_ca_file": str,
    "image_service_ca_file": str,
    "image_service_cert_file": str,
    "image_service_key_file": str,
}
