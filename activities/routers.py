"""The rollout's routers, one interface chosen by the inventory's `router.kind` (this is the one place):

- `httproute` (the default): a Gateway API HTTPRoute's backendRef weights (activities/kubernetes.py);
- `nginx`: plain NGINX, the upstream file on the host rewritten, tested and reloaded (activities/nginx.py);
- `traffic-manager`: Azure Traffic Manager endpoint weights, weighted routing (activities/azure/traffic_manager.py).

A router knows shares by role (stable, canary, baseline; percent), reads them and sets them; setting is
idempotent (look, then act). The activities run on the router's queue when the inventory names one (the worker
on the NGINX host), else on the app's region queue.
"""

from __future__ import annotations

from typing import Protocol

from temporalio.exceptions import ApplicationError

from activities import kubernetes
from activities.azure.traffic_manager import TrafficManagerWeights
from activities.nginx import NginxSplit
from activities.rules import RULEBOOK
from opsflow.contracts.rollout import ROUTER_SET_WEIGHT, ROUTER_STATUS
from opsflow.rollout import NginxRouter, RolloutTarget, RouterRef, RouterState, TrafficManagerRouter, WeightRequest


class Router(Protocol):
    name: str

    def shares(self) -> dict[str, int]: ...

    def set(self, shares: dict[str, int]) -> dict[str, int]: ...


class HttpRouteSplit:
    def __init__(self, target: RolloutTarget):
        assert isinstance(target.app.router, RouterRef)
        self.target, self.name = target, f"httproute {target.app.router.name}"

    def shares(self) -> dict[str, int]:
        return kubernetes.httproute_shares(self.target)

    def set(self, shares: dict[str, int]) -> dict[str, int]:
        kubernetes.httproute_set_shares(self.target, shares)
        return self.shares()


class TrafficManagerSplit:
    def __init__(self, target: RolloutTarget):
        assert isinstance(target.app.router, TrafficManagerRouter)
        self.tm = TrafficManagerWeights(target.app.router, target.azure)
        self.name = self.tm.resource

    def shares(self) -> dict[str, int]:
        return self.tm.shares()

    def set(self, shares: dict[str, int]) -> dict[str, int]:
        if shares.get("baseline"):
            raise ApplicationError("the traffic-manager router has no baseline endpoint", type="BadInput",
                                   non_retryable=True)
        return self.tm.set({role: shares.get(role, 0) for role in ("stable", "canary")})


def _the_workers(target: RolloutTarget) -> None:
    """The router must be one the worker's inventory gives an app (the NGINX router runs its commands on the host):
    a run cannot bring a router, or a command, of its own."""
    inv = RULEBOOK.get(target.environment)
    if inv is None:
        return  # not an environment this worker holds: the trust interceptor decides (worker/trust.py)
    if inv.rollout is None or all(app.router != target.app.router for app in inv.rollout.apps.values()):
        raise ApplicationError(f"router {target.app.router!r} is not one of {target.environment}'s inventory on this "
                               "worker", type="NotTrusted", non_retryable=True)


def router_for(target: RolloutTarget) -> Router:
    _the_workers(target)
    r = target.app.router
    if isinstance(r, RouterRef):
        return HttpRouteSplit(target)
    if isinstance(r, NginxRouter):
        return NginxSplit(r)
    if isinstance(r, TrafficManagerRouter):
        return TrafficManagerSplit(target)
    raise ApplicationError(f"app {target.app.deployment} has no router in the inventory: a canary needs one",
                           type="BadInput", non_retryable=True)


def _state(target: RolloutTarget, router: Router, shares: dict[str, int]) -> RouterState:
    kind = target.app.router.kind if target.app.router else "?"
    return RouterState(kind=kind, router=router.name, weights=shares,
                       detail=", ".join(f"{role} {w}%" for role, w in shares.items()))


@ROUTER_STATUS.implementation
def router_status(target: RolloutTarget) -> RouterState:
    """What the router sends where now, by role. No change."""
    router = router_for(target)
    return _state(target, router, router.shares())


@ROUTER_SET_WEIGHT.implementation
def router_set_weight(req: WeightRequest) -> RouterState:
    """`canary_weight` % to the canary (and as much to a fresh baseline), the rest to stable; a role at 0 % gets
    nothing (its servers down, its endpoint disabled, its backendRef at 0)."""
    router = router_for(req.target)
    return _state(req.target, router, router.set(req.shares()))
