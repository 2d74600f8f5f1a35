"""An abort while the canary's creation is running (blocked, heartbeating): the activity is cancelled, the undo
removes whatever it made, stable keeps 100 %. In its own module: a cancelled activity leaves the time-skipping
server's clock locked for a while, which would slow the other tests' skipped waits down to real time."""

from __future__ import annotations

import asyncio
import threading

from opsflow.client import send_update
from opsflow.contracts.rollout import K8S_CREATE_CANARY, K8S_DELETE_CANARY, K8S_SET_WEIGHT, ROUTER_SET_WEIGHT
from tests.workflow.test_canary_workflow import (  # noqa: F401
    OLD,
    approve_quorum,
    cluster,
    failed,
    make_inventory,
    start,
    until,
    worker,
)
from workflows.procedure import Procedure, Request


async def test_abort_while_the_canary_is_being_created(env, worker, cluster):  # noqa: F811
    cluster.block[K8S_CREATE_CANARY.name] = threading.Event()
    started = cluster.started.setdefault(K8S_CREATE_CANARY.name, threading.Event())
    w = worker[1]
    async with w[0], w[1], w[2]:
        handle = await start(env, worker, make_inventory(), auto_promote=True)
        await approve_quorum(handle)
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
        await send_update(handle, Procedure.abort, Request(by="alice", reason="wrong image"))
        report = await failed(handle)
    assert report.status == "aborted" and report.rolled_back
    assert cluster.canary_image is None and cluster.weights == {"web": 100} and cluster.stable_image == OLD
    assert K8S_DELETE_CANARY.name in cluster.calls and K8S_SET_WEIGHT.name not in cluster.calls
    assert ROUTER_SET_WEIGHT.name not in cluster.calls
