"""The inventory's `alerts:` section: which alerts may request which procedure (`opsflow alert-receiver`).

    alerts:
      requester: alertmanager          # who the receiver starts procedures as (an operator, never an approver)
      routes:
        - alertname: RegionDegraded
          match: {region: eastus}      # labels the alert must carry, with these values
          procedure: failover          # a planned failover: it changes nothing before a person approves it
          to: westeurope               # or to_label: the alert's label naming the target region

In the inventory, not a file of the receiver's: the routes are rules the team reviews, and the receiver's copy is
bound to the worker's like any requester's (the start carries its digest; a differing copy is refused, naming
`alerts.routes`). A section added after inventories had digests: absent, it is left out of the inventory's
serialised form (opsflow/inventory.py `LATE_SECTIONS`), so an inventory without it keeps its digest.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from opsflow.sections import Strict

# What an alert may request: only a planned failover, which waits at its approval gate before changing anything.
REQUESTABLE = ("failover",)


class AlertRoute(Strict):
    alertname: str = Field(min_length=1)
    match: dict[str, str] = {}
    procedure: Literal["failover"] = "failover"
    to: str | None = None
    to_label: str | None = None

    @model_validator(mode="after")
    def _target(self) -> "AlertRoute":
        if (self.to is None) == (self.to_label is None):
            raise ValueError(f"route for {self.alertname}: give exactly one of to (a region) or to_label (a label)")
        return self

    def matches(self, labels: dict[str, str]) -> bool:
        return labels.get("alertname") == self.alertname and all(labels.get(k) == v for k, v in self.match.items())

    def target(self, labels: dict[str, str]) -> str | None:
        return self.to or labels.get(self.to_label or "")


class AlertRouting(Strict):
    """Which alerts request a procedure, and as whom. The first route an alert matches is taken."""

    requester: str = Field(min_length=1, description="the receiver's name: an operator of the procedures it "
                                                     "requests (with ssh_key where starts are signed), not an approver")
    routes: list[AlertRoute] = Field(min_length=1)

    def route_for(self, labels: dict[str, str]) -> AlertRoute | None:
        return next((r for r in self.routes if r.matches(labels)), None)
