"""activities.context.heartbeating: a blocking call keeps its activity alive, in a synchronous activity (a helper
thread) and in an asynchronous one (a task on its event loop); outside an activity it does nothing."""

from __future__ import annotations

import asyncio
import time

from temporalio.testing import ActivityEnvironment

from activities.context import heartbeating


def test_a_synchronous_activity_heartbeats_while_it_blocks():
    beats: list = []
    env = ActivityEnvironment()
    env.on_heartbeat = lambda *d: beats.append(d)

    def blocking() -> str:
        with heartbeating("writing", every=0.05):
            time.sleep(0.4)
        n = len(beats)
        time.sleep(0.2)
        assert len(beats) == n  # stopped with the block
        return "ok"

    assert env.run(blocking) == "ok"
    assert len(beats) >= 3 and beats[0] == ("writing",)


async def test_an_asynchronous_activity_heartbeats_while_it_awaits():
    beats: list = []
    env = ActivityEnvironment()
    env.on_heartbeat = lambda *d: beats.append(d)

    async def awaiting() -> str:
        async with heartbeating("reading the rules", every=0.05):
            await asyncio.to_thread(time.sleep, 0.4)
        n = len(beats)
        await asyncio.sleep(0.2)
        assert len(beats) == n
        return "ok"

    assert await env.run(awaiting) == "ok"
    assert len(beats) >= 3 and beats[0] == ("reading the rules",)


async def test_outside_an_activity_nothing_happens():
    with heartbeating("x", every=0.01):
        time.sleep(0.05)
    async with heartbeating("x", every=0.01):
        await asyncio.sleep(0.05)
