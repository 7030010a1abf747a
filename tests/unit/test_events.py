"""EventBus: followers get every event of their servers from the first,
live, until each server's work ends; an event wakes only the followers of
its server; nothing is left registered once a follower goes."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from bms_image.fleet.domain.events import EventBus
from bms_image.fleet.domain.servers import ProvisioningStage, ServerEvent, ServerState


def event(server_id: str, stage: ProvisioningStage) -> ServerEvent:
    state = ServerState.ACTIVE if stage is ProvisioningStage.ACTIVE else ServerState.BUILDING
    return ServerEvent(server_id, stage, state, stage.value, datetime.now(UTC))


async def collect(bus: EventBus, *server_ids: str) -> list[tuple[str, ProvisioningStage]]:
    return [(e.server_id, e.stage) async for e in bus.follow(server_ids)]


async def test_a_follower_gets_the_past_then_live_events_until_each_server_ends() -> None:
    bus = EventBus()
    await bus.publish(event("a", ProvisioningStage.VALIDATING))
    follower = asyncio.create_task(collect(bus, "a", "b"))
    await asyncio.sleep(0)
    await bus.publish(event("b", ProvisioningStage.VALIDATING))
    await bus.publish(event("a", ProvisioningStage.ACTIVE))
    await asyncio.sleep(0)
    assert not follower.done(), "b has not ended yet"
    await bus.publish(event("b", ProvisioningStage.ACTIVE))
    got = await asyncio.wait_for(follower, 5)
    assert got == [
        ("a", ProvisioningStage.VALIDATING),
        ("a", ProvisioningStage.ACTIVE),
        ("b", ProvisioningStage.VALIDATING),
        ("b", ProvisioningStage.ACTIVE),
    ] or got == [
        ("a", ProvisioningStage.VALIDATING),
        ("b", ProvisioningStage.VALIDATING),
        ("a", ProvisioningStage.ACTIVE),
        ("b", ProvisioningStage.ACTIVE),
    ]
    assert bus.knows("a") and not bus.in_progress("a")
    assert bus._followers == {}


async def test_an_event_wakes_only_the_followers_of_its_server() -> None:
    bus = EventBus()
    for server_id in ("a", "b"):
        await bus.publish(event(server_id, ProvisioningStage.VALIDATING))
    follower = bus.follow(["a"])
    assert (await anext(follower)).server_id == "a"
    waiting = asyncio.create_task(anext(follower))
    await asyncio.sleep(0)
    (wake,) = bus._followers["a"]
    assert "b" not in bus._followers
    await bus.publish(event("b", ProvisioningStage.FIRST_BOOT))
    assert not wake.is_set() and not waiting.done()
    await bus.publish(event("a", ProvisioningStage.FIRST_BOOT))
    assert (await asyncio.wait_for(waiting, 5)).stage is ProvisioningStage.FIRST_BOOT
    await follower.aclose()
    assert bus._followers == {}, "a follower that went away is forgotten"
