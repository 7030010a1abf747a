"""Requests the end-to-end, security and telemetry tests build again and
again, with the values they share (the public CentOS image, the s4 flavor)."""

from __future__ import annotations

from typing import Any

from bms.image.v1 import provisioning_pb2
from support.builders import CENTOS_IMAGE, S4_FLAVOR

#: The flavor every deployment of these tests uses, as a resource name.
S4 = f"flavors/{S4_FLAVOR}"


def create_servers(
    prefix: str, count: int = 1, *, image: str = CENTOS_IMAGE, flavor: str = S4, **fields: Any
) -> provisioning_pb2.CreateServersRequest:
    """`count` servers named `<prefix>-<n>` from `image` on `flavor`; `fields`
    sets the rest (boot_source, user_data, ...)."""
    return provisioning_pb2.CreateServersRequest(
        flavor=flavor, image=image, count=count, name_prefix=prefix, **fields
    )
