"""`bms-image token`: a user token of a capped lifetime, never a service credential."""

from __future__ import annotations

from pathlib import Path

import jwt
import pytest
from typer.testing import CliRunner

from bms_image.cli import app
from bms_image.common.auth import AUDIENCE, MAX_TTL_SECONDS, TokenAuthority
from bms_image.common.errors import Unauthenticated


def token(tmp_path: Path, *options: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        app, ["token", "--project", "alpha", "--data-dir", str(tmp_path), *options]
    )
    return result.exit_code, result.output


def test_the_token_is_a_user_token_and_never_a_service_credential(tmp_path: Path) -> None:
    code, output = token(tmp_path, "--admin")
    assert code == 0, output
    minted = output.strip()
    authority = TokenAuthority((tmp_path / "token-secret").read_text().strip())
    assert authority.verify(minted).is_admin
    assert jwt.decode(minted, options={"verify_signature": False})["aud"] == AUDIENCE
    with pytest.raises(Unauthenticated) as caught:
        authority.verify_service(minted)
    assert caught.value.reason == "SERVICE_IDENTITY_INVALID"


def test_the_lifetime_is_capped_with_a_usage_error(tmp_path: Path) -> None:
    code, output = token(tmp_path, "--ttl-seconds", str(MAX_TTL_SECONDS))
    assert code == 0, output
    claims = jwt.decode(output.strip(), options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == MAX_TTL_SECONDS
    for too_long in (MAX_TTL_SECONDS + 1, 30 * 24 * 3600):
        code, output = token(tmp_path, "--ttl-seconds", str(too_long))
        assert code == 2, output
        assert "--ttl-seconds" in output and "604800" in output, output
    code, output = token(tmp_path, "--ttl-seconds", "0")
    assert code == 2 and "--ttl-seconds" in output, output
