"""Kubernetes activities: the region's workloads, read and scaled through the `kubernetes` client.

Synchronous activities (the client blocks); the worker runs them on its thread pool.
Every call builds its own ApiClient from the region's ``KubernetesConfig`` (a kubeconfig
file and context, else the in-cluster service account, else the default kubeconfig),
so two regions' clusters never share state and nothing global is configured.

Errors: what retrying cannot fix is non-retryable and names the object (404 for a
deployment, service or namespace; 401/403; 400/422, a request the server rejects as
invalid); anything else (409, 429, 5xx, a cluster that does not answer) is retryable.
A deployment whose rollout reports ``ProgressDeadlineExceeded`` fails non-retryably:
the cluster has given up on it and a person must look.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Iterator

import urllib3
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from kubernetes.config import ConfigException, load_incluster_config, load_kube_config
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.context import heartbeat as _heartbeat
from activities.context import sleep_or_cancelled
from opsflow.contracts.k8s import (
    K8S_LOWER_AUTOSCALERS,
    K8S_SCALE_TO_ZERO,
    K8S_SCALE_UP,
    K8S_SET_MAINTENANCE,
    K8S_STATUS,
)
from opsflow.contracts.rollout import (
    K8S_CREATE_COLOUR,
    K8S_SCALE_DEPLOYMENT,
    K8S_SET_WEIGHT,
    K8S_SWITCH_SERVICE,
)
from opsflow.inventory import KubernetesConfig
from opsflow.models import (
    AutoscalerChange,
    AutoscalerResult,
    DeploymentState,
    FenceResult,
    KubeStatus,
    MaintenanceRequest,
    RegionTarget,
    ScaleRequest,
)
from opsflow.rollout import (
    BASELINE_SUFFIX,
    DeploymentRequest,
    ImageRequest,
    RolloutState,
    RolloutTarget,
    RouterRef,
    WeightRequest,
)

log = logging.getLogger(__name__)

MAINTENANCE_ANNOTATION = "maintenance"
REQUEST_TIMEOUT = (5.0, 30.0)  # (connect, read) seconds for every API call
POLL_SECONDS = 1.0  # how often scale_up looks at the rollout (and heartbeats)
DEFAULT_WAIT_SECONDS = 600.0  # scale_up's wait bound outside an activity, or without a start-to-close timeout
_MERGE_PATCH = "application/merge-patch+json"
# On an HPA a failover changed: its bounds before the first change, and whether they were raised or lowered, so a
# later failover (the failback) restores them. Removed when they are restored.
AUTOSCALER_BEFORE = "opsflow.dev/autoscaler-before"
# An old region's HPA floor after a failover, unless its inventory says otherwise (kubernetes.standby_min_replicas):
# it serves nothing, its HPA may scale it down.
LOWERED_MIN_REPLICAS = 1


def _logger() -> logging.LoggerAdapter | logging.Logger:
    return activity.logger if activity.in_activity() else log


# -- the client ---------------------------------------------------------------------------------------------


def _in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and os.path.exists(
        "/var/run/secrets/kubernetes.io/serviceaccount/token"
    )


# Throttling (429, with its Retry-After) and an API server's passing 5xx are retried inside the call, as the Azure SDK
# and boto3 do for theirs; only what persists reaches the activity's own retries. Every request opsflow sends is safe
# to repeat (reads, merge patches to a target state, creates that meet 409 when they already happened). Connection
# failures are retried once: an unreachable region must fail fast (the emergency fence).
TRANSIENT_RETRIES = urllib3.Retry(
    total=5,
    connect=1,
    read=1,
    status=4,
    backoff_factor=0.3,
    status_forcelist=(429, 502, 503, 504),
    allowed_methods=None,
    respect_retry_after_header=True,
    raise_on_status=False,
)


def new_api_client(cfg: KubernetesConfig) -> k8s.ApiClient:
    """A fresh ApiClient for one region: kubeconfig (+context), else in-cluster, else the default kubeconfig.

    The default kubeconfig is $KUBECONFIG or ~/.kube/config; a context without a kubeconfig
    path selects a context in the default kubeconfig.
    """
    conf = k8s.Configuration()
    try:
        if cfg.kubeconfig:
            path = os.path.expanduser(cfg.kubeconfig)
            if not os.path.exists(path):
                raise ConfigException(f"kubeconfig {path} does not exist")
            load_kube_config(config_file=path, context=cfg.context, client_configuration=conf, persist_config=False)
        elif cfg.context is None and _in_cluster():
            load_incluster_config(client_configuration=conf)
        else:
            load_kube_config(context=cfg.context, client_configuration=conf, persist_config=False)
    except ConfigException as e:
        where = f"kubeconfig {cfg.kubeconfig or '(default)'}" + (f", context {cfg.context}" if cfg.context else "")
        raise ApplicationError(
            f"kubernetes: cannot load {where}: {e}", type="KubernetesConfigError", non_retryable=True
        ) from None
    conf.retries = TRANSIENT_RETRIES
    return k8s.ApiClient(conf)


FENCE_REQUEST_TIMEOUT = (3, 10)  # connect, read: a dead region must not hold the emergency up


def _status_message(e: ApiException) -> str:
    """The API server's own words: the message of the Status object in the body."""
    try:
        body = json.loads(e.body or "")
        if isinstance(body, dict) and body.get("message"):
            return str(body["message"])
    except ValueError:
        pass
    return str(e.reason or "no message")


class _Cluster:
    """One region's cluster for the duration of one activity call."""

    def __init__(self, target: RegionTarget, cfg: KubernetesConfig, api: k8s.ApiClient):
        self.target, self.cfg, self.api = target, cfg, api
        self.apps = k8s.AppsV1Api(api)
        self.core = k8s.CoreV1Api(api)
        self.autoscaling = k8s.AutoscalingV2Api(api)
        self._hpas: list[k8s.V2HorizontalPodAutoscaler] | None = None
        self.ns = cfg.namespace
        ctx = f"context {cfg.context}, " if cfg.context else ""
        self.where = f"region {target.region} ({ctx}{api.configuration.host})"

    # -- errors ------------------------------------------------------------------------------------------
    @contextmanager
    def call(self, what: str, namespaced: bool = True) -> Iterator[None]:
        """Turn client errors into ApplicationErrors that name ``what`` (e.g. 'deployment shop/web')."""
        try:
            yield
        except ApiException as e:
            raise self._api_error(e, what, namespaced) from None
        except urllib3.exceptions.HTTPError as e:
            raise ApplicationError(
                f"{self.where}: the Kubernetes API does not answer ({type(e).__name__}: {e})",
                type="KubernetesUnavailable",
            ) from None

    def _api_error(self, e: ApiException, what: str, namespaced: bool) -> ApplicationError:
        code = e.status or 0
        msg = _status_message(e)
        details = {"status": code, "object": what, "message": msg}
        if code == 404:
            if namespaced and not self._namespace_exists():
                what = f"namespace {self.ns}"
                details["object"] = what
            return ApplicationError(
                f"{self.where}: {what} not found ({msg})", details, type="KubernetesNotFound", non_retryable=True
            )
        if code == 401:
            return ApplicationError(
                f"{self.where}: unauthorized for {what} ({msg}); check the kubeconfig credentials",
                details,
                type="KubernetesUnauthorized",
                non_retryable=True,
            )
        if code == 403:
            return ApplicationError(
                f"{self.where}: forbidden: {msg}", details, type="KubernetesForbidden", non_retryable=True
            )
        if code in (400, 422):
            return ApplicationError(
                f"{self.where}: {what}: the request was rejected ({code}: {msg})",
                details,
                type="KubernetesInvalid",
                non_retryable=True,
            )
        delay = None
        retry_after = (e.headers or {}).get("Retry-After") if e.headers else None
        if retry_after and str(retry_after).isdigit():
            delay = timedelta(seconds=int(retry_after))
        return ApplicationError(
            f"{self.where}: {what}: API error {code} ({msg})",
            details,
            type="KubernetesApiError",
            next_retry_delay=delay,
        )

    def _namespace_exists(self) -> bool:
        """Tell a missing namespace from a missing object; assume it exists when we may not look."""
        try:
            self.core.read_namespace(self.ns, _request_timeout=REQUEST_TIMEOUT)
            return True
        except ApiException as e:
            return e.status != 404
        except urllib3.exceptions.HTTPError:
            return True

    # -- reads -------------------------------------------------------------------------------------------
    def deployment(self, name: str) -> k8s.V1Deployment:
        with self.call(f"deployment {self.ns}/{name}"):
            return self.apps.read_namespaced_deployment(name, self.ns, _request_timeout=REQUEST_TIMEOUT)

    def rollouts(self) -> list["_Rollout"]:
        return [_Rollout.of(self.deployment(d.name)) for d in self.cfg.deployments]

    def not_ready_nodes(self) -> list[str]:
        """Names of nodes whose Ready condition is not True. [] when this identity may not list nodes."""
        try:
            with self.call("nodes", namespaced=False):
                nodes = self.core.list_node(_request_timeout=REQUEST_TIMEOUT).items
        except ApplicationError as e:
            if e.type == "KubernetesForbidden":  # a namespace-scoped service account: cannot judge nodes
                _logger().warning("%s: cannot list nodes (%s); node readiness not checked", self.where, e.message)
                return []
            raise
        bad = []
        for node in nodes:
            conds = {
                c.type: c.status for c in (node.status.conditions if node.status and node.status.conditions else [])
            }
            if conds.get("Ready") != "True":
                bad.append(node.metadata.name)
        return bad

    def maintenance(self) -> bool | None:
        if not self.cfg.service:
            return None
        with self.call(f"service {self.ns}/{self.cfg.service}"):
            svc = self.core.read_namespaced_service(self.cfg.service, self.ns, _request_timeout=REQUEST_TIMEOUT)
        return (svc.metadata.annotations or {}).get(MAINTENANCE_ANNOTATION) == "true"

    def status(self, rollouts: list["_Rollout"] | None = None) -> KubeStatus:
        rollouts = self.rollouts() if rollouts is None else rollouts
        not_ready = self.not_ready_nodes()
        if not_ready:
            _logger().info("%s: nodes not Ready: %s", self.where, ", ".join(not_ready))
        return KubeStatus(
            region=self.target.region,
            deployments=[r.state for r in rollouts],
            ready=all(r.done for r in rollouts) and not not_ready,
            maintenance=self.maintenance(),
            waiting=[r.waiting_for for r in rollouts if not r.done] + [f"node {n} not Ready" for n in not_ready],
        )

    # -- writes ------------------------------------------------------------------------------------------
    def set_maintenance(self, on: bool) -> None:
        name = self.cfg.service
        what = f"service {self.ns}/{name}"
        with self.call(what):
            svc = self.core.read_namespaced_service(name, self.ns, _request_timeout=REQUEST_TIMEOUT)
        annotations = svc.metadata.annotations or {}
        if on and annotations.get(MAINTENANCE_ANNOTATION) == "true":
            _logger().info("%s: %s already in maintenance", self.where, what)
            return
        if not on and MAINTENANCE_ANNOTATION not in annotations:
            _logger().info("%s: %s not in maintenance", self.where, what)
            return
        body = {"metadata": {"annotations": {MAINTENANCE_ANNOTATION: "true" if on else None}}}
        with self.call(what):
            self.core.patch_namespaced_service(
                name, self.ns, body, _content_type=_MERGE_PATCH, _request_timeout=REQUEST_TIMEOUT
            )
        _logger().info("%s: %s maintenance %s", self.where, what, "on" if on else "off")

    def scale_to_at_least(self, name: str, replicas: int) -> None:
        """Raise the deployment's replicas to ``replicas`` through the scale subresource; never lower them."""
        what = f"deployment {self.ns}/{name}"
        with self.call(what):
            scale = self.apps.read_namespaced_deployment_scale(name, self.ns, _request_timeout=REQUEST_TIMEOUT)
        current = scale.spec.replicas if scale.spec and scale.spec.replicas is not None else 0
        if current >= replicas:
            _logger().info("%s: %s already at %d replicas (inventory: %d)", self.where, what, current, replicas)
            return
        # No resourceVersion precondition: the controller bumps it with every status update, and
        # setting an absolute replica count is idempotent anyway.
        body = {"spec": {"replicas": replicas}}
        with self.call(what):
            self.apps.patch_namespaced_deployment_scale(
                name, self.ns, body, _content_type=_MERGE_PATCH, _request_timeout=REQUEST_TIMEOUT
            )
        _logger().info("%s: scaled %s %d -> %d", self.where, what, current, replicas)


    # -- autoscalers -------------------------------------------------------------------------------------
    def autoscalers(self, deployment: str) -> list[k8s.V2HorizontalPodAutoscaler]:
        """The namespace's HPAs (autoscaling/v2) that scale this deployment. [] when the cluster serves no
        autoscaling/v2 or this identity may not list HPAs (said in the log: their bounds are then not followed)."""
        if self._hpas is None:
            what = f"horizontalpodautoscalers in {self.ns}"
            try:
                with self.call(what):
                    self._hpas = self.autoscaling.list_namespaced_horizontal_pod_autoscaler(
                        self.ns, _request_timeout=REQUEST_TIMEOUT
                    ).items
            except ApplicationError as e:
                about = (e.details[0] if e.details and isinstance(e.details[0], dict) else {}).get("object")
                missing_api = e.type == "KubernetesNotFound" and about == what  # not "namespace ...": no HPA API
                if e.type != "KubernetesForbidden" and not missing_api:
                    raise
                _logger().warning("%s: cannot list HPAs (%s); autoscalers not followed", self.where, e.message)
                self._hpas = []
        return [
            h
            for h in self._hpas
            if h.spec.scale_target_ref.kind == "Deployment" and h.spec.scale_target_ref.name == deployment
        ]

    def set_autoscaler(self, hpa: k8s.V2HorizontalPodAutoscaler, plan: "_HpaPlan") -> None:
        name = hpa.metadata.name
        body = {
            "metadata": {"annotations": {AUTOSCALER_BEFORE: plan.annotation}},
            "spec": {"minReplicas": plan.min_after, "maxReplicas": plan.max_after},
        }
        with self.call(f"horizontalpodautoscaler {self.ns}/{name}"):
            self.autoscaling.patch_namespaced_horizontal_pod_autoscaler(
                name, self.ns, body, _content_type=_MERGE_PATCH, _request_timeout=REQUEST_TIMEOUT
            )
        _logger().info(
            "%s: HPA %s/%s %s: min %d -> %d, max %d -> %d",
            self.where, self.ns, name, plan.action, plan.min_now, plan.min_after, plan.max_now, plan.max_after,
        )

    def follow_autoscalers(self, deployment: str, replicas: int | None,
                           floor: int = LOWERED_MIN_REPLICAS) -> list[AutoscalerChange]:
        """Raise (``replicas``: the inventory's figure) or lower (None, to at most ``floor``) the bounds of the
        deployment's HPAs."""
        changes = []
        for hpa in self.autoscalers(deployment):
            plan = _HpaPlan.of(hpa, replicas, floor)
            if plan.changes_anything:
                self.set_autoscaler(hpa, plan)
            changes.append(plan.change(self.target.region, self.ns, hpa.metadata.name, deployment))
        return changes


class _HpaPlan:
    """What to do to one HPA. Raising (a failover's new region): minReplicas to at least the inventory's replicas,
    maxReplicas to at least that, from the values before the first change when they are kept on the HPA (so a
    failback restores them). Lowering (the old region): the values kept from a raise come back; else minReplicas
    goes down to the floor (the inventory's standby_min_replicas; never up), its values kept on the HPA. Idempotent:
    a retry finds the annotation."""

    def __init__(self, min_now: int, max_now: int, before: tuple[int, int, str] | None, replicas: int | None,
                 floor: int = LOWERED_MIN_REPLICAS):
        self.min_now, self.max_now = min_now, max_now
        base = (before[0], before[1]) if before else (min_now, max_now)
        self.min_before, self.max_before = base
        if replicas is not None:  # raise
            self.min_after = max(base[0], replicas)
            self.max_after = max(base[1], self.min_after)
            restored = (self.min_after, self.max_after) == base
            self.action = ("restored" if before else "unchanged") if restored else "raised"
            self.keep = None if restored else (base[0], base[1], "raised")
        elif before and before[2] == "raised":  # lower a region a failover had raised: back to what it was
            self.min_after, self.max_after, self.action, self.keep = base[0], base[1], "restored", None
        else:
            self.min_after, self.max_after = min(base[0], floor), base[1]
            lowered = self.min_after != base[0]
            self.action = "lowered" if lowered else "unchanged"
            self.keep = (base[0], base[1], "lowered") if lowered else None
        self.annotation = (
            json.dumps({"minReplicas": self.keep[0], "maxReplicas": self.keep[1], "by": self.keep[2]})
            if self.keep
            else None
        )
        self.kept_now = before

    @classmethod
    def of(cls, hpa: k8s.V2HorizontalPodAutoscaler, replicas: int | None,
           floor: int = LOWERED_MIN_REPLICAS) -> "_HpaPlan":
        raw = (hpa.metadata.annotations or {}).get(AUTOSCALER_BEFORE)
        before = None
        if raw:
            try:
                d = json.loads(raw)
                before = (int(d["minReplicas"]), int(d["maxReplicas"]), str(d.get("by", "raised")))
            except (ValueError, KeyError, TypeError):
                _logger().warning("HPA %s: unreadable %s annotation %r; taking its bounds now as the values "
                                  "before", hpa.metadata.name, AUTOSCALER_BEFORE, raw)
        return cls(hpa.spec.min_replicas or 1, hpa.spec.max_replicas, before, replicas, floor)

    @property
    def changes_anything(self) -> bool:
        return (self.min_after, self.max_after) != (self.min_now, self.max_now) or self.keep != self.kept_now

    def change(self, region: str, namespace: str, name: str, deployment: str) -> AutoscalerChange:
        return AutoscalerChange(
            region=region, namespace=namespace, name=name, deployment=deployment, min_before=self.min_before,
            max_before=self.max_before, min_after=self.min_after, max_after=self.max_after, action=self.action,
        )


class _Rollout:
    """A deployment's rollout as `kubectl rollout status` judges it."""

    def __init__(self, state: DeploymentState, done: bool, waiting_for: str, failed: str | None):
        self.state, self.done, self.waiting_for, self.failed = state, done, waiting_for, failed

    @classmethod
    def of(cls, dep: k8s.V1Deployment) -> "_Rollout":
        name = dep.metadata.name
        desired = dep.spec.replicas if dep.spec and dep.spec.replicas is not None else 1
        st = dep.status or k8s.V1DeploymentStatus()
        replicas, updated = st.replicas or 0, st.updated_replicas or 0
        ready, available = st.ready_replicas or 0, st.available_replicas or 0
        state = DeploymentState(name=name, desired=desired, ready=ready)
        if (st.observed_generation or 0) < (dep.metadata.generation or 0):
            return cls(
                state,
                False,
                f"{name}: waiting for the controller to observe generation {dep.metadata.generation}",
                None,
            )
        progressing = next((c for c in st.conditions or [] if c.type == "Progressing"), None)
        if progressing is not None and progressing.reason == "ProgressDeadlineExceeded":
            return cls(
                state,
                False,
                f"{name}: {progressing.message}",
                f"{name}: {progressing.message} ({ready}/{desired} ready)",
            )
        if updated < desired:
            return cls(state, False, f"{name}: {updated} of {desired} replicas updated, {ready} ready", None)
        if replicas > updated:
            return cls(state, False, f"{name}: {replicas - updated} old replicas pending termination", None)
        if available < updated or ready < desired:
            return cls(state, False, f"{name}: {ready} of {desired} replicas ready", None)
        return cls(state, True, f"{name}: {ready}/{desired} ready", None)


@contextmanager
def _cluster(target: RegionTarget) -> Iterator[_Cluster]:
    assert target.kubernetes is not None
    api = new_api_client(target.kubernetes)
    try:
        yield _Cluster(target, target.kubernetes, api)
    finally:
        api.close()
        api.rest_client.pool_manager.clear()  # no idle connections left behind between activity calls


def _no_kubernetes(target: RegionTarget) -> KubeStatus:
    _logger().info("region %s has no kubernetes section in the inventory: nothing to check", target.region)
    return KubeStatus(region=target.region, deployments=[], ready=True, maintenance=None)


def _sleep(seconds: float) -> None:
    sleep_or_cancelled(seconds, what="waiting for the rollout")


def _wait_bound(wait_seconds: float | None) -> float:
    """How long scale_up waits: the argument, else just short of the activity's start-to-close timeout."""
    if wait_seconds is not None:
        return wait_seconds
    if activity.in_activity():
        timeout = activity.info().start_to_close_timeout
        if timeout:
            total = timeout.total_seconds()
            # stop a little early, so the failure says which deployment is not ready instead of a bare timeout
            return max(total - 5.0, total * 0.9)
    return DEFAULT_WAIT_SECONDS


# -- the activities ----------------------------------------------------------------------------------------


@K8S_STATUS.implementation
def kube_status(target: RegionTarget) -> KubeStatus:
    """The region's deployments (desired/ready at their current spec), its nodes, and its maintenance flag.

    ready: every inventory deployment has completed its rollout at its current spec, and
    every node is Ready. maintenance: the service's annotation ``maintenance == "true"``
    (None when the inventory names no service).
    """
    if target.kubernetes is None:
        return _no_kubernetes(target)
    with _cluster(target) as c:
        return c.status()


@K8S_SET_MAINTENANCE.implementation
def set_maintenance(req: MaintenanceRequest) -> KubeStatus:
    """Annotate the region's service ``maintenance=true`` (on) or remove the annotation (off). Idempotent."""
    target = req.target
    if target.kubernetes is None:
        return _no_kubernetes(target)
    with _cluster(target) as c:
        if c.cfg.service:
            c.set_maintenance(req.on)
        else:
            _logger().info("%s: no service in the inventory: maintenance mode has nothing to do", c.where)
        return c.status()


@K8S_SCALE_UP.implementation
def scale_up(req: ScaleRequest) -> KubeStatus:
    """Scale every inventory deployment up to its replicas, then wait until all rollouts complete.

    A deployment already at or above its inventory replicas is left alone (an autoscaler
    may have raised it). Heartbeats ``{"ready", "desired", "waiting"}`` about every second,
    so the workflow's heartbeat timeout notices a stuck worker. Gives up just short of the
    start-to-close timeout with a retryable ``DeploymentNotReady`` naming what is not
    ready; a rollout past its progress deadline fails non-retryably (``DeploymentFailed``).
    The returned status also counts nodes (see ``kube_status``).

    Exactly one parameter on purpose: temporalio decodes activity arguments with their
    type hints only when the workflow passes as many arguments as the function declares.
    The wait knobs live on ``scale_up_and_wait``.
    """
    return scale_up_and_wait(req)


def scale_up_and_wait(
    req: ScaleRequest, *, wait_seconds: float | None = None, poll_seconds: float = POLL_SECONDS
) -> KubeStatus:
    """``k8s.scale_up`` with its knobs: the wait bound (default: just short of the activity's
    start-to-close timeout, or DEFAULT_WAIT_SECONDS outside an activity) and the poll interval."""
    target = req.target
    if target.kubernetes is None:
        return _no_kubernetes(target)
    bound = _wait_bound(wait_seconds)
    started = time.monotonic()
    with _cluster(target) as c:
        autoscalers = []
        for d in c.cfg.deployments:
            # the HPA first: one whose maxReplicas is below the inventory's figure would scale the deployment back
            autoscalers += c.follow_autoscalers(d.name, d.replicas)
            c.scale_to_at_least(d.name, d.replicas)
        while True:
            rollouts = c.rollouts()
            progress = {
                "ready": sum(r.state.ready for r in rollouts),
                "desired": sum(r.state.desired for r in rollouts),
                "waiting": [r.waiting_for for r in rollouts if not r.done],
            }
            _heartbeat(progress)
            failed = [r.failed for r in rollouts if r.failed]
            if failed:
                raise ApplicationError(
                    f"{c.where}: rollout failed: {'; '.join(failed)}",
                    progress,
                    type="DeploymentFailed",
                    non_retryable=True,
                )
            if all(r.done for r in rollouts):
                _logger().info(
                    "%s: all deployments ready (%d/%d) after %.1fs",
                    c.where,
                    progress["ready"],
                    progress["desired"],
                    time.monotonic() - started,
                )
                return c.status(rollouts).model_copy(update={"autoscalers": autoscalers})
            elapsed = time.monotonic() - started
            if elapsed >= bound:
                raise ApplicationError(
                    f"{c.where}: not ready after {bound:.0f}s: {'; '.join(progress['waiting'])}",
                    progress,
                    type="DeploymentNotReady",
                )
            _sleep(min(poll_seconds, max(0.05, bound - elapsed)))


@K8S_LOWER_AUTOSCALERS.implementation
def lower_autoscalers(target: RegionTarget) -> AutoscalerResult:
    """A failover's OLD region: the HPAs of its inventory deployments give up the floor a failover had raised
    (their values before come back), or go down to minReplicas `kubernetes.standby_min_replicas` (1 by default; an
    HPA already below it is left alone), their values kept on the HPA for the failback. Deployments are not scaled
    here: the HPA does it as load allows."""
    if target.kubernetes is None:
        return AutoscalerResult(region=target.region)
    with _cluster(target) as c:
        changes = []
        for d in c.cfg.deployments:
            changes += c.follow_autoscalers(d.name, None, target.kubernetes.standby_min_replicas)
        return AutoscalerResult(region=target.region, changes=changes)


@K8S_SCALE_TO_ZERO.implementation
def scale_to_zero(target: RegionTarget) -> FenceResult:
    """Emergency fence of the OLD region's applications: every inventory deployment scaled to 0 replicas (no
    wait for the pods to go). Best effort, run from the target region's queue: an unreachable cluster is not an
    error but a result with fenced=False and what is left to do (the failover lists it as remaining)."""
    if target.kubernetes is None or not target.kubernetes.deployments:
        return FenceResult(
            region=target.region, fenced=True, method="k8s-scale-to-zero", detail="no deployments in the inventory"
        )
    actions: list[str] = []
    failed: list[str] = []
    try:
        with _cluster(target) as c:
            for d in c.cfg.deployments:
                what = f"deployment {c.ns}/{d.name}"
                try:
                    with c.call(what):
                        c.apps.patch_namespaced_deployment_scale(
                            d.name,
                            c.ns,
                            {"spec": {"replicas": 0}},
                            _content_type=_MERGE_PATCH,
                            _request_timeout=FENCE_REQUEST_TIMEOUT,
                        )
                    actions.append(f"scaled {what} to 0")
                except ApplicationError as e:
                    failed.append(f"{what}: {e.message}")
    except ApplicationError as e:
        failed.append(e.message)
    except Exception as e:  # noqa: BLE001 - a dead region fails in many ways; none may stop the failover
        failed.append(f"{type(e).__name__}: {e}")
    if failed:
        return FenceResult(
            region=target.region,
            fenced=False,
            method="k8s-scale-to-zero",
            detail=f"scale {target.region}'s deployments to 0 by hand (could not: {'; '.join(failed)})"
            + (f"; done: {', '.join(actions)}" if actions else ""),
        )
    return FenceResult(region=target.region, fenced=True, method="k8s-scale-to-zero", detail=", ".join(actions))


# -- rollouts: canary and blue-green ----------------------------------------------------------------------
#
# The canary is a second deployment, `<stable>-canary`, made from the stable's spec with the new image; its pod
# labels are the stable's with each selector value suffixed, so the stable service never selects canary pods,
# and a service `<service>-canary` selects them. A Gateway API HTTPRoute splits traffic between the two
# services by backendRef weight. Blue-green keeps two colours, `<stable>` and `<stable>-green`, and switches
# the stable service's selector between them. Every activity looks before it acts.


GATEWAY_GROUP, GATEWAY_VERSION, HTTPROUTES = "gateway.networking.k8s.io", "v1", "httproutes"
CANARY_OF = "opsflow.dev/canary-of"
GREEN_SUFFIX = "-green"


class _Place:
    def __init__(self, region: str):
        self.region = region


@contextmanager
def _rollout_cluster(target: RolloutTarget) -> Iterator[_Cluster]:
    if target.kubernetes is None:
        raise ApplicationError(f"{target.region} has no kubernetes section: {target.app.deployment} is not a "
                               "Deployment there", type="BadInput", non_retryable=True)
    api = new_api_client(target.kubernetes)
    try:
        yield _Cluster(_Place(target.region), target.kubernetes, api)  # type: ignore[arg-type]
    finally:
        api.close()
        api.rest_client.pool_manager.clear()


def _suffixed(labels: dict, keys: dict, suffix: str) -> dict:
    return {k: (f"{v}{suffix}" if k in keys else v) for k, v in (labels or {}).items()}


def _container(dep: k8s.V1Deployment, name: str | None) -> k8s.V1Container:
    containers = dep.spec.template.spec.containers
    for c in containers:
        if name is None or c.name == name:
            return c
    raise ApplicationError(
        f"deployment {dep.metadata.name} has no container {name!r} (has: {', '.join(c.name for c in containers)})",
        type="BadInput",
        non_retryable=True,
    )


def _maybe(c: _Cluster, what: str, read) -> Any:
    """Read an object; None when it does not exist."""
    try:
        with c.call(what):
            return read()
    except ApplicationError as e:
        if e.type == "KubernetesNotFound":
            return None
        raise


def _route(c: _Cluster, target: RolloutTarget) -> dict:
    if not isinstance(target.app.router, RouterRef):
        raise ApplicationError(
            f"app {target.app.deployment} has no httproute router in the inventory",
            type="BadInput",
            non_retryable=True,
        )
    custom = k8s.CustomObjectsApi(c.api)
    with c.call(f"httproute {c.ns}/{target.app.router.name}"):
        return custom.get_namespaced_custom_object(
            GATEWAY_GROUP, GATEWAY_VERSION, c.ns, HTTPROUTES, target.app.router.name, _request_timeout=REQUEST_TIMEOUT
        )


def _patch_route_rules(c: _Cluster, route: dict) -> None:
    """Write back the route's rules as changed in `route`, guarded by the resourceVersion it was read at."""
    name = route["metadata"]["name"]
    body = {"metadata": {"resourceVersion": route["metadata"]["resourceVersion"]},
            "spec": {"rules": route["spec"]["rules"]}}
    with c.call(f"httproute {c.ns}/{name}"):
        k8s.CustomObjectsApi(c.api).patch_namespaced_custom_object(
            GATEWAY_GROUP, GATEWAY_VERSION, c.ns, HTTPROUTES, name, body, _request_timeout=REQUEST_TIMEOUT
        )


def _route_rule(route: dict, service: str) -> dict:
    for rule in route.get("spec", {}).get("rules", []):
        if any(ref.get("name") == service for ref in rule.get("backendRefs", [])):
            return rule
    raise ApplicationError(
        f"httproute {route['metadata']['name']} has no rule sending traffic to service {service}",
        type="BadInput",
        non_retryable=True,
    )


def _rollout_state(c: _Cluster, target: RolloutTarget) -> RolloutState:
    app = target.app
    stable = c.deployment(app.deployment)
    roll = _Rollout.of(stable)
    state = RolloutState(
        stable=app.deployment,
        stable_image=_container(stable, app.container).image,
        stable_desired=roll.state.desired,
        stable_ready=roll.state.ready,
        stable_done=roll.done,
    )
    canary = _maybe(
        c,
        f"deployment {c.ns}/{target.canary}",
        lambda: c.apps.read_namespaced_deployment(target.canary, c.ns, _request_timeout=REQUEST_TIMEOUT),
    )
    if canary is not None:
        state.canary, state.canary_image = target.canary, _container(canary, app.container).image
        state.canary_ready = (canary.status.ready_replicas or 0) if canary.status else 0
        state.canary_replicas = canary.spec.replicas or 0
    if isinstance(app.router, RouterRef):  # nginx and traffic-manager: router.status (activities/routers.py)
        rule = _route_rule(_route(c, target), app.service)
        state.weights = {ref["name"]: int(ref.get("weight", 1)) for ref in rule.get("backendRefs", [])}
    with c.call(f"service {c.ns}/{app.service}"):
        svc = c.core.read_namespaced_service(app.service, c.ns, _request_timeout=REQUEST_TIMEOUT)
    selector = svc.spec.selector or {}
    for name in (app.deployment, f"{app.deployment}{GREEN_SUFFIX}"):
        dep = (
            stable
            if name == app.deployment
            else _maybe(
                c,
                f"deployment {c.ns}/{name}",
                lambda: c.apps.read_namespaced_deployment(name, c.ns, _request_timeout=REQUEST_TIMEOUT),
            )
        )
        if dep is None:
            continue
        state.colours[name] = _container(dep, app.container).image
        state.replicas[name] = dep.spec.replicas or 0
        labels = dep.spec.template.metadata.labels or {}
        if selector and all(labels.get(k) == v for k, v in selector.items()):
            state.active = name
    return state


def _wait_done(c: _Cluster, name: str, bound: float, what: str) -> None:
    """Wait until the deployment's rollout is complete (`kubectl rollout status`), heartbeating."""
    started = time.monotonic()
    while True:
        r = _Rollout.of(c.deployment(name))
        _heartbeat({"deployment": name, "ready": r.state.ready, "desired": r.state.desired, "waiting": r.waiting_for})
        if r.failed:
            raise ApplicationError(
                f"{c.where}: {what}: rollout failed: {r.failed}", type="DeploymentFailed", non_retryable=True
            )
        if r.done:
            return
        if time.monotonic() - started >= bound:
            raise ApplicationError(
                f"{c.where}: {what}: not ready after {bound:.0f}s: {r.waiting_for}", type="DeploymentNotReady"
            )
        _sleep(POLL_SECONDS)


def _ensure_service_copy(c: _Cluster, source: str, name: str, keys: dict, suffix: str) -> None:
    if (
        _maybe(
            c,
            f"service {c.ns}/{name}",
            lambda: c.core.read_namespaced_service(name, c.ns, _request_timeout=REQUEST_TIMEOUT),
        )
        is not None
    ):
        return
    with c.call(f"service {c.ns}/{source}"):
        svc = c.core.read_namespaced_service(source, c.ns, _request_timeout=REQUEST_TIMEOUT)
    body = k8s.V1Service(
        metadata=k8s.V1ObjectMeta(name=name, labels={CANARY_OF: source}),
        spec=k8s.V1ServiceSpec(
            selector=_suffixed(svc.spec.selector or {}, keys, suffix),
            ports=[
                k8s.V1ServicePort(port=p.port, target_port=p.target_port, protocol=p.protocol, name=p.name)
                for p in svc.spec.ports or []
            ],
        ),
    )
    with c.call(f"service {c.ns}/{name}"):
        c.core.create_namespaced_service(c.ns, body, _request_timeout=REQUEST_TIMEOUT)
    _logger().info("%s: created service %s", c.where, name)


def _ensure_copy(c: _Cluster, target: RolloutTarget, name: str, image: str, replicas: int, suffix: str) -> None:
    """Deployment `name` from the stable's spec with `image` (created, or its image/replicas corrected)."""
    app = target.app
    existing = _maybe(
        c,
        f"deployment {c.ns}/{name}",
        lambda: c.apps.read_namespaced_deployment(name, c.ns, _request_timeout=REQUEST_TIMEOUT),
    )
    if existing is not None:
        container = _container(existing, app.container)
        patch: dict = {}
        if container.image != image:
            patch["template"] = {"spec": {"containers": [{"name": container.name, "image": image}]}}
        if (existing.spec.replicas or 0) != replicas:
            patch["replicas"] = replicas
        if patch:
            with c.call(f"deployment {c.ns}/{name}"):
                c.apps.patch_namespaced_deployment(name, c.ns, {"spec": patch}, _request_timeout=REQUEST_TIMEOUT)
            _logger().info("%s: deployment %s corrected to %s x%d", c.where, name, image, replicas)
        return
    stable = c.deployment(app.deployment)
    keys = stable.spec.selector.match_labels or {}
    spec = c.api.sanitize_for_serialization(stable.spec)
    spec["replicas"] = replicas
    spec["selector"] = {"matchLabels": _suffixed(keys, keys, suffix)}
    spec["template"]["metadata"]["labels"] = _suffixed(spec["template"]["metadata"].get("labels") or {}, keys, suffix)
    for cont in spec["template"]["spec"]["containers"]:
        if app.container is None or cont["name"] == app.container:
            cont["image"] = image
            break
    body = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "spec": spec,
        "metadata": {"name": name, "labels": {**(stable.metadata.labels or {}), CANARY_OF: app.deployment}},
    }
    with c.call(f"deployment {c.ns}/{name}"):
        c.apps.create_namespaced_deployment(c.ns, body, _request_timeout=REQUEST_TIMEOUT)
    _logger().info("%s: created deployment %s (%s x%d) from %s", c.where, name, image, replicas, app.deployment)


def rollout_status(target: RolloutTarget) -> RolloutState:
    """Stable deployment (image, readiness), canary (if any), router weights, blue-green colours. No change."""
    with _rollout_cluster(target) as c:
        return _rollout_state(c, target)


def create_canary(req: ImageRequest) -> RolloutState:
    """Create `<stable>-canary` from the stable's spec with the new image and its service, then wait until it is
    ready (heartbeating). An existing canary with another image is corrected."""
    target = req.target
    with _rollout_cluster(target) as c:
        stable = c.deployment(target.app.deployment)
        keys = stable.spec.selector.match_labels or {}
        _ensure_copy(c, target, target.canary, req.image, target.app.canary_replicas, target.canary_suffix)
        _ensure_service_copy(c, target.app.service, target.canary_service, keys, target.canary_suffix)
        _wait_done(c, target.canary, req.wait_seconds or _wait_bound(None), f"canary {target.canary}")
        return _rollout_state(c, target)


def canary_size(stable_replicas: int, weight: int) -> int:
    """The canary's replicas for `weight` % of the traffic stable's `stable_replicas` serve: ceil, at least 1."""
    return max(1, -(-stable_replicas * weight // 100))


def scale_canary(req: WeightRequest) -> RolloutState:
    """Capacity follows weight (Argo's setCanaryScale, Flagger's autoscaler reference): the canary gets
    ceil(weight % x stable's current replicas), at least 1 and never fewer than `canary_replicas`, and is waited
    ready, before the weight moves. Stable is read now (an autoscaler may have changed it) and never scaled:
    its remaining share never lacks the pods it had. An HPA on stable gets a copy for the canary, its bounds
    scaled to the weight, set before the canary is scaled (and deleted with the canary)."""
    target = req.target
    with _rollout_cluster(target) as c:
        with c.call(f"deployment {c.ns}/{target.app.deployment}"):
            stable = c.apps.read_namespaced_deployment_scale(
                target.app.deployment, c.ns, _request_timeout=REQUEST_TIMEOUT
            )
        want = max(canary_size(stable.spec.replicas or 0, req.canary_weight), target.app.canary_replicas)
        stable_hpas = c.autoscalers(target.app.deployment)
        if stable_hpas:  # the HPA first: bounds of a smaller weight would scale the canary back
            lo, hi = _copy_autoscaler(c, stable_hpas[0], target, target.canary, req.canary_weight,
                                      target.app.canary_replicas)
            want = min(max(want, lo), hi)
        with c.call(f"deployment {c.ns}/{target.canary}"):
            scale = c.apps.read_namespaced_deployment_scale(target.canary, c.ns, _request_timeout=REQUEST_TIMEOUT)
        if scale.spec.replicas != want:
            with c.call(f"deployment {c.ns}/{target.canary}"):
                c.apps.patch_namespaced_deployment_scale(
                    target.canary,
                    c.ns,
                    {"spec": {"replicas": want}},
                    _content_type=_MERGE_PATCH,
                    _request_timeout=REQUEST_TIMEOUT,
                )
            _logger().info("%s: canary %s %d -> %d replicas for %d %% (stable %d)", c.where, target.canary,
                           scale.spec.replicas or 0, want, req.canary_weight, stable.spec.replicas or 0)
        _wait_done(c, target.canary, _wait_bound(None), f"canary {target.canary}")
        return _rollout_state(c, target)


def _copy_autoscaler(
    c: _Cluster, stable_hpa: k8s.V2HorizontalPodAutoscaler, target: RolloutTarget, name: str, weight: int,
    at_least: int = 1,
) -> tuple[int, int]:
    """Deployment `name`'s own HPA (the canary's, a blue-green colour's), a copy of stable's with its bounds scaled to
    the weight (ceil, at least 1 and at least `at_least`), created or corrected; its (min, max). Flagger's
    autoscalerRef does the same with a copy."""
    lo = max(canary_size(stable_hpa.spec.min_replicas or 1, weight), at_least)
    hi = max(canary_size(stable_hpa.spec.max_replicas, weight), lo)
    what = f"horizontalpodautoscaler {c.ns}/{name}"
    existing = _maybe(c, what, lambda: c.autoscaling.read_namespaced_horizontal_pod_autoscaler(
        name, c.ns, _request_timeout=REQUEST_TIMEOUT))
    if existing is None:
        spec = c.api.sanitize_for_serialization(stable_hpa.spec)
        spec.update(minReplicas=lo, maxReplicas=hi)
        spec["scaleTargetRef"] = {**spec["scaleTargetRef"], "name": name}
        body = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "spec": spec,
                "metadata": {"name": name, "labels": {CANARY_OF: target.app.deployment}}}
        with c.call(what):
            c.autoscaling.create_namespaced_horizontal_pod_autoscaler(c.ns, body, _request_timeout=REQUEST_TIMEOUT)
        _logger().info("%s: created HPA %s (%d..%d) from %s's for %d %%", c.where, name, lo, hi,
                       stable_hpa.metadata.name, weight)
    elif (existing.spec.min_replicas, existing.spec.max_replicas) != (lo, hi):
        with c.call(what):
            c.autoscaling.patch_namespaced_horizontal_pod_autoscaler(
                name, c.ns, {"spec": {"minReplicas": lo, "maxReplicas": hi}}, _content_type=_MERGE_PATCH,
                _request_timeout=REQUEST_TIMEOUT)
        _logger().info("%s: HPA %s %d..%d -> %d..%d for %d %%", c.where, name, existing.spec.min_replicas,
                       existing.spec.max_replicas, lo, hi, weight)
    return lo, hi


def role_services(target: RolloutTarget) -> dict[str, str]:
    """role -> the service the HTTPRoute's backendRef names: stable, canary, baseline."""
    s = target.app.service
    return {"stable": s, "canary": f"{s}{target.canary_suffix}", "baseline": f"{s}{BASELINE_SUFFIX}"}


def httproute_shares(target: RolloutTarget) -> dict[str, int]:
    """The HTTPRoute's weights by role (roles without a backendRef left out). No change."""
    with _rollout_cluster(target) as c:
        rule = _route_rule(_route(c, target), target.app.service)
    by_service = {ref["name"]: int(ref.get("weight", 1)) for ref in rule.get("backendRefs", [])}
    return {role: by_service[svc] for role, svc in role_services(target).items() if svc in by_service}


def httproute_set_shares(target: RolloutTarget, shares: dict[str, int]) -> RolloutState:
    """The HTTPRoute's backendRefs get `shares` (role -> weight): stable's weight changes in place, the canary's
    (and the baseline's) backendRef is added as a copy of stable's when missing. A role at 0 that has no backendRef
    is left without one. Guarded by the route's resourceVersion; already so is success."""
    services = role_services(target)
    with _rollout_cluster(target) as c:
        route = _route(c, target)
        rule = _route_rule(route, target.app.service)
        refs = rule["backendRefs"]
        have = {r["name"]: int(r.get("weight", 1)) for r in refs}
        want = {services[role]: w for role, w in shares.items() if w > 0 or services[role] in have}
        if all(have.get(k) == v for k, v in want.items()):
            _logger().info("%s: route %s already at %s", c.where, route["metadata"]["name"], shares)
            return _rollout_state(c, target)
        stable_ref = next(r for r in refs if r["name"] == target.app.service)
        for name, weight in want.items():
            ref = next((r for r in refs if r["name"] == name), None)
            if ref is None:
                refs.append({**{k: v for k, v in stable_ref.items() if k not in ("name", "weight")},
                             "name": name, "weight": weight})
            else:
                ref["weight"] = weight
        _patch_route_rules(c, route)
        _logger().info("%s: route %s: %s", c.where, route["metadata"]["name"],
                       ", ".join(f"{role} {w}%" for role, w in shares.items()))
        return _rollout_state(c, target)


@K8S_SET_WEIGHT.implementation
def set_weight(req: WeightRequest) -> RolloutState:
    """Send `canary_weight` % of the route's traffic to the canary service, the rest to the stable service (runs
    started before the router interface; see activities/routers.py)."""
    return httproute_set_shares(req.target, {"stable": 100 - req.canary_weight, "canary": req.canary_weight})


def delete_canary(target: RolloutTarget) -> RolloutState:
    """Route everything to the stable service (the canary's backendRef removed), then delete the canary's service and
    deployment. Stable is never touched. Nothing to delete is success."""
    with _rollout_cluster(target) as c:
        if isinstance(target.app.router, RouterRef):  # other routers were set to 0 % by the workflow before
            route = _route(c, target)
            rule = _route_rule(route, target.app.service)
            refs = rule["backendRefs"]
            gone = [r for r in refs if r["name"] == target.canary_service]
            left = [r for r in refs if r["name"] != target.canary_service]
            stable_ref = next((r for r in left if r["name"] == target.app.service), None)
            changed = bool(gone)
            if gone and stable_ref is not None:  # the copy's share goes back to stable; a baseline keeps its own
                stable_ref["weight"] = int(stable_ref.get("weight", 1)) + sum(int(r.get("weight", 1)) for r in gone)
            if stable_ref is not None and len(left) == 1 and int(stable_ref.get("weight", 1)) != 100:
                stable_ref["weight"], changed = 100, True
            if changed:
                rule["backendRefs"] = left
                _patch_route_rules(c, route)
        for what, delete in (
            (
                f"service {c.ns}/{target.canary_service}",
                lambda: c.core.delete_namespaced_service(target.canary_service, c.ns, _request_timeout=REQUEST_TIMEOUT),
            ),
            (  # the canary's copy of stable's HPA (k8s.scale_canary), if any
                f"horizontalpodautoscaler {c.ns}/{target.canary}",
                lambda: _delete_canary_autoscaler(c, target),
            ),
            (
                f"deployment {c.ns}/{target.canary}",
                lambda: c.apps.delete_namespaced_deployment(target.canary, c.ns, _request_timeout=REQUEST_TIMEOUT),
            ),
        ):
            if _maybe(c, what, delete) is not None:
                _logger().info("%s: deleted %s", c.where, what)
        return _rollout_state(c, target)


def _delete_canary_autoscaler(c: _Cluster, target: RolloutTarget) -> Any:
    """Delete the canary's HPA, only one opsflow made (labelled as the canary's). None when there is none."""
    hpa = c.autoscaling.read_namespaced_horizontal_pod_autoscaler(target.canary, c.ns, _request_timeout=REQUEST_TIMEOUT)
    if (hpa.metadata.labels or {}).get(CANARY_OF) != target.app.deployment:
        return None
    return c.autoscaling.delete_namespaced_horizontal_pod_autoscaler(target.canary, c.ns,
                                                                     _request_timeout=REQUEST_TIMEOUT)


def set_image(req: ImageRequest) -> RolloutState:
    """Give the stable deployment the image (the promotion), then wait for `rollout status` (heartbeating)."""
    target = req.target
    with _rollout_cluster(target) as c:
        dep = c.deployment(target.app.deployment)
        container = _container(dep, target.app.container)
        if container.image != req.image:
            body = {"spec": {"template": {"spec": {"containers": [{"name": container.name, "image": req.image}]}}}}
            with c.call(f"deployment {c.ns}/{target.app.deployment}"):
                c.apps.patch_namespaced_deployment(target.app.deployment, c.ns, body, _request_timeout=REQUEST_TIMEOUT)
            _logger().info("%s: %s: %s -> %s", c.where, target.app.deployment, container.image, req.image)
        _wait_done(
            c, target.app.deployment, req.wait_seconds or _wait_bound(None), f"deployment {target.app.deployment}"
        )
        return _rollout_state(c, target)


@K8S_CREATE_COLOUR.implementation
def create_colour(req: ImageRequest) -> RolloutState:
    """Blue-green: the colour the service does not select gets the image at the active colour's size (and a copy of
    its HPA, when it has one and the other colour none); waits ready."""
    target = req.target
    with _rollout_cluster(target) as c:
        state = _rollout_state(c, target)
        active = state.active or target.app.deployment
        other = target.app.deployment if active != target.app.deployment else f"{target.app.deployment}{GREEN_SUFFIX}"
        size = max(state.replicas.get(active, 1), 1)
        active_hpas = c.autoscalers(active)
        if active_hpas and not c.autoscalers(other):  # the new colour gets the active colour's HPA, whole
            lo, hi = _copy_autoscaler(c, active_hpas[0], target, other, 100)
            size = min(max(size, lo), hi)
        if other == target.app.deployment:  # the stable name exists already: only its image and size change
            dep = c.deployment(other)
            container = _container(dep, target.app.container)
            body = {
                "spec": {
                    "replicas": size,
                    "template": {"spec": {"containers": [{"name": container.name, "image": req.image}]}},
                }
            }
            with c.call(f"deployment {c.ns}/{other}"):
                c.apps.patch_namespaced_deployment(other, c.ns, body, _request_timeout=REQUEST_TIMEOUT)
        else:
            _ensure_copy(c, target, other, req.image, size, GREEN_SUFFIX)
        _wait_done(c, other, req.wait_seconds or _wait_bound(None), f"colour {other}")
        return _rollout_state(c, target)


@K8S_SWITCH_SERVICE.implementation
def switch_service(req: DeploymentRequest) -> RolloutState:
    """Point the stable service's selector at the deployment's pods (blue-green switch, and switch back)."""
    target = req.target
    with _rollout_cluster(target) as c:
        dep = c.deployment(req.deployment)
        with c.call(f"service {c.ns}/{target.app.service}"):
            svc = c.core.read_namespaced_service(target.app.service, c.ns, _request_timeout=REQUEST_TIMEOUT)
        want = dict(dep.spec.selector.match_labels or {})
        if (svc.spec.selector or {}) != want:
            # replace the whole selector: a strategic merge would keep the old colour's keys
            with c.call(f"service {c.ns}/{target.app.service}"):
                c.core.patch_namespaced_service(
                    target.app.service,
                    c.ns,
                    [{"op": "add", "path": "/spec/selector", "value": want}],
                    _request_timeout=REQUEST_TIMEOUT,
                )
            _logger().info("%s: service %s now selects %s", c.where, target.app.service, req.deployment)
        return _rollout_state(c, target)


@K8S_SCALE_DEPLOYMENT.implementation
def scale_deployment(req: DeploymentRequest) -> RolloutState:
    """Set a deployment's replicas (blue-green: the old colour down to 0 after the rollback window)."""
    target = req.target
    with _rollout_cluster(target) as c:
        with c.call(f"deployment {c.ns}/{req.deployment}"):
            scale = c.apps.read_namespaced_deployment_scale(req.deployment, c.ns, _request_timeout=REQUEST_TIMEOUT)
        if scale.spec.replicas != req.replicas:
            with c.call(f"deployment {c.ns}/{req.deployment}"):
                c.apps.patch_namespaced_deployment_scale(
                    req.deployment,
                    c.ns,
                    {"spec": {"replicas": req.replicas}},
                    _content_type=_MERGE_PATCH,
                    _request_timeout=REQUEST_TIMEOUT,
                )
        if req.replicas:
            _wait_done(c, req.deployment, _wait_bound(None), f"deployment {req.deployment}")
        return _rollout_state(c, target)
