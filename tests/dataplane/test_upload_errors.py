"""Uploads that must fail: bad checksums and sizes (the image is KILLED and
its bytes removed), wrong images and callers, malformed streams, oversized
chunks and messages, and the maximum image size."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import dataplane_support as dp
import grpc
import pytest

from bms.image.v1 import image_pb2
from bms_image.common.serving import RunningService
from support.builders import MiB, random_bytes, sha256_hex
from support.errors import RichError, expect_code
from support.services import fresh_project
from support.tokens import Metadata

pytestmark = pytest.mark.asyncio(loop_scope="module")

DATA_LOSS = grpc.StatusCode.DATA_LOSS
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT


async def invalid_stream(
    images: dp.Stub, metadata: Metadata, *messages: image_pb2.UploadImageDataRequest
) -> RichError:
    """An upload stream of exactly `messages`, refused as INVALID_ARGUMENT."""
    return await dp.expect_error(
        images.UploadImageData(dp.request_stream(messages), metadata=metadata),
        INVALID_ARGUMENT,
    )


# -- verification at the end of the stream -----------------------------------


async def test_checksum_mismatch_is_data_loss_and_kills_the_image(
    images: dp.Stub, alpha: Metadata, data_dir: Path
) -> None:
    content = random_bytes(2 * MiB + 3)
    wrong = sha256_hex(content + b"x")

    killed = await dp.killed_upload(
        images, alpha, data_dir, content, DATA_LOSS, "IMAGE_CHECKSUM_MISMATCH", sha256=wrong
    )

    assert sha256_hex(content) in killed.error.status.message
    assert "SHA-256" in killed.image.status_reason
    # A killed image takes no more data.
    await dp.expect_error(
        dp.upload(images, alpha, killed.image.name, content),
        grpc.StatusCode.FAILED_PRECONDITION,
        "IMAGE_NOT_QUEUED",
    )


async def test_fewer_bytes_than_declared_is_invalid_and_kills_the_image(
    images: dp.Stub, alpha: Metadata, data_dir: Path
) -> None:
    content = random_bytes(MiB)

    killed = await dp.killed_upload(
        images,
        alpha,
        data_dir,
        content,
        INVALID_ARGUMENT,
        "IMAGE_SIZE_MISMATCH",
        size_bytes=len(content) + 1,
    )

    assert "metadata.size_bytes" in killed.error.fields


async def test_more_bytes_than_declared_is_invalid_and_kills_the_image(
    images: dp.Stub, alpha: Metadata, data_dir: Path
) -> None:
    content = random_bytes(MiB + 1)

    await dp.killed_upload(
        images, alpha, data_dir, content, INVALID_ARGUMENT, size_bytes=MiB, sha256=""
    )


async def test_killed_image_frees_its_quota_slot(tmp_path: Path) -> None:
    async with dp.own_service(tmp_path, private_image_quota=1) as own:
        alpha = own.metadata("alpha")
        first = await dp.create_image(own.images, alpha)
        await dp.expect_error(
            dp.create_image(own.images, alpha, display_name="second"),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
        await dp.expect_error(
            dp.upload(own.images, alpha, first.name, b"abc", sha256="0" * 64),
            DATA_LOSS,
        )
        await dp.assert_killed_and_clean(own.images, alpha, first.name, own.data_dir)

        second = await dp.create_image(own.images, alpha, display_name="second")
        uploaded = await dp.upload(own.images, alpha, second.name, b"abc")
        assert uploaded.status == dp.ACTIVE


# -- which image, whose image ------------------------------------------------


async def test_upload_to_an_active_image_fails_and_keeps_its_bytes(
    service: RunningService, images: dp.Stub, alpha: Metadata
) -> None:
    content = random_bytes(100_000)
    created = await dp.create_image(images, alpha)
    await dp.upload(images, alpha, created.name, content)

    await dp.expect_error(
        dp.upload(images, alpha, created.name, random_bytes(10)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "IMAGE_NOT_QUEUED",
    )

    image = await dp.get_image(images, alpha, created.name)
    await dp.assert_stored(images, alpha, image, content)


async def test_upload_by_another_project_is_not_found(
    images: dp.Stub, as_project: Callable[..., Metadata], data_dir: Path
) -> None:
    alpha, beta = as_project(fresh_project("alpha")), as_project(fresh_project("beta"))
    created = await dp.create_image(images, alpha)

    await dp.expect_error(
        dp.upload(images, beta, created.name, random_bytes(1000)),
        grpc.StatusCode.NOT_FOUND,
        "IMAGE_NOT_FOUND",
    )

    await dp.assert_untouched(images, alpha, created.name, data_dir)


async def test_upload_to_a_public_image_is_refused(
    service: RunningService, images: dp.Stub, alpha: Metadata
) -> None:
    listed = await images.ListImages(
        image_pb2.ListImagesRequest(filter="type = public"), metadata=alpha
    )
    public = listed.images[0]

    await dp.expect_error(
        dp.upload(images, alpha, public.name, random_bytes(10)), grpc.StatusCode.PERMISSION_DENIED
    )

    assert (await dp.get_image(images, alpha, public.name)).sha256 == public.sha256


async def test_upload_to_a_missing_or_malformed_name(
    service: RunningService, images: dp.Stub, alpha: Metadata
) -> None:
    await dp.expect_error(
        dp.upload(images, alpha, "images/00000000-0000-4000-8000-000000000000", b"x"),
        grpc.StatusCode.NOT_FOUND,
    )
    rich = await dp.expect_error(dp.upload(images, alpha, "flavors/nope", b"x"), INVALID_ARGUMENT)
    assert "metadata.name" in rich.fields


# -- the shape of the stream -------------------------------------------------


async def test_first_message_must_be_metadata(
    images: dp.Stub, alpha: Metadata, data_dir: Path
) -> None:
    created = await dp.create_image(images, alpha)

    chunk_first = dp.chunk_message(b"data"), dp.upload_metadata(created.name)
    assert "metadata" in (await invalid_stream(images, alpha, *chunk_first)).fields
    assert "metadata" in (await invalid_stream(images, alpha)).fields

    await dp.assert_untouched(images, alpha, created.name, data_dir)


async def test_metadata_in_the_middle_of_the_stream_is_invalid(
    images: dp.Stub, alpha: Metadata, data_dir: Path
) -> None:
    created = await dp.create_image(images, alpha)

    await invalid_stream(
        images,
        alpha,
        dp.upload_metadata(created.name),
        dp.chunk_message(b"a" * 1000),
        dp.upload_metadata(created.name),
        dp.chunk_message(b"b" * 1000),
    )

    await dp.assert_killed_and_clean(images, alpha, created.name, data_dir)


async def test_invalid_declarations_are_refused_before_any_byte_is_taken(
    images: dp.Stub, alpha: Metadata, data_dir: Path
) -> None:
    created = await dp.create_image(images, alpha)
    cases = [
        (dp.upload_metadata(created.name, sha256="ABC"), "metadata.sha256"),
        (dp.upload_metadata(created.name, sha256="A" * 64), "metadata.sha256"),
        (dp.upload_metadata(created.name, size_bytes=-1), "metadata.size_bytes"),
        (dp.upload_metadata(created.name, offset=-1), "metadata.offset"),
        (dp.upload_metadata(created.name, disk_format=99), "metadata.disk_format"),
    ]
    for first, field in cases:
        rich = await invalid_stream(images, alpha, first, dp.chunk_message(b"x"))
        assert field in rich.fields, (first, rich.fields)

    await dp.assert_untouched(images, alpha, created.name, data_dir)


async def test_chunk_over_four_mib_is_invalid_and_kills_the_image(
    service: RunningService, images: dp.Stub, alpha: Metadata, data_dir: Path
) -> None:
    created = await dp.create_image(images, alpha)
    assert dp.MAX_UPLOAD_CHUNK + 1 < service.settings.max_message_bytes

    rich = await invalid_stream(
        images,
        alpha,
        dp.upload_metadata(created.name),
        dp.chunk_message(random_bytes(1000)),
        dp.chunk_message(random_bytes(dp.MAX_UPLOAD_CHUNK + 1)),
    )

    assert "chunk" in rich.fields
    await dp.assert_killed_and_clean(images, alpha, created.name, data_dir)


async def test_message_over_the_transport_limit_is_resource_exhausted(
    service: RunningService, images: dp.Stub, alpha: Metadata
) -> None:
    created = await dp.create_image(images, alpha)
    too_big = service.settings.max_message_bytes + 1

    await expect_code(
        images.UploadImageData(
            dp.request_stream(
                [dp.upload_metadata(created.name), dp.chunk_message(b"\0" * too_big)]
            ),
            metadata=alpha,
        ),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )

    # The stream broke off before any byte was stored: the image can still take data.
    image = await dp.wait_for_image(images, alpha, created.name, dp.QUEUED)
    assert image.uploaded_bytes == 0
    content = random_bytes(1000)
    assert (await dp.upload(images, alpha, created.name, content)).status == dp.ACTIVE
    assert await dp.download_verified(images, alpha, created.name) == content


# -- the maximum image size --------------------------------------------------


async def test_maximum_image_size(tmp_path: Path) -> None:
    limit = 10 * MiB
    async with dp.own_service(tmp_path, max_image_bytes=limit) as own:
        alpha = own.metadata("alpha")

        # Declaring too much is refused up front; the image stays queued.
        declared = await dp.create_image(own.images, alpha)
        too_much = dp.upload_metadata(declared.name, size_bytes=limit + 1)
        rich = await invalid_stream(own.images, alpha, too_much, dp.chunk_message(b"x"))
        assert "metadata.size_bytes" in rich.fields
        await dp.assert_untouched(own.images, alpha, declared.name, own.data_dir)

        # Exactly the limit is fine.
        content = random_bytes(limit)
        uploaded = await dp.upload(own.images, alpha, declared.name, content, chunk_sizes=[4 * MiB])
        assert (uploaded.status, uploaded.size_bytes) == (dp.ACTIVE, limit)

        # Sending more than the limit without declaring a size kills the upload.
        await dp.killed_upload(
            own.images,
            alpha,
            own.data_dir,
            content + b"!",
            INVALID_ARGUMENT,
            "IMAGE_TOO_LARGE",
            size_bytes=0,
            sha256="",
            chunk_sizes=[4 * MiB],
        )
