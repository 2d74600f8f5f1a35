"""HorizontalPodAutoscalers (``autoscaling/v2``) and their controller: every ``sync_seconds`` (Kubernetes' default
is 15 s; the lab's is shorter) each HPA moves its Deployment's ``spec.replicas`` into ``[minReplicas,
maxReplicas]`` through the deployment, as a real HPA does through the scale subresource.

The lab has no metrics server: what the metrics would recommend is the deployment's current replicas, or the
figure in the HPA's annotation ``lab.opsflow.dev/recommended-replicas`` (a test's load). A deployment scaled to
zero is left alone ("scaling is disabled since the replica count of the target is zero"), as a real HPA does.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from lab.k8s.resources import DEPLOYMENTS, HPAS, Obj, now_iso

log = logging.getLogger("lab.k8s_emulator")

RECOMMENDED_ANNOTATION = "lab.opsflow.dev/recommended-replicas"
DEFAULT_SYNC_SECONDS = 0.5


def hpa_object(name: str, namespace: str, deployment: str, min_replicas: int, max_replicas: int,
               cpu: int = 70) -> Obj:
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment},
                     "minReplicas": int(min_replicas), "maxReplicas": int(max_replicas),
                     "metrics": [{"type": "Resource", "resource": {
                         "name": "cpu", "target": {"type": "Utilization", "averageUtilization": int(cpu)}}}]},
            "status": {"currentReplicas": 0, "desiredReplicas": 0}}


def problems(obj: Obj) -> list[tuple[str, Any, str]]:
    """What the API server's validation says of an HPA: (field, value, why) for each fault."""
    spec = obj.get("spec") or {}
    out: list[tuple[str, Any, str]] = []
    lo, hi = spec.get("minReplicas", 1), spec.get("maxReplicas")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not is_int(lo) or lo < 1:
        out.append(("spec.minReplicas", lo, "must be greater than or equal to 1"))
    if not is_int(hi) or hi < 1:
        out.append(("spec.maxReplicas", hi, "must be greater than 0"))
    elif is_int(lo) and hi < lo:
        out.append(("spec.maxReplicas", hi, "must be greater than or equal to `minReplicas`"))
    ref = spec.get("scaleTargetRef") or {}
    if not ref.get("kind") or not ref.get("name"):
        out.append(("spec.scaleTargetRef", ref, "kind and name are required"))
    return out


def _condition(prev: list, ctype: str, ok: bool, reason: str, message: str, now: str) -> Obj:
    old = next((c for c in prev if c.get("type") == ctype), None)
    status = "True" if ok else "False"
    since = old.get("lastTransitionTime", now) if old and old.get("status") == status else now
    return {"type": ctype, "status": status, "reason": reason, "message": message, "lastTransitionTime": since}


def reconcile(c: Any, now: float) -> None:
    """One pass of the HPA controller over every HPA whose sync period has come."""
    period = float(getattr(c, "hpa_sync_seconds", DEFAULT_SYNC_SECONDS))
    for key, hpa in list(c.objects.items()):
        if key[0] != HPAS.plural or now - c.hpa_synced_at.get(key, 0.0) < period:
            continue
        c.hpa_synced_at[key] = now
        _sync(c, key[1], hpa)


def _sync(c: Any, ns: str, hpa: Obj) -> None:
    spec, status = hpa.get("spec") or {}, hpa.get("status") or {}
    prev, now = status.get("conditions") or [], now_iso()
    ref = spec.get("scaleTargetRef") or {}
    lo, hi = int(spec.get("minReplicas", 1)), int(spec.get("maxReplicas", 1))
    dep = c.objects.get((DEPLOYMENTS.plural, ns, ref.get("name", ""))) if ref.get("kind") == "Deployment" else None
    new = copy.deepcopy(status)
    if dep is None:
        new["conditions"] = [_condition(prev, "AbleToScale", False, "FailedGetScale",
                                        f"the HPA controller was unable to get the target's current scale: "
                                        f'deployments.apps "{ref.get("name")}" not found', now)]
    else:
        current = int(dep["spec"].get("replicas", 1))
        recommended = current
        raw = (hpa["metadata"].get("annotations") or {}).get(RECOMMENDED_ANNOTATION)
        if raw is not None and str(raw).isdigit():
            recommended = int(raw)
        if current == 0:
            desired = 0
            active = _condition(prev, "ScalingActive", False, "ScalingDisabled",
                                "scaling is disabled since the replica count of the target is zero", now)
            limited = _condition(prev, "ScalingLimited", False, "DesiredWithinRange",
                                 "the desired count is within the acceptable range", now)
        else:
            desired = max(lo, min(hi, recommended))
            active = _condition(prev, "ScalingActive", True, "ValidMetricFound",
                                "the HPA was able to successfully calculate a replica count from cpu resource "
                                "utilization (percentage of request)", now)
            if recommended < lo:
                limited = _condition(prev, "ScalingLimited", True, "TooFewReplicas",
                                     "the desired replica count is less than the minimum replica count", now)
            elif recommended > hi:
                limited = _condition(prev, "ScalingLimited", True, "TooManyReplicas",
                                     "the desired replica count is more than the maximum replica count", now)
            else:
                limited = _condition(prev, "ScalingLimited", False, "DesiredWithinRange",
                                     "the desired count is within the acceptable range", now)
        if desired != current:
            dep["spec"]["replicas"] = desired
            dep["metadata"]["generation"] = int(dep["metadata"].get("generation", 1)) + 1
            c._stamp(dep, DEPLOYMENTS, new=False)
            new["lastScaleTime"] = now
            log.info("hpa %s/%s scaled deployment %s %d -> %d (range %d..%d)", ns, hpa["metadata"]["name"],
                     ref.get("name"), current, desired, lo, hi)
        able = _condition(prev, "AbleToScale", True, "SucceededRescale" if desired != current else "ReadyForNewScale",
                          f"the HPA controller was able to update the target scale to {desired}"
                          if desired != current else "recommended size matches current size", now)
        new.update(currentReplicas=int((dep.get("status") or {}).get("replicas", 0)), desiredReplicas=desired,
                   conditions=[able, active, limited], currentMetrics=[])
        new["observedGeneration"] = hpa["metadata"].get("generation", 1)
    if new != status:
        hpa["status"] = new
        c._stamp(hpa, HPAS, new=False)
