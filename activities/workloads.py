"""The app's workload, chosen by the inventory's `workload` (this is the one place): a Kubernetes Deployment by
default (activities/kubernetes.py: `<app>-canary` copied from stable's spec, replicas following its weight), or
instances on a host (`workload.kind: host`, activities/host_workload.py: the inventory's start/check/stop commands,
one instance per role).

The workflow calls the same declared activities (k8s.rollout_status, k8s.create_canary, k8s.scale_canary,
k8s.delete_canary, k8s.set_image) whatever the kind; their names stay as runs recorded them. A host workload's
activities run on its queue (`workload.queue`, else the router's: the worker on the NGINX host), others on the
region's.
"""

from __future__ import annotations

from temporalio.exceptions import ApplicationError

from activities import kubernetes
from activities.host_workload import HostInstances
from activities.rules import RULEBOOK
from opsflow.contracts.rollout import (
    K8S_CREATE_CANARY,
    K8S_DELETE_CANARY,
    K8S_ROLLOUT_STATUS,
    K8S_SCALE_CANARY,
    K8S_SET_IMAGE,
)
from opsflow.rollout import ImageRequest, RolloutState, RolloutTarget, WeightRequest


def host_instances(target: RolloutTarget) -> HostInstances | None:
    """The host workload's instances, or None for a Deployment. The commands must be the ones the worker's own
    inventory gives an app: a run cannot bring a command of its own to the host."""
    if target.app.workload is None:
        return None
    inv = RULEBOOK.get(target.environment)
    if inv is not None and (inv.rollout is None or all(
            app.workload != target.app.workload for app in inv.rollout.apps.values())):
        raise ApplicationError(f"workload {target.app.workload!r} is not one of {target.environment}'s inventory on "
                               "this worker", type="NotTrusted", non_retryable=True)
    return HostInstances(target)  # not an environment this worker holds: the trust interceptor decides


@K8S_ROLLOUT_STATUS.implementation
def rollout_status(target: RolloutTarget) -> RolloutState:
    """Stable (image, readiness), canary (if any), and for a Deployment its router weights and colours. No change."""
    host = host_instances(target)
    return host.state() if host else kubernetes.rollout_status(target)


@K8S_CREATE_CANARY.implementation
def create_canary(req: ImageRequest) -> RolloutState:
    """The canary (or the fresh baseline: `canary_suffix`) with the image, waited until ready."""
    host = host_instances(req.target)
    return host.create(req.image) if host else kubernetes.create_canary(req)


@K8S_SCALE_CANARY.implementation
def scale_canary(req: WeightRequest) -> RolloutState:
    """Capacity for the weight: a Deployment's replicas follow it; a host's one instance is checked ready."""
    host = host_instances(req.target)
    return host.size() if host else kubernetes.scale_canary(req)


@K8S_DELETE_CANARY.implementation
def delete_canary(target: RolloutTarget) -> RolloutState:
    """Remove the canary (or the fresh baseline); nothing to remove is success. Stable is never touched."""
    host = host_instances(target)
    return host.remove() if host else kubernetes.delete_canary(target)


@K8S_SET_IMAGE.implementation
def set_image(req: ImageRequest) -> RolloutState:
    """The promotion: stable gets the image, waited until it serves it."""
    host = host_instances(req.target)
    return host.promote(req.image) if host else kubernetes.set_image(req)
