"""Which rules a procedure runs by: the worker's inventory, never one from the workflow input.

The worker is the trust anchor (README "Who decides the rules"): it is deployed with its inventories, and a
procedure acts only on those. A person's CLI holds a copy of an inventory only to show plans and to say which
version of the rules they saw: the input carries the environment's name and an `InventoryDigest` of that copy.
The workflow takes the worker's inventory (an activity on the worker, so the history records it and a replay
reads it back) and refuses, before changing anything, a start whose digest differs, naming what differs
("approval.approvers", "regions.eastus.database.dsn"), so an honest person with a stale file knows to update it.

The digest is a sha256 over the inventory's canonical JSON plus one short hash per setting (mappings are walked
down to their leaves; a list is one setting). Nothing in an inventory is secret (secrets are references), and
the per-setting hashes only let the worker say *which* settings differ. Pure and deterministic: it runs inside
workflows too.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, model_validator

from opsflow.inventory import Inventory

# Read once at load time from the clock or a file, so two loads of the same file differ here: an .ics calendar is
# compared by its file's content (FreezeCalendar.sha256), not by its expanded events or the range they cover.
_LOAD_TIME_KEYS = {"events", "covered_from", "covered_until"}


class InventoryDigest(BaseModel):
    sha256: str
    parts: dict[str, str] = {}  # setting path -> short hash of its value


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str).encode()


def _strip_load_time(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_load_time(v) for k, v in value.items() if k not in _LOAD_TIME_KEYS}
    if isinstance(value, list):
        return [_strip_load_time(v) for v in value]
    return value


def _leaves(value: Any, path: str, out: dict[str, str]) -> None:
    if isinstance(value, dict):  # an empty mapping has no settings to name (an added one is named itself)
        for k, v in value.items():
            _leaves(v, f"{path}.{k}" if path else str(k), out)
    else:
        out[path] = hashlib.sha256(_canonical(value)).hexdigest()[:16]


def canonical_inventory(inventory: BaseModel) -> dict[str, Any]:
    return _strip_load_time(inventory.model_dump(mode="json"))


def digest_of(inventory: BaseModel) -> InventoryDigest:
    data = canonical_inventory(inventory)
    parts: dict[str, str] = {}
    _leaves(data, "", parts)
    return InventoryDigest(sha256=hashlib.sha256(_canonical(data)).hexdigest(), parts=parts)


def differences(worker: InventoryDigest, seen: InventoryDigest) -> list[str]:
    """The settings whose values differ between the worker's inventory and the one the requester saw."""
    if worker.sha256 == seen.sha256:
        return []
    if not seen.parts:
        return ["(the whole inventory: the start carried only its sha256)"]
    names = sorted(set(worker.parts) | set(seen.parts))
    found = [n for n in names if worker.parts.get(n) != seen.parts.get(n)]
    return found or ["(the inventory as a whole)"]


def mismatch_message(environment: str, diffs: list[str], worker_sha: str) -> str:
    shown = ", ".join(diffs[:12]) + (f" and {len(diffs) - 12} more" if len(diffs) > 12 else "")
    return (f"your inventory of {environment} differs from the worker's (the rules this procedure would run by) in: "
            f"{shown}. Nothing was changed. Update your copy from the reviewed source the workers read "
            f"(worker's inventory sha256 {worker_sha[:12]}) and start again")


# Input fields a start signature does not bind: what the client adds after the requester signed.
START_UNSIGNED = frozenset({"preempted", "inventory"})


def input_digest(arg: BaseModel | dict[str, Any], exclude: set[str] | frozenset[str] = frozenset()) -> str:
    """sha256 of a procedure input's canonical JSON: what a start signature binds (all of it but `exclude`)."""
    data = arg.model_dump(mode="json") if isinstance(arg, BaseModel) else dict(arg)
    return hashlib.sha256(_canonical({k: v for k, v in data.items() if k not in exclude})).hexdigest()


# -- what a procedure's input says about its rules, and what the worker answers ----------------------------------


class ProcedureInput(BaseModel):
    """What every procedure's input starts with: the environment it acts on and the digest of the inventory the
    requester saw. `inventory` is the shape of inputs recorded before the worker held the rules (replayed from
    their histories as they were); in a new run only its digest is used, never its rules."""

    environment: str = ""
    inventory_digest: InventoryDigest | None = None
    inventory: Inventory | None = None

    @model_validator(mode="after")
    def _named(self) -> "ProcedureInput":
        if not self.environment:
            if self.inventory is None:
                raise ValueError("the input names no environment (environment: NAME)")
            self.environment = self.inventory.environment
        return self

    def seen_digest(self) -> InventoryDigest | None:
        if self.inventory_digest is not None:
            return self.inventory_digest
        return digest_of(self.inventory) if self.inventory is not None else None

    def without_rules(self, inventory: Inventory) -> "ProcedureInput":
        """The input a client sends: the environment and the digest of its copy of the inventory, no rules."""
        return self.model_copy(update={"inventory": None, "environment": inventory.environment,
                                       "inventory_digest": digest_of(inventory)})


class RulesRequest(BaseModel):
    environments: dict[str, InventoryDigest | None]  # environment -> the digest the requester saw (None: not checked)
    start_nonce: str | None = None  # the start signature's nonce: refused if another run of this workflow id used it


class EnvironmentRules(BaseModel):
    environment: str
    inventory: Inventory | None = None  # None: refused (see `refusal`)
    refusal: str | None = None
    sha256: str = ""


class WorkerRules(BaseModel):
    environments: list[EnvironmentRules]
    worker: str = ""  # the worker's identity, for the report
