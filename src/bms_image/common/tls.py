"""Transport security from the settings: TLS or mutual TLS on the listening
port, and the provisioner's (optionally mutual) TLS channel to the ImageService."""

from __future__ import annotations

from pathlib import Path

import grpc

from bms_image.common.config import Settings


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
    return _client_credentials(
        "image_service",
        settings.image_service_ca_file,
        settings.image_service_cert_file,
        settings.image_service_key_file,
    )


def provisioner_credentials(settings: Settings) -> grpc.ChannelCredentials | None:
    """How an image service without the embedded fleet reaches the separate
    provisioner for captures, in the same way."""
    return _client_credentials(
        "provisioner",
        settings.provisioner_ca_file,
        settings.provisioner_cert_file,
        settings.provisioner_key_file,
    )


def _client_credentials(
    peer: str, ca_file: str, cert_file: str, key_file: str
) -> grpc.ChannelCredentials | None:
    if not ca_file:
        if cert_file or key_file:
            raise RuntimeError(f"a client certificate for the {peer} needs its CA too")
        return None
    if bool(cert_file) != bool(key_file):
        raise RuntimeError(f"{peer}_cert_file and {peer}_key_file go together")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file, f"{peer}_ca_file"),
        private_key=_read(key_file, f"{peer}_key_file") if key_file else None,
        certificate_chain=_read(cert_file, f"{peer}_cert_file") if cert_file else None,
    )
