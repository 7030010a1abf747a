"""Captures are CreateImage calls, so their request_id follows the same rules
(issue 14, item 5): a retry answers with the first capture's image without
holding the server again, and once that image is deleted the retry is
refused with REQUEST_ID_CONSUMED instead of capturing the server twice."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from scenario_support import (
    Cloud,
    capture_request,
    cloud,
    get_server,
    private_images,
    stopped_server,
)

from bms.image.v1 import image_pb2
from support.errors import Code, expect_error
from support.tokens import Metadata


async def _until_active(c: Cloud, md: Metadata, name: str) -> None:
    while True:
        image = await c.images.GetImage(image_pb2.GetImageRequest(name=name), metadata=md)
        if image.status == image_pb2.IMAGE_STATUS_ACTIVE:
            return
        assert image.status in (image_pb2.IMAGE_STATUS_QUEUED, image_pb2.IMAGE_STATUS_SAVING)
        await asyncio.sleep(0.02)


async def test_a_capture_retry_answers_once_and_is_consumed_after_a_delete(
    tmp_path: Path,
) -> None:
    async with cloud(tmp_path) as c:
        md = c.md("alpha")
        server = await stopped_server(c, md, "cap")
        request_id = str(uuid.uuid4())
        retry = capture_request(server.name, "backup", request_id)
        first = await c.images.CreateImage(retry, metadata=md)
        await asyncio.wait_for(_until_active(c, md, first.name), 60)

        again = await c.images.CreateImage(retry, metadata=md)
        assert again.name == first.name
        assert (await get_server(c, md, server.name)).task == ""  # not held by the retry

        await c.images.DeleteImage(image_pb2.DeleteImageRequest(name=first.name), metadata=md)
        rich = await expect_error(
            c.images.CreateImage(retry, metadata=md),
            Code.FAILED_PRECONDITION,
            "REQUEST_ID_CONSUMED",
        )
        assert rich.info.metadata["image"] == first.name
        assert rich.info.metadata["status"] == "deleted"
        assert await private_images(c, md) == []  # the server was not captured again
        assert (await get_server(c, md, server.name)).task == ""
