"""Server-side printing: ``kubectl get`` asks for a ``meta.k8s.io/v1`` Table (``Accept: ...;as=Table;...``) and
prints the API server's columns. These are the columns a kube-apiserver sends for the kinds the seeds' commands
list; a kind without columns here is served as a plain list (kubectl then prints NAME and AGE)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Callable

from lab.k8s.resources import (
    DEPLOYMENTS,
    ENDPOINTS,
    HPAS,
    NAMESPACES,
    NODES,
    PODS,
    REPLICASETS,
    SERVICES,
    Obj,
    Resource,
    selector_string,
)


def wanted(accept: str | None) -> bool:
    return "as=Table" in (accept or "")


def age(timestamp: str | None, now: datetime | None = None) -> str:
    """kubectl's short human duration (k8s.io/apimachinery duration.HumanDuration)."""
    if not timestamp:
        return "<unknown>"
    then = datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    s = max(0, int(((now or datetime.now(timezone.utc)) - then).total_seconds()))
    if s < 120:
        return f"{s}s"
    m = s // 60
    if m < 10:
        return f"{m}m{s % 60}s" if s % 60 else f"{m}m"
    if m < 180:
        return f"{m}m"
    h = m // 60
    if h < 8:
        return f"{h}h{m % 60}m" if m % 60 else f"{h}h"
    if h < 48:
        return f"{h}h"
    return f"{h // 24}d"


def _pod(p: Obj) -> list:
    st = p.get("status") or {}
    cs = st.get("containerStatuses") or []
    reason = st.get("phase", "Pending")
    for c in cs:
        waiting = (c.get("state") or {}).get("waiting")
        if waiting and waiting.get("reason"):
            reason = waiting["reason"]
    if p["metadata"].get("deletionTimestamp"):
        reason = "Terminating"
    ready = sum(1 for c in cs if c.get("ready"))
    total = len((p.get("spec") or {}).get("containers") or []) or len(cs)
    return [f"{ready}/{total}", reason, sum(int(c.get("restartCount", 0)) for c in cs), st.get("podIP", "<none>"),
            (p.get("spec") or {}).get("nodeName", "<none>")]


def _deployment(d: Obj) -> list:
    st, spec = d.get("status") or {}, d.get("spec") or {}
    ctrs = ((spec.get("template") or {}).get("spec") or {}).get("containers") or []
    return [f"{st.get('readyReplicas', 0)}/{spec.get('replicas', 1)}", st.get("updatedReplicas", 0),
            st.get("availableReplicas", 0), ",".join(c["name"] for c in ctrs), ",".join(c["image"] for c in ctrs),
            selector_string((spec.get("selector") or {}).get("matchLabels") or {})]


def _replicaset(r: Obj) -> list:
    st, spec = r.get("status") or {}, r.get("spec") or {}
    return [spec.get("replicas", 0), st.get("replicas", 0), st.get("readyReplicas", 0)]


def _service(s: Obj) -> list:
    spec = s.get("spec") or {}
    ports = ",".join(f"{p['port']}/{p.get('protocol', 'TCP')}" for p in spec.get("ports") or [])
    return [spec.get("type", "ClusterIP"), spec.get("clusterIP", "<none>"), "<none>", ports or "<none>"]


def _endpoints(e: Obj) -> list:
    pairs = [f"{a['ip']}:{p['port']}" for s in e.get("subsets") or [] for p in s.get("ports") or [{"port": 0}]
             for a in s.get("addresses") or []]
    shown = ",".join(pairs[:3]) + (f" + {len(pairs) - 3} more..." if len(pairs) > 3 else "")
    return [shown or "<none>"]


def _hpa(h: Obj) -> list:
    spec, st = h.get("spec") or {}, h.get("status") or {}
    ref = spec.get("scaleTargetRef") or {}
    targets = []
    for m in spec.get("metrics") or []:
        if m.get("type") == "Resource":
            r = m.get("resource") or {}
            util = (r.get("target") or {}).get("averageUtilization")
            targets.append(f"{r.get('name')}: <unknown>/{util}%")
    return [f"{ref.get('kind')}/{ref.get('name')}", ", ".join(targets) or "<none>", spec.get("minReplicas", 1),
            spec.get("maxReplicas"), st.get("currentReplicas", 0)]


def _namespace(n: Obj) -> list:
    return [(n.get("status") or {}).get("phase", "Active")]


def _node(n: Obj) -> list:
    ready = next((c for c in (n.get("status") or {}).get("conditions") or [] if c.get("type") == "Ready"), {})
    return ["Ready" if ready.get("status") == "True" else "NotReady", "<none>"]


_S, _I = "string", "integer"
# resource -> (columns after Name: (title, type, priority), cells after the name, the version column's place)
COLUMNS: dict[Resource, tuple[list[tuple[str, str, int]], Callable[[Obj], list]]] = {
    PODS: ([("Ready", _S, 0), ("Status", _S, 0), ("Restarts", _I, 0), ("IP", _S, 1), ("Node", _S, 1)], _pod),
    DEPLOYMENTS: ([("Ready", _S, 0), ("Up-to-date", _I, 0), ("Available", _I, 0), ("Containers", _S, 1),
                   ("Images", _S, 1), ("Selector", _S, 1)], _deployment),
    REPLICASETS: ([("Desired", _I, 0), ("Current", _I, 0), ("Ready", _I, 0)], _replicaset),
    SERVICES: ([("Type", _S, 0), ("Cluster-IP", _S, 0), ("External-IP", _S, 0), ("Port(s)", _S, 0)], _service),
    ENDPOINTS: ([("Endpoints", _S, 0)], _endpoints),
    HPAS: ([("Reference", _S, 0), ("Targets", _S, 0), ("MinPods", _I, 0), ("MaxPods", _S, 0),
            ("Replicas", _I, 0)], _hpa),
    NAMESPACES: ([("Status", _S, 0)], _namespace),
    NODES: ([("Status", _S, 0), ("Roles", _S, 0)], _node),
}
_AGE_FIRST = {PODS: 4, DEPLOYMENTS: 4, REPLICASETS: 4, SERVICES: 5, ENDPOINTS: 2, HPAS: 6, NAMESPACES: 2, NODES: 3}


def table(res: Resource, items: list[Obj], resource_version: str, *, include_object: str = "Metadata") -> Obj | None:
    """A Table of ``items`` (None when this kind has no columns here: the caller sends the plain list)."""
    if res not in COLUMNS:
        return None
    columns, cells = COLUMNS[res]
    defs = [{"name": "Name", "type": "string", "format": "name", "description": "Name of the object", "priority": 0}]
    defs += [{"name": n, "type": t, "format": "", "description": n, "priority": p} for n, t, p in columns]
    defs.insert(_AGE_FIRST[res], {"name": "Age", "type": "string", "format": "",
                                  "description": "CreationTimestamp", "priority": 0})
    if res is NODES:
        defs.append({"name": "Version", "type": "string", "format": "", "description": "kubelet", "priority": 0})
    rows = []
    for obj in items:
        row = [obj["metadata"]["name"], *cells(obj)]
        row.insert(_AGE_FIRST[res], age(obj["metadata"].get("creationTimestamp")))
        if res is NODES:
            row.append(((obj.get("status") or {}).get("nodeInfo") or {}).get("kubeletVersion", ""))
        entry: dict[str, Any] = {"cells": row}
        if include_object == "Object":
            entry["object"] = dict(obj, kind=res.kind, apiVersion=res.api_version)
        elif include_object != "None":
            entry["object"] = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                               "metadata": obj["metadata"]}
        rows.append(entry)
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": resource_version},
            "columnDefinitions": defs, "rows": rows}
