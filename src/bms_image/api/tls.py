"""Transport security from the settings: TLS or mutual TLS on the listening
port, and the provisioner's (optionally mutual) TLS channel to the ImageService."""

from __future__ import annotations

from pathlib import Path

import grpc

from ..config import Settings


def _read(path: str, setting: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise RuntimeError(
            f"cannot read {setting} {path!r} (BMS_IMAGE_{setting.upper()}): {error.strerror}"
        ) from None


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """None for plaintext; TLS when a certificate and key are configured;
    mutual TLS (client certificate required) when a client CA is too."""
    if not settings.tls_cert_file and not settings.tls_key_file:
        if settings.tls_client_ca_file:
            raise RuntimeError(
                "tls_client_ca_file needs tls_cert_file and tls_key_file: mutual TLS is TLS first"
            )
        return None
    if not (settings.tls_cert_file and settings.tls_key_file):
        raise RuntimeError("TLS needs both tls_cert_file and tls_key_file")
    key = _read(settings.tls_key_file, "tls_key_file")
    chain = _read(settings.tls_cert_file, "tls_cert_file")
    client_ca = (
        _read(settings.tls_client_ca_file, "tls_client_ca_file")
        if settings.tls_client_ca_file
        else None
    )
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def image_service_credentials(settings: Settings) -> grpc.ChannelCredentials | None:
    """How the provisioner reaches a separate ImageService: plaintext unless
    image_service_ca_file is set; with a client certificate for mutual TLS."""
    if not settings.image_service_ca_file:
        if settings.image_service_cert_file or settings.image_service_key_file:
            raise RuntimeError("a client certificate for the image service needs its CA too")
        return None
    if bool(settings.image_service_cert_file) != bool(settings.image_service_key_file):
        raise RuntimeError("image_service_cert_file and image_service_key_file go together")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(settings.image_service_ca_file, "image_service_ca_file"),
        private_key=(
            _read(settings.image_service_key_file, "image_service_key_file")
            if settings.image_service_key_file
            else None
        ),
        certificate_chain=(
            _read(settings.image_service_cert_file, "image_service_cert_file")
            if settings.image_service_cert_file
            else None
        ),
    )
