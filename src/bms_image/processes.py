"""The two processes bms-image runs, each started by its own composition
root: the image service (by default with the provisioner embedded on its
port, for `make run`) and the provisioner on its own. The only module that
knows both."""

from __future__ import annotations

from bms_image.common.config import Settings
from bms_image.common.serving import RunningService
from bms_image.common.telemetry.tracing import Tracing
from bms_image.fleet import bootstrap as fleet_bootstrap
from bms_image.images import bootstrap as images_bootstrap


async def start(settings: Settings, tracing: Tracing | None = None) -> RunningService:
    """The image service; settings.provisioner says whether the fleet runs
    inside it. `tracing`: spans of its calls and the fleet's (None: off)."""
    return await images_bootstrap.start(settings, embed=fleet_bootstrap.embed, tracing=tracing)


async def start_provisioner(settings: Settings, tracing: Tracing | None = None) -> RunningService:
    """The provisioner as its own process."""
    return await fleet_bootstrap.start(settings, tracing=tracing)
