"""What a cluster derives from its Deployments and Services: ReplicaSets (one per pod template, with the
``deployment.kubernetes.io/revision`` annotation that ``kubectl rollout history|undo`` read), Pods (one per
replica, owned by their ReplicaSet, with a phase, a Ready condition and container statuses), Endpoints and
EndpointSlices (a service's ready and not-ready pod addresses), and the pods' logs.

The deployment controller (lab/k8s_emulator.py ``Cluster._reconcile_deployment``) decides the counts — how many
pods of the current template exist and are ready, how many old ones are left — and ``sync_deployment`` makes the
objects say so. Every function here runs under the cluster's lock and stamps an object only when it changed, so
an idle cluster's resourceVersion stands still.
"""

from __future__ import annotations

import copy
import hashlib
import ipaddress
import json
import random
import string
from typing import Any, Iterable

from lab.k8s.resources import (
    DEPLOYMENTS,
    ENDPOINTS,
    ENDPOINTSLICES,
    PODS,
    REPLICASETS,
    SERVICES,
    Key,
    Obj,
    controlled_by,
    now_iso,
    owner_ref,
)

POD_HASH_LABEL = "pod-template-hash"
REVISION = "deployment.kubernetes.io/revision"
# Annotations a deployment does not pass on to its ReplicaSets (as the deployment controller and kubectl rollout undo).
_NOT_COPIED = {REVISION, "deployment.kubernetes.io/revision-history", "deployment.kubernetes.io/desired-replicas",
               "deployment.kubernetes.io/max-replicas", "kubectl.kubernetes.io/last-applied-configuration",
               "deprecated.deployment.rollback.to"}
SLICE_MANAGER = "endpointslice-controller.k8s.io"


def _pruned(value: Any) -> Any:
    """A template as it means: without nulls and empty maps/lists (what a Go client adds when it re-encodes one,
    e.g. ``kubectl rollout undo`` sends ``creationTimestamp: null`` and ``resources: {}``)."""
    if isinstance(value, dict):
        out = {k: _pruned(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v not in (None, {}, [])}
    if isinstance(value, list):
        return [_pruned(v) for v in value]
    return value


def template_hash(template: Obj | None) -> str:
    """The pod-template-hash of a deployment's template (its ReplicaSet's name suffix)."""
    t = copy.deepcopy(template or {})
    ((t.get("metadata") or {}).get("labels") or {}).pop(POD_HASH_LABEL, None)
    return hashlib.sha256(json.dumps(_pruned(t), sort_keys=True).encode()).hexdigest()[:10]


def _owned(c: Any, plural: str, ns: str, owner: Obj) -> list[Obj]:
    """Objects of a kind in a namespace controlled by ``owner``, oldest first (the store keeps insertion order)."""
    return [o for (p, n, _), o in c.objects.items() if p == plural and n == ns and controlled_by(o, owner)]


def _store(c: Any, res: Any, obj: Obj) -> Obj:
    return c.put_new(res, obj)


def _delete(c: Any, key: Key) -> None:
    if c.objects.pop(key, None) is not None:
        c.rv += 1
        c._dirty = True
        c.pod_logs.pop(key, None)


def _update(c: Any, res: Any, obj: Obj, change: Obj) -> None:
    """Merge ``change`` (top-level sections) into ``obj``; stamp it only when something differs."""
    if all(obj.get(k) == v for k, v in change.items()):
        return
    obj.update(copy.deepcopy(change))
    c._stamp(obj, res, new=False)


# -- ReplicaSets and Pods ------------------------------------------------------------------------------------


def sync_deployment(c: Any, key: Key, dep: Obj, *, old: int, updated: int, new_ready: int, current: str,
                    previous: str | None, broken: bool) -> None:
    """The deployment's ReplicaSets and Pods as the controller's counts say: ``updated`` pods of the current
    template (``new_ready`` of them ready, the others crash-looping when ``broken``), ``old`` ready pods of the
    previous template, none of any other."""
    ns = key[1]
    meta = dep["metadata"]
    revision = (meta.get("annotations") or {}).get(REVISION, "1")
    sets = {rs["metadata"]["labels"].get(POD_HASH_LABEL): rs for rs in _owned(c, "replicasets", ns, dep)}
    rs_new = sets.get(current)
    if rs_new is None:
        rs_new = _store(c, REPLICASETS, replicaset_object(dep, current, revision))
        sets[current] = rs_new
    elif rs_new["metadata"].get("annotations", {}).get(REVISION) != revision:  # a rollback reuses its ReplicaSet
        rs_new["metadata"].setdefault("annotations", {})[REVISION] = revision
        c._stamp(rs_new, REPLICASETS, new=False)
    counts = {current: (updated, new_ready)}
    if old and previous not in sets:  # after a restart of the emulator: the old pods' set is the largest other one
        others = sorted((h for h in sets if h != current), key=lambda h: sets[h]["spec"].get("replicas", 0))
        previous = others[-1] if others else None
    if previous and previous != current and previous in sets:
        counts[previous] = (old, old)
    for h, rs in sets.items():
        replicas, ready = counts.get(h, (0, 0))
        pods = sync_pods(c, rs, replicas, ready, crash=broken and h == current)
        status = {"replicas": len(pods), "fullyLabeledReplicas": len(pods), "readyReplicas": ready,
                  "availableReplicas": ready, "observedGeneration": rs["metadata"].get("generation", 1)}
        rs_spec = dict(rs["spec"], replicas=replicas)
        _update(c, REPLICASETS, rs, {"spec": rs_spec, "status": {k: v for k, v in status.items() if v}})
    _prune_history(c, dep, sets, keep={current, previous})


def _prune_history(c: Any, dep: Obj, sets: dict[str, Obj], keep: set) -> None:
    limit = int(dep["spec"].get("revisionHistoryLimit", 10))
    idle = [rs for h, rs in sets.items() if h not in keep and not rs["spec"].get("replicas")]
    idle.sort(key=lambda rs: int(rs["metadata"].get("annotations", {}).get(REVISION, "0")))
    for rs in idle[:max(0, len(idle) - limit)]:
        _delete(c, ("replicasets", rs["metadata"]["namespace"], rs["metadata"]["name"]))


def replicaset_object(dep: Obj, pod_hash: str, revision: str) -> Obj:
    meta, spec = dep["metadata"], dep["spec"]
    template = copy.deepcopy(spec.get("template") or {})
    labels = dict((template.get("metadata") or {}).get("labels") or {}, **{POD_HASH_LABEL: pod_hash})
    template.setdefault("metadata", {})["labels"] = labels
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k not in _NOT_COPIED}
    annotations[REVISION] = revision
    selector = copy.deepcopy(spec.get("selector") or {})
    selector.setdefault("matchLabels", {})[POD_HASH_LABEL] = pod_hash
    return {"apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {"name": f"{meta['name']}-{pod_hash}", "namespace": meta["namespace"], "labels": labels,
                         "annotations": annotations, "ownerReferences": [owner_ref(dep, DEPLOYMENTS)]},
            "spec": {"replicas": 0, "minReadySeconds": 0, "selector": selector, "template": template},
            "status": {}}


def sync_pods(c: Any, rs: Obj, replicas: int, ready: int, *, crash: bool) -> list[Obj]:
    """The ReplicaSet's pods: created or deleted (not-ready ones first, then the newest) to ``replicas``; the
    oldest ``ready`` of them Ready, the rest starting, or crash-looping when ``crash``."""
    ns = rs["metadata"]["namespace"]
    pods = _owned(c, "pods", ns, rs)
    while len(pods) > replicas:
        victim = next((p for p in reversed(pods) if not is_ready(p)), pods[-1])
        pods.remove(victim)
        _delete(c, ("pods", ns, victim["metadata"]["name"]))
    while len(pods) < replicas:
        pods.append(_store(c, PODS, pod_object(c, rs)))
    for i, pod in enumerate(pods):
        want_ready = i < ready
        if is_ready(pod) != want_ready or (not want_ready and _crashing(pod) != crash):
            pod["status"] = _pod_status(pod, want_ready, crash)
            c._stamp(pod, PODS, new=False)
            _log(c, pod, "readiness probe passed: serving on :8080" if want_ready else
                 "panic: lab fault (lab.opsflow.dev/broken): exit status 1" if crash else "waiting to be ready")
    return pods


def is_ready(pod: Obj) -> bool:
    return any(cond.get("type") == "Ready" and cond.get("status") == "True"
               for cond in (pod.get("status") or {}).get("conditions") or [])


def _crashing(pod: Obj) -> bool:
    return any((s.get("state") or {}).get("waiting", {}).get("reason") == "CrashLoopBackOff"
               for s in (pod.get("status") or {}).get("containerStatuses") or [])


def _suffix() -> str:
    return "".join(random.choices(string.ascii_lowercase + string.digits, k=5))


def pod_object(c: Any, rs: Obj) -> Obj:
    template = copy.deepcopy(rs["spec"].get("template") or {})
    nodes = [k[2] for k, n in c.objects.items() if k[0] == "nodes"] or ["node-1"]
    c.pod_seq += 1
    spec = dict(template.get("spec") or {})
    spec.update(nodeName=nodes[c.pod_seq % len(nodes)], restartPolicy=spec.get("restartPolicy", "Always"),
                dnsPolicy=spec.get("dnsPolicy", "ClusterFirst"), schedulerName="default-scheduler",
                terminationGracePeriodSeconds=spec.get("terminationGracePeriodSeconds", 30))
    ip = str(ipaddress.IPv4Address((10 << 24 | 244 << 16) + c.pod_seq))
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": f"{rs['metadata']['name']}-{_suffix()}", "generateName": f"{rs['metadata']['name']}-",
                        "namespace": rs["metadata"]["namespace"],
                        "labels": dict((template.get("metadata") or {}).get("labels") or {}),
                        "ownerReferences": [owner_ref(rs, REPLICASETS)]},
           "spec": spec, "status": {"podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "192.168.49.2",
                                    "startTime": now_iso(), "qosClass": "BestEffort"}}
    pod["status"] = _pod_status(pod, False, False)
    return pod


def _pod_status(pod: Obj, ready: bool, crash: bool) -> Obj:
    now = now_iso()
    old = pod.get("status") or {}
    restarts = {s["name"]: s.get("restartCount", 0) for s in old.get("containerStatuses") or []}
    statuses = []
    for ctr in (pod.get("spec") or {}).get("containers") or []:
        st: Obj = {"name": ctr["name"], "image": ctr.get("image", ""), "imageID": "", "ready": ready,
                   "started": ready or not crash, "restartCount": restarts.get(ctr["name"], 0) + (1 if crash else 0)}
        if crash and not ready:
            st["state"] = {"waiting": {"reason": "CrashLoopBackOff",
                                       "message": f"back-off restarting failed container {ctr['name']}"}}
            st["lastState"] = {"terminated": {"exitCode": 1, "reason": "Error", "finishedAt": now}}
        else:
            st["state"] = {"running": {"startedAt": old.get("startTime", now)}}
        statuses.append(st)
    flag = "True" if ready else "False"
    conditions = [{"type": t, "status": s, "lastTransitionTime": now} for t, s in
                  (("PodScheduled", "True"), ("Initialized", "True"), ("ContainersReady", flag), ("Ready", flag))]
    keep = {k: old[k] for k in ("podIP", "podIPs", "hostIP", "startTime", "qosClass") if k in old}
    return {"phase": "Running", **keep, "conditions": conditions, "containerStatuses": statuses}


# -- logs ---------------------------------------------------------------------------------------------------


def _log(c: Any, pod: Obj, line: str) -> None:
    key = ("pods", pod["metadata"]["namespace"], pod["metadata"]["name"])
    lines = c.pod_logs.setdefault(key, _first_lines(pod))
    lines.append(f"{now_iso()} {'ERROR' if line.startswith('panic') else 'INFO'} {line}")
    del lines[:-1000]


def _first_lines(pod: Obj) -> list[str]:
    ts = pod["metadata"].get("creationTimestamp") or now_iso()
    ctr = ((pod.get("spec") or {}).get("containers") or [{}])[0]
    return [f"{ts} INFO starting {ctr.get('name')} image={ctr.get('image')}",
            f"{ts} INFO pod {pod['metadata']['name']} on node {(pod.get('spec') or {}).get('nodeName')}",
            f"{ts} INFO config loaded from /etc/app/config.yaml",
            f"{ts} INFO connected to the database",
            f"{ts} INFO listening on :8080"]


def pod_log(c: Any, pod: Obj, query: dict) -> str:
    """``GET pods/{name}/log``: the pod's lines (``tailLines``, ``container`` as the API server reads them)."""
    key = ("pods", pod["metadata"]["namespace"], pod["metadata"]["name"])
    lines = c.pod_logs.setdefault(key, _first_lines(pod))
    tail = query.get("tailLines")
    if tail is not None and str(tail).isdigit():
        lines = lines[len(lines) - min(int(tail), len(lines)):]
    return "".join(f"{line}\n" for line in lines)


# -- garbage collection, Endpoints, EndpointSlices -------------------------------------------------------------


def collect_garbage(c: Any) -> None:
    """Delete ReplicaSets whose deployment is gone, and pods whose ReplicaSet is gone (the garbage collector)."""
    for plural, owner_plural in (("replicasets", "deployments"), ("pods", "replicasets")):
        owners = {o["metadata"]["uid"] for (p, _, _), o in c.objects.items() if p == owner_plural}
        for key, obj in list(c.objects.items()):
            refs = [r for r in obj["metadata"].get("ownerReferences") or [] if r.get("controller")]
            if key[0] == plural and refs and refs[0]["uid"] not in owners:
                _delete(c, key)


def _matches(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _target_port(port: Obj, pods: Iterable[Obj]) -> int:
    target = port.get("targetPort", port.get("port"))
    if isinstance(target, int):
        return target
    for pod in pods:
        for ctr in pod["spec"].get("containers") or []:
            for p in ctr.get("ports") or []:
                if p.get("name") == target:
                    return int(p["containerPort"])
    return int(port.get("port", 80))


def sync_endpoints(c: Any) -> None:
    """One Endpoints and one EndpointSlice per service with a selector: its pods' addresses, ready or not."""
    services = {k: s for k, s in c.objects.items() if k[0] == "services"}
    for (_, ns, name), svc in services.items():
        selector = (svc.get("spec") or {}).get("selector") or {}
        if not selector:
            continue
        pods = [p for (pl, n, _), p in c.objects.items() if pl == "pods" and n == ns
                and _matches(selector, p["metadata"].get("labels") or {}) and (p.get("status") or {}).get("podIP")]
        ports = [{k: v for k, v in (("name", p.get("name")), ("port", _target_port(p, pods)),
                                    ("protocol", p.get("protocol", "TCP"))) if v is not None}
                 for p in (svc.get("spec") or {}).get("ports") or []]
        addresses = [(p, is_ready(p)) for p in pods]

        def address(p: Obj) -> Obj:
            return {"ip": p["status"]["podIP"], "nodeName": p["spec"].get("nodeName"),
                    "targetRef": {"kind": "Pod", "namespace": ns, "name": p["metadata"]["name"],
                                  "uid": p["metadata"]["uid"]}}

        subset: Obj = {}
        if any(r for _, r in addresses):
            subset["addresses"] = [address(p) for p, r in addresses if r]
        if any(not r for _, r in addresses):
            subset["notReadyAddresses"] = [address(p) for p, r in addresses if not r]
        subsets = [dict(subset, ports=ports)] if subset else []
        labels = dict(svc["metadata"].get("labels") or {})
        ep = c.objects.get(("endpoints", ns, name))
        if ep is None:
            _store(c, ENDPOINTS, {"apiVersion": "v1", "kind": "Endpoints",
                                  "metadata": {"name": name, "namespace": ns, "labels": labels}, "subsets": subsets})
        else:
            _update(c, ENDPOINTS, ep, {"subsets": subsets})
        slice_eps = [{"addresses": [p["status"]["podIP"]], "nodeName": p["spec"].get("nodeName"),
                      "conditions": {"ready": r, "serving": r, "terminating": False},
                      "targetRef": address(p)["targetRef"]} for p, r in addresses]
        slice_name = f"{name}-{hashlib.sha256(name.encode()).hexdigest()[:5]}"
        sl = c.objects.get(("endpointslices", ns, slice_name))
        if sl is None:
            _store(c, ENDPOINTSLICES, {
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
                "metadata": {"name": slice_name, "namespace": ns, "generateName": f"{name}-",
                             "labels": {**labels, "kubernetes.io/service-name": name,
                                        "endpointslice.kubernetes.io/managed-by": SLICE_MANAGER},
                             "ownerReferences": [owner_ref(svc, SERVICES)]},
                "endpoints": slice_eps, "ports": ports})
        else:
            _update(c, ENDPOINTSLICES, sl, {"endpoints": slice_eps, "ports": ports})
    for key, obj in list(c.objects.items()):
        if key[0] == "endpoints" and ("services", key[1], key[2]) not in services:
            _delete(c, key)
        elif key[0] == "endpointslices":
            svc_name = (obj["metadata"].get("labels") or {}).get("kubernetes.io/service-name")
            managed = (obj["metadata"].get("labels") or {}).get("endpointslice.kubernetes.io/managed-by")
            if managed == SLICE_MANAGER and ("services", key[1], svc_name) not in services:
                _delete(c, key)
