"""Transport security: TLS and mutual TLS on the service's port, for people
(a plaintext client is refused, a client certificate from the wrong CA too)
and for the provisioner, embedded or as its own process."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from certificates import Authority, Issued, authority, issue
from grpc_health.v1 import health_pb2, health_pb2_grpc
from typer.testing import CliRunner, Result

from bms.image.v1 import image_pb2, image_pb2_grpc, provisioning_pb2
from bms_image.cli import app
from bms_image.common.config import Settings
from bms_image.common.serving import RunningService
from bms_image.common.tls import image_service_credentials, server_credentials
from bms_image.processes import start, start_provisioner
from support.server_requests import create_servers
from support.services import ProvisioningStub, make_settings
from support.tokens import bearer

REFUSED = grpc.StatusCode.UNAVAILABLE


@dataclass(frozen=True)
class Pki:
    ca: Authority
    server: Issued
    client: Issued
    rogue_client: Issued


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    directory = tmp_path / "pki"
    directory.mkdir()
    ca = authority(directory, "bms-test-ca")
    rogue = authority(directory, "rogue-ca")
    return Pki(
        ca=ca,
        server=issue(directory, ca, "image-service", server=True),
        client=issue(directory, ca, "operator", server=False),
        rogue_client=issue(directory, rogue, "intruder", server=False),
    )


def tls_settings(tmp_path: Path, pki: Pki, *, mutual: bool, **overrides: object) -> Settings:
    return make_settings(
        tmp_path,
        tls_cert_file=str(pki.server.cert),
        tls_key_file=str(pki.server.key),
        tls_client_ca_file=str(pki.ca.cert) if mutual else "",
        **overrides,
    )


@pytest.fixture
async def tls_service(tmp_path: Path, pki: Pki) -> AsyncIterator[RunningService]:
    running = await start(tls_settings(tmp_path, pki, mutual=False))
    yield running
    await running.stop(0)


@pytest.fixture
async def mtls_service(tmp_path: Path, pki: Pki) -> AsyncIterator[RunningService]:
    running = await start(tls_settings(tmp_path, pki, mutual=True))
    yield running
    await running.stop(0)


def secure(service: RunningService, pki: Pki, client: Issued | None = None) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert.read_bytes(),
        private_key=client.key.read_bytes() if client else None,
        certificate_chain=client.cert.read_bytes() if client else None,
    )
    return grpc.aio.secure_channel(service.address, credentials)


async def health_code(channel: grpc.aio.Channel) -> grpc.StatusCode:
    """OK when the health check answers SERVING, else the call's status code."""
    async with channel:
        try:
            answer = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        except grpc.aio.AioRpcError as error:
            return error.code()
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        return grpc.StatusCode.OK


def token(service: RunningService, project: str = "alpha") -> tuple[tuple[str, str]]:
    return bearer(service.authority.issue(project))


async def test_tls_port_serves_tls_clients_and_refuses_plaintext(
    tls_service: RunningService, pki: Pki
) -> None:
    assert await health_code(grpc.aio.insecure_channel(tls_service.address)) == REFUSED
    assert await health_code(secure(tls_service, pki)) == grpc.StatusCode.OK
    async with secure(tls_service, pki) as channel:
        page = await image_pb2_grpc.ImageServiceStub(channel).ListImages(
            image_pb2.ListImagesRequest(), metadata=token(tls_service)
        )
    assert page.images, "the public catalog is listed over TLS"


async def test_tls_still_requires_a_token(tls_service: RunningService, pki: Pki) -> None:
    async with secure(tls_service, pki) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await image_pb2_grpc.ImageServiceStub(channel).ListImages(image_pb2.ListImagesRequest())
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_mutual_tls_accepts_only_client_certificates_of_its_ca(
    mtls_service: RunningService, pki: Pki
) -> None:
    assert await health_code(grpc.aio.insecure_channel(mtls_service.address)) == REFUSED
    assert await health_code(secure(mtls_service, pki)) == REFUSED, "no client certificate"
    assert await health_code(secure(mtls_service, pki, pki.rogue_client)) == REFUSED
    assert await health_code(secure(mtls_service, pki, pki.client)) == grpc.StatusCode.OK


async def deploy_one(channel: grpc.aio.Channel, metadata: tuple[tuple[str, str]]) -> int:
    """The last stage of a one-server CreateServers stream."""
    stream = ProvisioningStub(channel).CreateServers(
        create_servers("tls", boot_source=provisioning_pb2.BOOT_SOURCE_LOCAL_DISK),
        metadata=metadata,
        timeout=60,
    )
    events = [event async for event in stream]
    assert events, "the deployment streamed no event"
    return events[-1].stage


async def test_embedded_provisioner_deploys_behind_mutual_tls(
    mtls_service: RunningService, pki: Pki
) -> None:
    """The embedded fleet fetches images over the service's private socket,
    so a port that requires client certificates does not lock it out."""
    async with secure(mtls_service, pki, pki.client) as channel:
        stage = await deploy_one(channel, token(mtls_service))
    assert stage == provisioning_pb2.PROVISIONING_STAGE_ACTIVE


async def test_separate_provisioner_fetches_images_over_mutual_tls(
    tmp_path: Path, pki: Pki
) -> None:
    database_url = f"sqlite:///{tmp_path / 'shared.db'}"
    images = await start(
        tls_settings(
            tmp_path / "images", pki, mutual=True, provisioner="none", database_url=database_url
        )
    )
    fleet_identity = issue(tmp_path / "pki", pki.ca, "provisioner", server=False)
    try:
        fleet = await start_provisioner(
            make_settings(
                tmp_path / "fleet",
                database_url=database_url,
                image_service=images.address,
                image_service_ca_file=str(pki.ca.cert),
                image_service_cert_file=str(fleet_identity.cert),
                image_service_key_file=str(fleet_identity.key),
            )
        )
        try:
            async with grpc.aio.insecure_channel(fleet.address) as channel:
                stage = await deploy_one(channel, token(fleet))
        finally:
            await fleet.stop(0)
    finally:
        await images.stop(0)
    assert stage == provisioning_pb2.PROVISIONING_STAGE_ACTIVE


def test_tls_settings_are_checked_with_a_message_that_says_what_to_fix(
    tmp_path: Path, pki: Pki
) -> None:
    with pytest.raises(RuntimeError, match="both tls_cert_file and tls_key_file"):
        server_credentials(make_settings(tmp_path, tls_cert_file=str(pki.server.cert)))
    with pytest.raises(RuntimeError, match="mutual TLS is TLS first"):
        server_credentials(make_settings(tmp_path, tls_client_ca_file=str(pki.ca.cert)))
    with pytest.raises(RuntimeError, match=r"cannot read tls_key_file .*BMS_IMAGE_TLS_KEY_FILE"):
        server_credentials(
            make_settings(
                tmp_path, tls_cert_file=str(pki.server.cert), tls_key_file=str(tmp_path / "nope")
            )
        )
    with pytest.raises(RuntimeError, match="needs its CA"):
        image_service_credentials(
            make_settings(tmp_path, image_service_cert_file=str(pki.client.cert))
        )
    assert server_credentials(make_settings(tmp_path)) is None
    assert image_service_credentials(make_settings(tmp_path)) is None


async def test_a_bad_tls_setting_stops_the_start_and_frees_the_database(
    tmp_path: Path, pki: Pki
) -> None:
    with pytest.raises(RuntimeError, match="cannot listen"):
        await start(make_settings(tmp_path, tls_cert_file=str(pki.server.cert)))
    # The failed start closed what it opened: a new start on the same data works.
    running = await start(make_settings(tmp_path))
    await running.stop(0)


async def test_the_cli_speaks_mutual_tls_with_its_certificate_flags(
    mtls_service: RunningService, pki: Pki
) -> None:
    environment = {
        "BMS_IMAGE_ADDRESS": mtls_service.address,
        "BMS_IMAGE_TOKEN": mtls_service.authority.issue("alpha"),
        "BMS_IMAGE_CA_CERT": str(pki.ca.cert),
        "NO_COLOR": "1",
    }

    def run(*extra: str) -> Result:
        return CliRunner().invoke(app, ["images", *extra, "list", "--json"], env=environment)

    accepted = await asyncio.to_thread(
        run, "--client-cert", str(pki.client.cert), "--client-key", str(pki.client.key)
    )
    assert accepted.exit_code == 0, accepted.stderr
    assert json.loads(accepted.stdout)["images"]
    refused = await asyncio.to_thread(run)  # TLS, but no client certificate
    assert refused.exit_code == 1
    assert refused.stderr.startswith("error: UNAVAILABLE")
