"""How the client reaches the service: address and token from flags or the
environment, TLS options, and the errors when that goes wrong."""

from __future__ import annotations

import datetime
from pathlib import Path

from cli_support import Cli, failed, parsed
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bms-image test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_missing_token_is_unauthenticated(cli: Cli) -> None:
    result = await cli("images", "list", project=None)
    message = failed(result, 1, "UNAUTHENTICATED", "TOKEN_MISSING")
    assert "authorization" in message
    assert (
        result.stderr.splitlines()[1] == "hint: no token given: pass --token or set BMS_IMAGE_TOKEN"
    )

    # a token given as a flag instead of the environment works
    token = cli.service.authority.issue("alpha")
    listing = parsed(await cli("images", "--token", token, "list", "--json", project=None))
    assert len(listing["images"]) == 7


async def test_unreachable_service_is_unavailable(cli: Cli) -> None:
    result = await cli("flavors", "list", env={"BMS_IMAGE_ADDRESS": "127.0.0.1:1"})
    failed(result, 1, "UNAVAILABLE")


async def test_ca_cert_makes_the_client_speak_tls(cli: Cli, tmp_path: Path) -> None:
    """The service speaks plaintext for now: a TLS client cannot reach it,
    which shows that --ca-cert (or its variable) switched TLS on."""
    cert, key = self_signed(tmp_path)
    with_flag = await cli("flavors", "--ca-cert", cert, "list")
    failed(with_flag, 1, "UNAVAILABLE")
    from_env = await cli(
        "flavors", "list",
        env={"BMS_IMAGE_CA_CERT": str(cert), "BMS_IMAGE_CLIENT_CERT": str(cert),
             "BMS_IMAGE_CLIENT_KEY": str(key)},
    )  # fmt: skip
    failed(from_env, 1, "UNAVAILABLE")
    missing = await cli("flavors", "--ca-cert", tmp_path / "absent.pem", "list")
    assert missing.exit_code == 2 and "absent.pem" in missing.stderr
