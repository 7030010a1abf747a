"""Rotating the token signing key: the service started with a new secret and
the old one in token_previous_secrets accepts tokens of both, and only the
new one once the old secret is dropped from the setting."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from bms.image.v1 import image_pb2, image_pb2_grpc
from bms_image.common.auth import TokenAuthority
from bms_image.common.config import Settings
from bms_image.processes import start
from support.services import make_settings
from support.tokens import TEST_SECRET, bearer

NEW_SECRET = "rotated-secret-" + "r" * 50
UNKNOWN_SECRET = "never-configured-" + "u" * 50


async def list_code(settings: Settings, signed_with: str) -> grpc.StatusCode:
    service = await start(settings)
    token = TokenAuthority(signed_with).issue("alpha")
    try:
        async with grpc.aio.insecure_channel(service.address) as channel:
            await image_pb2_grpc.ImageServiceStub(channel).ListImages(
                image_pb2.ListImagesRequest(), metadata=bearer(token)
            )
    except grpc.aio.AioRpcError as error:
        return error.code()
    finally:
        await service.stop(0)
    return grpc.StatusCode.OK


@pytest.mark.parametrize(
    ("signed_with", "expected"),
    [
        (TEST_SECRET, grpc.StatusCode.OK),
        (NEW_SECRET, grpc.StatusCode.OK),
        (UNKNOWN_SECRET, grpc.StatusCode.UNAUTHENTICATED),
    ],
)
async def test_during_the_window_old_and_new_keys_are_accepted(
    tmp_path: Path, signed_with: str, expected: grpc.StatusCode
) -> None:
    rotating = make_settings(
        tmp_path, token_secret=NEW_SECRET, token_previous_secrets=f" {TEST_SECRET} ,"
    )
    assert await list_code(rotating, signed_with) == expected


async def test_after_the_window_the_old_key_is_refused(tmp_path: Path) -> None:
    rotated = make_settings(tmp_path, token_secret=NEW_SECRET)
    assert await list_code(rotated, TEST_SECRET) == grpc.StatusCode.UNAUTHENTICATED
    assert await list_code(rotated, NEW_SECRET) == grpc.StatusCode.OK
