"""The image service's composition root: database, catalog seed, blob
store, domain, servicers, health and reflection, wired once. A provisioner
embedded in this process is mounted through `embed` (the fleet's own
bootstrap); without one, captures go to the provisioner at
settings.provisioner_address, or are refused."""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack

from grpc_health.v1 import health, health_pb2_grpc

from bms.image.v1 import image_pb2, sharing_pb2, sharing_pb2_grpc
from bms_image.common.auth import ServiceCredential
from bms_image.common.config import Settings
from bms_image.common.flavors import FlavorCatalog
from bms_image.common.model import IMAGE_SERVICE_IDENTITY
from bms_image.common.serving import (
    Embed,
    Host,
    RunningService,
    begin_serving,
    client_channel,
    enable_reflection,
    listen,
    new_server,
    open_database,
    page_tokens,
    private_socket,
    server_options,
    token_authority,
)
from bms_image.common.staging import Staging
from bms_image.common.telemetry.health import Check, HealthMonitor, free_space
from bms_image.common.telemetry.metrics import Inventory, ServiceMetrics
from bms_image.common.telemetry.tracing import Tracing
from bms_image.common.tls import provisioner_credentials
from bms_image.images.adapters.blobs.local import LocalBlobStore
from bms_image.images.adapters.blobs.s3 import S3BlobStore
from bms_image.images.adapters.blobs.store import BlobStore, PrefixOwned
from bms_image.images.adapters.captures import RemoteCaptures
from bms_image.images.adapters.catalog import seed
from bms_image.images.adapters.chunks.housekeeping import housekeeping
from bms_image.images.adapters.chunks.objects import ChunkObjects, LocalChunkObjects
from bms_image.images.adapters.chunks.s3 import S3ChunkObjects
from bms_image.images.adapters.chunks.store import ChunkStore
from bms_image.images.adapters.chunks.uploads import ChunkStaging
from bms_image.images.adapters.deployment import deployment_id
from bms_image.images.adapters.formats import ContentInspector
from bms_image.images.adapters.members import SqlMemberRepository
from bms_image.images.adapters.repository import SqlFlavorRepository, SqlImageRepository
from bms_image.images.domain.imagedata import ImageData, release_image_bytes
from bms_image.images.domain.images import ImageCatalog
from bms_image.images.domain.ports import CaptureProvider
from bms_image.images.domain.sharing import Sharing
from bms_image.images.grpc.images import ImageServicer
from bms_image.images.grpc.rendering import RenderedImages, add_image_service
from bms_image.images.grpc.sharing import SharingServicer
from bms_image.store.db import IMAGES, Database

log = logging.getLogger(__name__)

IMAGE_SERVICE = image_pb2.DESCRIPTOR.services_by_name["ImageService"].full_name
SHARING_SERVICE = sharing_pb2.DESCRIPTOR.services_by_name["SharingService"].full_name


async def open_blob_store(
    settings: Settings, closing: AsyncExitStack, database: Database
) -> BlobStore:
    """The configured backend: local files (default) or an S3-compatible
    store, claimed for this deployment (see BlobStore.claim): a prefix or
    directory another deployment owns is refused, since each sweeps what it
    takes for orphans. On S3, multipart uploads a crash left are aborted."""
    deployment = await deployment_id(database)
    if settings.blob_backend == "local":
        local = LocalBlobStore(settings.data_dir / "blobs")
        try:
            await local.claim(deployment)
        except PrefixOwned as owned:
            raise RuntimeError(
                f"the blob directory {local.root} belongs to another deployment "
                f"({owned.owner}, not {deployment}): give this one a BMS_IMAGE_DATA_DIR "
                "of its own, or point BMS_IMAGE_DATABASE_URL at that deployment's database"
            ) from None
        return local
    if settings.blob_backend != "s3":
        raise RuntimeError(f"unknown blob backend {settings.blob_backend!r}: use local or s3")
    store = S3BlobStore(
        settings.s3_bucket,
        endpoint_url=settings.s3_endpoint_url or None,
        region=settings.s3_region,
        access_key=settings.s3_access_key or None,
        secret_key=settings.s3_secret_key or None,
        prefix=settings.s3_prefix,
        max_attempts=settings.s3_max_attempts,
    )
    await closing.enter_async_context(store)
    try:
        await store.ensure_bucket()
        await store.claim(deployment)
    except PrefixOwned as owned:
        await store.close()
        raise RuntimeError(
            f"the S3 prefix s3://{store.bucket}/{store.prefix} belongs to another deployment "
            f"({owned.owner}, not {deployment}): give this one a prefix of its own with "
            "BMS_IMAGE_S3_PREFIX (or BMS_IMAGE_S3_BUCKET), or point BMS_IMAGE_DATABASE_URL "
            "at that deployment's database"
        ) from None
    except BaseException:
        await store.close()
        raise
    aborted = await store.abort_incomplete_uploads(settings.s3_abort_incomplete_after_seconds)
    if aborted:
        log.info("aborted %d incomplete multipart uploads a crash left", aborted)
    return store


def chunk_objects(settings: Settings, whole_blobs: BlobStore) -> ChunkObjects:
    """Where the chunk store keeps chunks' bytes: beside the blobs, under the
    same claim (in the blob directory, or under the S3 prefix)."""
    if isinstance(whole_blobs, S3BlobStore):
        return S3ChunkObjects(whole_blobs)
    return LocalChunkObjects(settings.data_dir / "blobs" / "chunks")


async def start(
    settings: Settings, embed: Embed | None = None, tracing: Tracing | None = None
) -> RunningService:
    """The image service, with the provisioner `embed` mounts (when
    settings.provisioner is "embedded") on its own port; with `tracing`, its
    calls (and its channel to a provisioner) make spans."""
    settings = settings.resolved()
    server_options(settings)  # refuses bad limits before opening anything
    if settings.provisioner not in ("embedded", "none"):
        raise RuntimeError(f"provisioner must be embedded or none, not {settings.provisioner!r}")
    if settings.provisioner == "embedded" and embed is None:
        raise RuntimeError("this process has no provisioner to embed: set provisioner to none")
    database = open_database(settings)
    await database.migrate(IMAGES)  # its own tables only; an embedded fleet migrates its own
    closing = AsyncExitStack()
    whole_blobs = await open_blob_store(settings, closing, database)
    blobs = ChunkStore(database, chunk_objects(settings, whole_blobs), whole_blobs)
    await closing.enter_async_context(housekeeping(blobs, settings.gc_seconds))
    staging = Staging(settings.data_dir / "staging")
    added = await seed(database, blobs, staging, settings.catalog_image_mib * 1024 * 1024)
    if added:
        log.info("seeded %d catalog entries", added)
    flavor_repository = SqlFlavorRepository(database)
    image_repository = SqlImageRepository(database, settings.metadata_cache_seconds)
    member_repository = SqlMemberRepository(database)
    flavors = FlavorCatalog(await flavor_repository.list_flavors())
    tokens = page_tokens(settings)
    authority = token_authority(settings)
    metrics = ServiceMetrics()
    server = new_server(settings, authority, metrics, tracing)
    services = [IMAGE_SERVICE, SHARING_SERVICE]
    checks: dict[str, Check] = {
        "database": database.ping,
        "blob store": blobs.ping,
        "data disk": free_space(settings.data_dir, settings.min_free_bytes),
    }
    needs = {
        IMAGE_SERVICE: ["database", "blob store", "data disk"],
        SHARING_SERVICE: ["database", "blob store"],
    }
    captures: CaptureProvider | None = None
    if settings.provisioner == "embedded" and embed is not None:
        loopback = private_socket(server, closing)
        host = Host(
            settings, database, server, loopback, metrics, authority, tokens, closing, tracing
        )
        guest = await embed(host)
        captures = guest.captures
        services += guest.services
        checks.update(guest.checks)
        needs.update(guest.needs)
    elif settings.provisioner_address:
        channel = client_channel(
            settings,
            settings.provisioner_address,
            provisioner_credentials(settings),
            closing,
            tracing,
        )
        captures = RemoteCaptures(channel, ServiceCredential(authority, IMAGE_SERVICE_IDENTITY))

    staging_area = ChunkStaging(blobs, staging)
    adopted = await staging_area.adopt_staging_files()
    if adopted:
        log.info("moved %d uploads staged by an earlier version into the chunk store", adopted)

    async def release(image_id: str) -> None:
        await release_image_bytes(blobs, staging_area, image_id)

    catalog = ImageCatalog(
        image_repository,
        flavors,
        tokens,
        settings.private_image_quota,
        release_data=release,
        members=member_repository,
        captures=captures,
    )
    data = ImageData(
        catalog,
        image_repository,
        staging_area,
        blobs,
        ContentInspector(
            max_virtual_bytes=settings.max_virtual_bytes,
            timeout_seconds=settings.convert_timeout_seconds,
        ),
        max_image_bytes=settings.max_image_bytes,
        chunk_bytes=settings.chunk_bytes,
        max_uploads_per_project=settings.max_uploads_per_project,
        max_downloads_per_project=settings.max_downloads_per_project,
    )
    recovered = await data.recover()
    if any(recovered.values()):
        log.info("recovered after restart: %s", recovered)

    async def inventory() -> Inventory:
        images, quota_used = await image_repository.inventory()
        return Inventory(images, quota_used, settings.private_image_quota, await blobs.figures())

    metrics.watch_inventory(asyncio.get_running_loop(), inventory)
    rendered = RenderedImages(catalog, max(1, settings.rendered_images_mib) * 1024 * 1024)
    add_image_service(ImageServicer(catalog, data, rendered), server)
    sharing = Sharing(
        catalog, image_repository, member_repository, blobs, tokens, settings.max_image_members
    )
    sharing_pb2_grpc.add_SharingServiceServicer_to_server(
        SharingServicer(sharing, rendered), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = await listen(server, settings, database, closing)
    enable_reflection(server, services)
    return await begin_serving(
        settings, database, server, health_servicer, port, authority, closing, metrics,
        HealthMonitor(health_servicer, checks, needs, settings.health_check_seconds),
    )  # fmt: skip
