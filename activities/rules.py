"""The worker's own rules: the inventories it was deployed with, handed to the procedures it runs.

A procedure asks for its environment's inventory first thing (`rules.inventory`, on its workflow task queue);
the answer is recorded in its history, so a replay reads the same rules. The files are read again when they
change (a reviewed git repository pulled beside the worker, a ConfigMap update), so new rules apply to procedures
started after the change; a file that no longer validates keeps the last good rules and is logged."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

from temporalio import activity

from activities.context import heartbeating
from opsflow.contracts.kernel import RULES_INVENTORY
from opsflow.inventory import Inventory, InventoryError, load_inventory
from opsflow.rules import EnvironmentRules, RulesRequest, WorkerRules, differences, digest_of, mismatch_message
from opsflow.signing import START_MEMO

log = logging.getLogger("opsflow.rules")

# A start signature is good for signing.FRESHNESS (5 min) either way: runs of the same workflow id started within
# this long are searched for the same nonce.
NONCE_LOOKBACK = timedelta(minutes=15)


class Rulebook:
    """environment -> the worker's inventory (and the file it came from, re-read when it changes)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inventories: dict[str, Inventory] = {}
        self._files: dict[str, tuple[Path, float]] = {}

    def add(self, inventory: Inventory, path: str | Path | None = None) -> None:
        with self._lock:
            self._inventories[inventory.environment] = inventory
            if path is not None:
                p = Path(path)
                self._files[inventory.environment] = (p, p.stat().st_mtime)

    def load(self, paths: list[str | Path]) -> list[Inventory]:
        inventories = [load_inventory(p) for p in paths]
        for p, inv in zip(paths, inventories):
            self.add(inv, p)
        return inventories

    def environments(self) -> list[str]:
        with self._lock:
            return sorted(self._inventories)

    def get(self, environment: str) -> Inventory | None:
        with self._lock:
            inv, source = self._inventories.get(environment), self._files.get(environment)
        if source is None:
            return inv
        path, mtime = source
        try:
            now = path.stat().st_mtime
        except OSError:
            return inv  # the file is gone for a moment (a git checkout): the last good rules hold
        if now == mtime:
            return inv
        try:
            fresh = load_inventory(path)
        except InventoryError as e:
            log.error("inventory %s changed but is invalid; keeping the last good rules: %s", path, e)
            return inv
        if fresh.environment != environment:
            log.error(
                "inventory %s now describes %s, not %s; keeping the last good rules",
                path,
                fresh.environment,
                environment,
            )
            return inv
        log.info("inventory %s changed: new rules for %s", path, environment)
        self.add(fresh, path)
        return fresh


RULEBOOK = Rulebook()


def rules_for(environment: str, seen) -> EnvironmentRules:
    inv = RULEBOOK.get(environment)
    if inv is None:
        served = ", ".join(RULEBOOK.environments()) or "none"
        return EnvironmentRules(
            environment=environment,
            refusal=(
                f"the worker serving this procedure holds no inventory for environment {environment!r} (it holds: "
                f"{served}); a procedure runs only by the rules its worker was deployed with"
            ),
        )
    mine = digest_of(inv)
    if seen is not None:
        diffs = differences(mine, seen)
        if diffs:
            return EnvironmentRules(
                environment=environment, refusal=mismatch_message(environment, diffs, mine.sha256), sha256=mine.sha256
            )
    return EnvironmentRules(environment=environment, inventory=inv, sha256=mine.sha256)


async def nonce_used_elsewhere(nonce: str) -> str | None:
    """The run id of another run of this workflow id whose start signature carries `nonce`, if any."""
    info = activity.info()
    client = activity.client()
    since = (datetime.now(timezone.utc) - NONCE_LOOKBACK).strftime("%Y-%m-%dT%H:%M:%SZ")
    query = f"WorkflowId = '{info.workflow_id}' AND StartTime > '{since}'"
    async for execution in client.list_workflows(query):
        if execution.run_id == info.workflow_run_id:
            continue
        memo = await execution.memo()
        signed = memo.get(START_MEMO) if isinstance(memo, dict) else None
        if isinstance(signed, dict) and signed.get("nonce") == nonce:
            return execution.run_id
    return None


@RULES_INVENTORY.implementation
async def worker_inventory(req: RulesRequest) -> WorkerRules:
    """The worker's inventory for each environment asked, or why the start is refused (a digest that differs
    names the settings; an environment this worker does not hold; a start signature already used)."""
    async with heartbeating("reading the rules"):  # a worker lost meanwhile costs the heartbeat timeout
        # Reading an inventory file that changed is blocking I/O: off the worker's event loop.
        out = [await asyncio.to_thread(rules_for, env, seen) for env, seen in req.environments.items()]
        if req.start_nonce and all(r.inventory is not None for r in out):
            used_by = await nonce_used_elsewhere(req.start_nonce)
            if used_by:
                refusal = f"replayed start signature: run {used_by} was already started with it"
                for r in out:
                    r.inventory, r.refusal = None, refusal
    return WorkerRules(environments=out, worker=f"{os.getpid()}@{os.uname().nodename}")
