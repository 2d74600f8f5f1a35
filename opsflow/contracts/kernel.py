"""What the kernel asks the worker: its rules (the inventory) and which task queues no worker serves."""

from __future__ import annotations

from opsflow.contracts.base import HEARTBEATS, Activity
from opsflow.rules import RulesRequest, WorkerRules

RULES_INVENTORY = Activity("rules.inventory", RulesRequest, WorkerRules, heartbeat=HEARTBEATS)
# Bounded at 10 s by its callers (one DescribeTaskQueue per queue): a heartbeat timeout would not shorten it.
TEMPORAL_UNSERVED_QUEUES = Activity("temporal.unserved_queues", list[str], list[str])
