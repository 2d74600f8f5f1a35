"""A small stateful Kubernetes API server for the lab: one process per region, one "cluster" each.

The real ``kubernetes`` Python client talks to it over HTTP exactly as it talks to a
kube-apiserver, so the activities are tested with the real client, the real
serialization (the client's pydantic models reject a malformed object) and the real
error paths (``Status`` objects with 404/409/422/401/403).

Why not ``kmock``: its ``KubernetesEmulator`` is an asyncio in-memory store that
merges every PATCH as a plain dict, has no ``metadata.generation`` /
``status.observedGeneration``, no ``/scale`` subresource (it would return the
Deployment instead of a ``Scale``), keeps every version of every object forever
(a controller ticking status would grow it without bound) and answers 404 with a
traceback instead of a Kubernetes ``NotFound`` status. Making it behave like a
cluster meant replacing most of it, so this is a focused server on
``http.server.ThreadingHTTPServer`` instead.

What it serves (core ``v1`` and ``apps/v1``, JSON only):

* ``GET /version``, ``/healthz``, ``/readyz``, ``/livez``, discovery (``/api``, ``/apis``,
  ``/api/v1``, ``/apis/apps/v1``)
* namespaces: list/get/create/delete
* nodes: list/get, ``PATCH``/``PUT`` (and ``/status``)
* services and deployments: list (namespaced and cluster-wide, ``labelSelector`` and
  ``fieldSelector=metadata.name=...``), get, create, ``PUT``, ``PATCH`` with
  ``application/merge-patch+json`` (RFC 7386), ``application/strategic-merge-patch+json``
  (the subset built-in types need: merge keys for containers/env/ports/conditions/...,
  ``$patch: delete|replace``) and ``application/json-patch+json`` (RFC 6902), delete;
  ``/status`` subresource
* ``deployments/{name}/scale``: ``GET``/``PATCH``/``PUT`` of an ``autoscaling/v1`` ``Scale``
* what a cluster derives (lab/k8s/workloads.py): ReplicaSets (``apps/v1``, one per pod template, with the
  ``deployment.kubernetes.io/revision`` annotation ``kubectl rollout history|undo`` read), Pods (one per replica,
  owned by their ReplicaSet: phase, Ready condition, container statuses, ``CrashLoopBackOff`` when broken),
  ``pods/{name}/log`` (``tailLines``), Endpoints and EndpointSlices (``discovery.k8s.io/v1``) of services
* HorizontalPodAutoscalers (``autoscaling/v2``, lab/k8s/autoscaler.py) and a controller keeping each target
  deployment inside ``[minReplicas, maxReplicas]``
* ``?watch=true`` on lists (chunked events; ``kubectl rollout status``), and server-side ``Table`` answers when
  the client asks for them (``kubectl get``'s columns, lab/k8s/tables.py)

Semantics kept from the real API server: ``resourceVersion`` bumps on every write and
is a precondition when the request carries one (409 ``Conflict``); deployments'
``metadata.generation`` increments on spec changes only; writes to the main resource
ignore ``status`` and writes to ``/status`` ignore everything else; zero counters are
omitted from deployment status (``omitempty``); ``?dryRun=All`` validates without storing;
unknown objects answer 404 with a ``Status`` (``deployments.apps "web" not found``).

A controller thread moves every deployment's status toward its spec one pod per
``seconds_per_replica`` (default 0.2 s): ``updatedReplicas``, ``readyReplicas``,
``availableReplicas``, ``observedGeneration``, and the ``Available`` / ``Progressing``
conditions (``ProgressDeadlineExceeded`` after ``spec.progressDeadlineSeconds``
without progress). A template change rolls pods over, respecting ``maxUnavailable``.

Fault knobs, all reachable through the ordinary API so a test can flip them in another
process (``kubectl annotate`` would do it too):

* annotation ``lab.opsflow.dev/broken: "true"`` on a deployment: its new pods never get
  ready (a crash loop); old ready pods stay, so a rollout stalls and a scale-up never
  completes;
* annotation ``lab.opsflow.dev/not-ready: "true"`` on a node: the controller turns its
  ``Ready`` condition ``False``; when no node is Ready, no new pod gets ready;
* seed ``auth: {token: ..., readonly_token: ...}``: requests without a valid bearer token
  get 401, writes with the read-only token get 403;
* the emulators' one fault API (lab/faults.py; a request's key is ``"<METHOD> <path>"``):
  ``emu.inject_fault("/deployments/", status=503, count=2)`` answers the next two matching API requests with
  that status (429/500/503 for retry tests); also ``POST /_emulator/faults``, random faults
  (``OPSFLOW_LAB_FAULTS``, ``POST /_emulator/fault_rate``) and the other admin endpoints of lab/emulator.py
  (``/_emulator/counts``, ``/_emulator/state``, ...).

Seed (JSON or YAML)::

    seconds_per_replica: 0.2          # optional
    namespaces: [shop]                # optional: namespaces of the objects below are created anyway
    nodes: [node-1, {name: node-2, ready: false}]   # default: one Ready node "node-1"
    deployments:
      - name: web
        namespace: shop               # default "default"
        replicas: 3
        ready: 3                      # default: replicas (0 when broken)
        broken: false
        labels: {app: web}            # default {app: <name>}
        progress_deadline_seconds: 600
        max_unavailable: "25%"
        image: registry.local/app:1   # default
    services:
      - name: web
        namespace: shop
        annotations: {}
        ports: [80]                   # default [80]
        selector: {app: web}          # default {app: <name>}
    httproutes:                       # Gateway API HTTPRoutes (one rule; backendRefs with weights)
      - {name: web, namespace: shop, backends: [{name: web, port: 80, weight: 100}]}
    hpas:                             # HorizontalPodAutoscalers on deployments (autoscaling/v2)
      - {name: web, namespace: shop, deployment: web, min: 3, max: 10, cpu: 70}
    hpa_sync_seconds: 0.5             # optional: the HPA controller's period (Kubernetes: 15 s)
      - {name: web, namespace: shop, backends: [{name: web, port: 80, weight: 100}]}
    auth: {token: s3cret, readonly_token: peek}   # optional

Run as a process (logs only, on stderr)::

    python -m lab.k8s_emulator --seed seed.yaml --port 18443 [--state-file state.json]

or in-process: ``emu = start_emulator(seed, port=0)`` (a K8sEmulator), then ``emu.url`` and
``emu.stop()``. ``write_kubeconfig(path, {"lab-westeurope": url, ...})`` writes a
kubeconfig with one context (and cluster and user) per name.
"""

from __future__ import annotations

import argparse
import copy
import ipaddress
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from lab.emulator import Emulator, is_admin_path
from lab.faults import Fault
from lab.k8s import autoscaler, tables, workloads
from lab.k8s.errors import ApiError, bad_request, conflict, invalid, not_found, status_details
from lab.k8s.patches import PATCHERS
from lab.k8s.resources import (
    BY_KIND,
    CATEGORIES,
    DEPLOYMENTS,
    HPAS,
    HTTPROUTES,
    NAMESPACES,
    NODES,
    PODS,
    REPLICASETS,
    RESOURCES,
    SERVICES,
    SHORT,
    VERBS,
    Key,
    Obj,
    Resource,
    now_iso,
    selector_string,
)

log = logging.getLogger("lab.k8s_emulator")

BROKEN_ANNOTATION = "lab.opsflow.dev/broken"
NODE_NOT_READY_ANNOTATION = "lab.opsflow.dev/not-ready"
DEFAULT_SECONDS_PER_REPLICA = 0.2
SERVER_VERSION = {
    "major": "1",
    "minor": "31",
    "gitVersion": "v1.31.0-opsflow-lab",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2024-08-13T00:00:00Z",
    "goVersion": "go1.22.5",
    "compiler": "gc",
    "platform": "linux/amd64",
}



# -- object shapes -----------------------------------------------------------------------------------------


_now = now_iso


def _max_unavailable(spec: Obj) -> Any:
    return spec.get("strategy", {}).get("rollingUpdate", {}).get("maxUnavailable", "25%")


def _scaled(value: Any, total: int, round_up: bool) -> int:
    """maxUnavailable / maxSurge: an int or a percentage of the replicas."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"(\d+)%", str(value or "0"))
    if not m:
        return 0
    pct = int(m.group(1)) * total
    return -(-pct // 100) if round_up else pct // 100


def namespace_object(name: str) -> Obj:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name}},
            "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}


def node_object(name: str, ready: bool = True) -> Obj:
    meta: Obj = {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                                          "kubernetes.io/arch": "amd64"}}
    if not ready:
        meta["annotations"] = {NODE_NOT_READY_ANNOTATION: "true"}
    return {"apiVersion": "v1", "kind": "Node", "metadata": meta, "spec": {},
            "status": {"conditions": [_node_ready_condition(ready, _now())],
                       "nodeInfo": {"architecture": "amd64", "bootID": str(uuid.uuid4()),
                                    "containerRuntimeVersion": "containerd://1.7.20",
                                    "kernelVersion": "6.1.0-lab", "kubeProxyVersion": "v1.31.0",
                                    "kubeletVersion": "v1.31.0", "machineID": uuid.uuid4().hex,
                                    "operatingSystem": "linux", "osImage": "opsflow lab",
                                    "systemUUID": str(uuid.uuid4())}}}


def _node_ready_condition(ready: bool, now: str) -> Obj:
    return {"type": "Ready", "status": "True" if ready else "False",
            "reason": "KubeletReady" if ready else "KubeletNotReady",
            "message": "kubelet is posting ready status" if ready else "container runtime is down (lab fault)",
            "lastHeartbeatTime": now, "lastTransitionTime": now}


def deployment_object(name: str, namespace: str, replicas: int, *, labels: dict | None = None,
                      broken: bool = False, progress_deadline_seconds: int = 600,
                      max_unavailable: Any = "25%", image: str = "registry.local/app:1") -> Obj:
    labels = dict(labels or {"app": name})
    meta: Obj = {"name": name, "namespace": namespace, "labels": dict(labels)}
    if broken:
        meta["annotations"] = {BROKEN_ANNOTATION: "true"}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": dict(labels)},
            "template": {"metadata": {"labels": dict(labels)},
                         "spec": {"containers": [{"name": name, "image": image,
                                                  "ports": [{"containerPort": 8080, "protocol": "TCP"}]}]}},
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxUnavailable": max_unavailable, "maxSurge": "25%"}},
            "progressDeadlineSeconds": progress_deadline_seconds,
            "revisionHistoryLimit": 10,
        },
        "status": {},
    }


def service_object(name: str, namespace: str, *, ports: list | None = None, selector: dict | None = None,
                   annotations: dict | None = None, labels: dict | None = None) -> Obj:
    meta: Obj = {"name": name, "namespace": namespace}
    if annotations:
        meta["annotations"] = {str(k): str(v) for k, v in annotations.items()}
    if labels:
        meta["labels"] = dict(labels)
    port_specs = []
    for p in ports or [80]:
        if isinstance(p, dict):
            port_specs.append({"protocol": "TCP", "targetPort": p.get("port"), **p})
        else:
            port_specs.append({"name": f"p{int(p)}", "port": int(p), "protocol": "TCP", "targetPort": int(p)})
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta,
            "spec": {"type": "ClusterIP", "selector": dict(selector or {"app": name}), "ports": port_specs,
                     "sessionAffinity": "None"},
            "status": {"loadBalancer": {}}}


def httproute_object(name: str, namespace: str, backends: list) -> Obj:
    """A Gateway API HTTPRoute with one rule whose backendRefs are services with weights."""
    refs = [{"name": b["name"], "port": int(b.get("port", 80)), "weight": int(b.get("weight", 1))} for b in backends]
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"parentRefs": [{"name": "lab-gateway"}], "rules": [{"backendRefs": refs}]}, "status": {}}


# -- the store and the controller ----------------------------------------------------------------------------

class Cluster:
    """All objects of one emulated cluster, the deployment/node controller, and the annotation knobs."""

    def __init__(self, seconds_per_replica: float = DEFAULT_SECONDS_PER_REPLICA, state_file: str | None = None,
                 auth: dict | None = None):
        self.lock = threading.RLock()
        self.objects: dict[Key, Obj] = {}
        self.rv = 0
        self.seconds_per_replica = float(seconds_per_replica)
        self.state_file = Path(state_file) if state_file else None
        self.auth = dict(auth or {})
        self._dirty = False
        self._saved_at = 0.0
        self._ip = 10 << 24 | 96 << 16 | 0 << 8 | 10
        # controller bookkeeping that is not part of any object
        self._templates: dict[Key, str] = {}
        self._stepped_at: dict[Key, float] = {}
        self._progress_at: dict[Key, float] = {}
        self._previous: dict[Key, str] = {}  # a deployment's template before its latest change (its old pods')
        self.pod_seq = 0
        self.pod_logs: dict[Key, list[str]] = {}
        self.hpa_sync_seconds = autoscaler.DEFAULT_SYNC_SECONDS
        self.hpa_synced_at: dict[Key, float] = {}

    # -- storage -----------------------------------------------------------------------------------------
    def _stamp(self, obj: Obj, res: Resource, *, new: bool) -> None:
        self.rv += 1
        meta = obj.setdefault("metadata", {})
        meta["resourceVersion"] = str(self.rv)
        obj["apiVersion"], obj["kind"] = res.api_version, res.kind
        if new:
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = _now()
            if res in GENERATED:
                meta["generation"] = 1
        self._dirty = True

    def put_new(self, res: Resource, obj: Obj) -> Obj:
        """Store a new object (seed or create) with server-owned metadata."""
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        ns = meta.get("namespace", "") if res.namespaced else ""
        if res.namespaced:
            meta["namespace"] = ns
        for k in ("resourceVersion", "uid", "creationTimestamp", "generation"):
            meta.pop(k, None)
        if res is SERVICES:
            spec = obj.setdefault("spec", {})
            if spec.get("type", "ClusterIP") != "ExternalName" and not spec.get("clusterIP"):
                self._ip += 1
                spec["clusterIP"] = str(ipaddress.IPv4Address(self._ip))
                spec["clusterIPs"] = [spec["clusterIP"]]
        self._stamp(obj, res, new=True)
        key = (res.plural, ns, meta["name"])
        self.objects[key] = obj
        if res is DEPLOYMENTS:
            meta.setdefault("annotations", {}).setdefault("deployment.kubernetes.io/revision", "1")
            self._templates[key] = _template_hash(obj)
            self._progress_at[key] = time.monotonic()
        if res is PODS:
            self.pod_seq = max(self.pod_seq, _pod_seq(obj))
        return obj

    def seed(self, seed: dict) -> None:
        with self.lock:
            if "seconds_per_replica" in seed:
                self.seconds_per_replica = float(seed["seconds_per_replica"])
            if "hpa_sync_seconds" in seed:
                self.hpa_sync_seconds = float(seed["hpa_sync_seconds"])
            if seed.get("auth"):
                self.auth = dict(seed["auth"])
            namespaces = ["default", "kube-system", *seed.get("namespaces", [])]
            for d in [*seed.get("deployments", []), *seed.get("services", []), *seed.get("httproutes", []),
                      *seed.get("hpas", [])]:
                namespaces.append(d.get("namespace", "default"))
            for ns in dict.fromkeys(namespaces):
                self.put_new(NAMESPACES, namespace_object(ns))
            for n in seed.get("nodes", ["node-1"]):
                n = {"name": n} if isinstance(n, str) else n
                self.put_new(NODES, node_object(n["name"], ready=n.get("ready", True)))
            for d in seed.get("deployments", []):
                replicas = int(d.get("replicas", 1))
                broken = bool(d.get("broken", False))
                obj = deployment_object(d["name"], d.get("namespace", "default"), replicas, labels=d.get("labels"),
                                        broken=broken,
                                        progress_deadline_seconds=int(d.get("progress_deadline_seconds", 600)),
                                        max_unavailable=d.get("max_unavailable", "25%"),
                                        image=d.get("image", "registry.local/app:1"))
                ready = min(int(d.get("ready", 0 if broken else replicas)), replicas)
                obj["status"] = _deployment_status(replicas, replicas, ready, 1, obj["spec"], complete_deadline=False)
                self.put_new(DEPLOYMENTS, obj)
            for s in seed.get("services", []):
                self.put_new(SERVICES, service_object(s["name"], s.get("namespace", "default"), ports=s.get("ports"),
                                                      selector=s.get("selector"), annotations=s.get("annotations"),
                                                      labels=s.get("labels")))
            for r in seed.get("httproutes", []):
                route = httproute_object(r["name"], r.get("namespace", "default"), r.get("backends", []))
                self.put_new(HTTPROUTES, route)
            for h in seed.get("hpas", []):
                self.put_new(HPAS, autoscaler.hpa_object(h["name"], h.get("namespace", "default"),
                                                         h.get("deployment", h["name"]), int(h.get("min", 1)),
                                                         int(h["max"]), int(h.get("cpu", 70))))

    def load_state(self) -> bool:
        if not self.state_file or not self.state_file.exists():
            return False
        data = json.loads(self.state_file.read_text())
        with self.lock:
            self.rv = int(data.get("resourceVersion", 0))
            self.seconds_per_replica = float(data.get("seconds_per_replica", self.seconds_per_replica))
            self.hpa_sync_seconds = float(data.get("hpa_sync_seconds", self.hpa_sync_seconds))
            self.auth = data.get("auth", self.auth) or {}
            for obj in data["objects"]:
                res = BY_KIND[obj["kind"]]
                key = (res.plural, obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
                self.objects[key] = obj
                if res is DEPLOYMENTS:
                    self._templates[key] = _template_hash(obj)
                    self._progress_at[key] = time.monotonic()
                if res is PODS:
                    self.pod_seq = max(self.pod_seq, _pod_seq(obj))
                if res is SERVICES and obj.get("spec", {}).get("clusterIP", "None") != "None":
                    self._ip = max(self._ip, int(ipaddress.IPv4Address(obj["spec"]["clusterIP"])))
        log.info("loaded %d objects from %s", len(self.objects), self.state_file)
        return True

    def save_state(self, force: bool = False) -> None:
        if not self.state_file:
            return
        with self.lock:
            if not (self._dirty or force):
                return
            # in the store's order (creation order): a ReplicaSet's oldest pods stay the ready ones after a restart
            objects = list(self.objects.values())
            data = {"resourceVersion": self.rv, "seconds_per_replica": self.seconds_per_replica, "auth": self.auth,
                    "hpa_sync_seconds": self.hpa_sync_seconds, "objects": objects}
            self._dirty = False
            self._saved_at = time.monotonic()
        tmp = self.state_file.with_suffix(self.state_file.suffix + ".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.state_file)

    # -- annotation knobs --------------------------------------------------------------------------------
    def annotate(self, res: Resource, namespace: str, name: str, key: str, value: str | None) -> None:
        with self.lock:
            obj = self.objects.get((res.plural, namespace if res.namespaced else "", name))
            if obj is None:
                raise not_found(res, name)
            ann = obj["metadata"].setdefault("annotations", {})
            if value is None:
                ann.pop(key, None)
            else:
                ann[key] = value
            self._stamp(obj, res, new=False)

    # -- the controller ----------------------------------------------------------------------------------
    def reconcile(self) -> None:
        now = time.monotonic()
        with self.lock:
            nodes_ready = self._reconcile_nodes()
            autoscaler.reconcile(self, now)
            for key, obj in list(self.objects.items()):
                if key[0] == "deployments":
                    self._reconcile_deployment(key, obj, now, nodes_ready)
            workloads.collect_garbage(self)
            workloads.sync_endpoints(self)
        if self._dirty and now - self._saved_at > 0.5:
            self.save_state()

    def _reconcile_nodes(self) -> bool:
        any_ready = False
        for key, node in self.objects.items():
            if key[0] != "nodes":
                continue
            want = node["metadata"].get("annotations", {}).get(NODE_NOT_READY_ANNOTATION) != "true"
            any_ready = any_ready or want
            conds = node.setdefault("status", {}).setdefault("conditions", [])
            cur = next((c for c in conds if c.get("type") == "Ready"), None)
            if cur is None or (cur.get("status") == "True") != want:
                if cur is not None:
                    conds.remove(cur)
                conds.insert(0, _node_ready_condition(want, _now()))
                self._stamp(node, NODES, new=False)
                log.info("node %s is now %s", key[2], "Ready" if want else "NotReady")
        return any_ready

    def _reconcile_deployment(self, key: Key, obj: Obj, now: float, nodes_ready: bool) -> None:
        spec, meta = obj["spec"], obj["metadata"]
        status = obj.setdefault("status", {})
        before = copy.deepcopy(status)
        target = int(spec.get("replicas", 1))
        broken = meta.get("annotations", {}).get(BROKEN_ANNOTATION) == "true" or not nodes_ready

        total = int(status.get("replicas", 0))
        updated = min(int(status.get("updatedReplicas", 0)), total)
        old = total - updated
        ready = int(status.get("readyReplicas", 0))
        new_ready = max(0, min(ready - old, updated))

        template = _template_hash(obj)
        if self._templates.get(key) != template:  # a rollout: every current pod is now an old one
            if key in self._templates:
                self._previous[key] = self._templates[key]
            self._templates[key] = template
            old, updated, new_ready = old + updated, 0, 0
            self._progress_at[key] = now
            meta.setdefault("annotations", {})["deployment.kubernetes.io/revision"] = str(
                int(meta.get("annotations", {}).get("deployment.kubernetes.io/revision", "1")) + 1)

        progressed = False
        step = self.seconds_per_replica
        if step <= 0 or now - self._stepped_at.get(key, 0.0) >= step:
            for _ in range(10_000 if step <= 0 else 1):
                moved = False
                if updated < target:
                    updated += 1
                    moved = True
                    if not broken:
                        new_ready += 1
                elif updated > target:
                    updated -= 1
                    new_ready = min(new_ready, updated)
                    moved = True
                elif new_ready < updated and not broken:
                    new_ready += 1
                    moved = True
                max_unavailable = _scaled(_max_unavailable(spec), target, False)
                if old > 0 and (old - 1 + new_ready >= target - max_unavailable or new_ready >= target):
                    old -= 1
                    moved = True
                progressed = progressed or moved
                if not moved:
                    break
            self._stepped_at[key] = now
        if progressed:
            self._progress_at[key] = now

        deadline = spec.get("progressDeadlineSeconds", 600)
        stalled = now - self._progress_at.get(key, now) > float(deadline)
        new_status = _deployment_status(target, old + updated, old + new_ready, meta.get("generation", 1), spec,
                                        complete_deadline=stalled, updated=updated, previous=before.get("conditions"),
                                        name=meta["name"], template=template, progressed=progressed)
        if new_status != before:
            obj["status"] = new_status
            self._stamp(obj, DEPLOYMENTS, new=False)
        workloads.sync_deployment(self, key, obj, old=old, updated=updated, new_ready=new_ready, current=template,
                                  previous=self._previous.get(key), broken=broken)

    # -- API operations ----------------------------------------------------------------------------------
    def get(self, res: Resource, ns: str, name: str) -> Obj:
        obj = self.objects.get((res.plural, ns if res.namespaced else "", name))
        if obj is None:
            raise not_found(res, name)
        return obj

    def list(self, res: Resource, ns: str | None, label_selector: str | None, field_selector: str | None) -> list[Obj]:
        match_labels = _parse_label_selector(label_selector)
        match_fields = _parse_field_selector(field_selector)
        items = [o for (plural, ons, _), o in sorted(self.objects.items())
                 if plural == res.plural and (ns is None or ons == ns)]
        return [o for o in items if match_labels(o["metadata"].get("labels", {})) and match_fields(o)]


def _template_hash(obj: Obj) -> str:
    return workloads.template_hash(obj.get("spec", {}).get("template"))


def _pod_seq(pod: Obj) -> int:
    """The sequence number in a pod's IP (10.244.x.y), so pods made after a restart get new ones."""
    ip = (pod.get("status") or {}).get("podIP")
    return int(ipaddress.IPv4Address(ip)) - (10 << 24 | 244 << 16) if ip else 0


GENERATED = (DEPLOYMENTS, REPLICASETS, HPAS)  # kinds whose metadata.generation counts spec changes


def _deployment_status(target: int, total: int, ready: int, generation: int, spec: Obj, *, complete_deadline: bool,
                       updated: int | None = None, previous: list | None = None, name: str = "", template: str = "",
                       progressed: bool = False) -> Obj:
    updated = total if updated is None else updated
    now = _now()
    max_unavailable = _scaled(_max_unavailable(spec), target, False)
    available = ready
    complete = updated == target and total == target and available >= target
    rs = f'ReplicaSet "{name}-{template[:10]}"' if name else "ReplicaSet"
    prev = {c.get("type"): c for c in previous or []}

    def cond(ctype: str, ok: bool, reason: str, message: str, touch: bool) -> Obj:
        old = prev.get(ctype)
        status_s = "True" if ok else "False"
        c = {"type": ctype, "status": status_s, "reason": reason, "message": message,
             "lastUpdateTime": now, "lastTransitionTime": now}
        if old is not None:
            if old.get("status") == status_s:
                c["lastTransitionTime"] = old.get("lastTransitionTime", now)
            if old.get("status") == status_s and old.get("reason") == reason and not touch:
                c["lastUpdateTime"] = old.get("lastUpdateTime", now)
        return c

    if available >= target - max_unavailable:
        avail = cond("Available", True, "MinimumReplicasAvailable", "Deployment has minimum availability.", False)
    else:
        avail = cond("Available", False, "MinimumReplicasUnavailable", "Deployment does not have minimum availability.",
                     False)
    if complete:
        prog = cond("Progressing", True, "NewReplicaSetAvailable", f"{rs} has successfully progressed.", False)
    elif complete_deadline:
        prog = cond("Progressing", False, "ProgressDeadlineExceeded", f"{rs} has timed out progressing.", False)
    else:
        prog = cond("Progressing", True, "ReplicaSetUpdated", f"{rs} is progressing.", progressed)
    status: Obj = {"observedGeneration": generation}
    # omitempty, as the API server serializes DeploymentStatus
    for field, value in (("replicas", total), ("updatedReplicas", updated), ("readyReplicas", ready),
                         ("availableReplicas", available), ("unavailableReplicas", max(0, target - available))):
        if value:
            status[field] = value
    status["conditions"] = [avail, prog]
    return status


def _parse_label_selector(sel: str | None) -> Callable[[dict], bool]:
    if not sel:
        return lambda labels: True
    tests: list[Callable[[dict], bool]] = []
    for term in re.split(r",(?![^()]*\))", sel):
        term = term.strip()
        if m := re.fullmatch(r"([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)", term):
            k, op, vals = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            tests.append((lambda k, vals: lambda l: l.get(k) in vals)(k, vals) if op == "in"
                         else (lambda k, vals: lambda l: l.get(k) not in vals)(k, vals))
        elif m := re.fullmatch(r"([\w./-]+)\s*!=\s*(\S*)", term):
            tests.append((lambda k, v: lambda l: l.get(k) != v)(m.group(1), m.group(2)))
        elif m := re.fullmatch(r"([\w./-]+)\s*==?\s*(\S*)", term):
            tests.append((lambda k, v: lambda l: l.get(k) == v)(m.group(1), m.group(2)))
        elif m := re.fullmatch(r"!([\w./-]+)", term):
            tests.append((lambda k: lambda l: k not in l)(m.group(1)))
        elif re.fullmatch(r"[\w./-]+", term):
            tests.append((lambda k: lambda l: k in l)(term))
        else:
            raise bad_request(f"unable to parse requirement: {term!r}")
    return lambda labels: all(t(labels) for t in tests)


def _parse_field_selector(sel: str | None) -> Callable[[Obj], bool]:
    if not sel:
        return lambda obj: True
    tests = []
    for term in sel.split(","):
        m = re.fullmatch(r"(metadata\.name|metadata\.namespace)\s*(!=|==|=)\s*(\S*)", term.strip())
        if not m:
            raise bad_request(f'field label not supported: "{term.split("=")[0]}"')
        field, op, value = m.group(1).split(".")[1], m.group(2), m.group(3)
        tests.append((lambda f, neg, v: lambda o: (o["metadata"].get(f, "") == v) != neg)(field, op == "!=", value))
    return lambda obj: all(t(obj) for t in tests)


# -- validation ---------------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate(res: Resource, obj: Obj) -> None:
    meta = obj.get("metadata") or {}
    name = meta.get("name", "")
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", name):
        raise invalid(res, str(name), "metadata.name", name,
                      "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'")
    for field in ("labels", "annotations"):
        values = meta.get(field) or {}
        if not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values()):
            raise invalid(res, name, f"metadata.{field}", values, "values must be strings")
    if res is DEPLOYMENTS:
        spec = obj.get("spec") or {}
        replicas = spec.get("replicas", 1)
        if not _is_int(replicas) or replicas < 0:
            raise invalid(res, name, "spec.replicas", replicas, "must be greater than or equal to 0")
        match = (spec.get("selector") or {}).get("matchLabels") or {}
        labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
        if not match:
            raise invalid(res, name, "spec.selector", spec.get("selector"), "empty selector is invalid for deployment")
        if any(labels.get(k) != v for k, v in match.items()):
            raise invalid(res, name, "spec.template.metadata.labels", labels,
                          "`selector` does not match template `labels`")
        containers = (((spec.get("template") or {}).get("spec") or {}).get("containers")) or []
        if not containers or not all(isinstance(c, dict) and c.get("name") and c.get("image") for c in containers):
            raise invalid(res, name, "spec.template.spec.containers", containers,
                          "at least one container with a name and an image is required")
    if res is HTTPROUTES:
        for i, rule in enumerate((obj.get("spec") or {}).get("rules") or []):
            for j, ref in enumerate(rule.get("backendRefs") or []):
                w = ref.get("weight", 1)
                if not _is_int(w) or not 0 <= w <= 1_000_000:
                    raise invalid(res, name, f"spec.rules[{i}].backendRefs[{j}].weight", w,
                                  "must be between 0 and 1000000")
    if res is HPAS:
        for field, value, why in autoscaler.problems(obj):
            raise invalid(res, name, field, value, why)
    if res is SERVICES:
        for i, p in enumerate((obj.get("spec") or {}).get("ports") or []):
            if not _is_int(p.get("port")) or not 0 < p["port"] < 65536:
                raise invalid(res, name, f"spec.ports[{i}].port", p.get("port"),
                              "must be between 1 and 65535, inclusive")


# -- HTTP ---------------------------------------------------------------------------------------------------


@dataclass
class Route:
    res: Resource | None
    namespace: str | None
    name: str | None
    sub: str | None


def parse_path(path: str) -> Route | None:
    parts = [p for p in path.split("/") if p]
    if len(parts) >= 2 and parts[0] == "api" and parts[1] == "v1":
        group, version, rest = "", "v1", parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    if not rest:
        return None
    ns = None
    if rest[0] == "namespaces" and len(rest) >= 3 and rest[2] not in ("status", "finalize"):
        ns, rest = rest[1], rest[2:]
    res = RESOURCES.get((group, rest[0]))
    if res is None or res.version != version or (ns is not None and not res.namespaced) or len(rest) > 3:
        return None
    name = rest[1] if len(rest) > 1 else None
    sub = rest[2] if len(rest) > 2 else None
    if sub is not None and sub not in res.subresources:
        return None
    return Route(res, ns, name, sub)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "opsflow-k8s-emulator"
    timeout = 60  # idle keep-alive connections are closed after a minute
    disable_nagle_algorithm = True
    wbufsize = -1  # headers and body leave in one write (flushed after each request)
    emulator: "K8sEmulator"  # set on the subclass per server
    cluster: Cluster  # the emulator's

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._serve("GET")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _send(self, code: int, body: Any) -> None:
        if not is_admin_path(self.path):  # the request log (GET /_emulator/requests), as the other emulators keep
            self.emulator.log_request(self.command, self.path, code)
        if isinstance(body, str):
            data, ctype = body.encode(), "text/plain; charset=utf-8"
        else:
            data, ctype = json.dumps(body).encode(), "application/json"
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Audit-Id", str(uuid.uuid4()))
        if code == 429:
            self.send_header("Retry-After", "1")  # as the API server sends with TooManyRequests
        self.end_headers()
        self.wfile.write(data)

    def _read_body(self) -> bytes:
        """The request body, read before anything else is decided: an answer (a fault, a 403) sent with the body
        still unread left it in the connection, and a client that retried on the same connection had it read as
        the start of its next request (400 "Bad request syntax")."""
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _body(self) -> Any:
        raw = self._raw
        if not raw:
            raise bad_request("the request body is empty")
        try:
            return json.loads(raw)
        except ValueError as e:
            raise bad_request(f"the request body is not valid JSON: {e}") from None

    def _serve(self, method: str) -> None:
        self._raw = self._read_body()
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        path = url.path.rstrip("/") or "/"
        emu = self.emulator
        try:
            if is_admin_path(path):
                return self._send(*emu.admin(method, path, json.loads(self._raw) if self._raw.strip() else None))
            if method == "GET" and path in ("/healthz", "/readyz", "/livez"):
                return self._send(200, "ok")
            if method == "GET" and path == "/version":
                return self._send(200, SERVER_VERSION)
            route = parse_path(path)
            role = self._authenticate(route)
            if route is not None:
                key = f"{method} {path}"
                emu.count_request(key)
                fault = emu.take_fault(key, method)
                if fault is not None:
                    if fault.delay:
                        time.sleep(fault.delay)
                    if fault.drop:
                        self.close_connection = True
                        try:
                            self.connection.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                        return None
                    if fault.status:
                        raise _fault_error(fault)
            if method == "GET" and (discovery := self._discovery(path)) is not None:
                return self._send(200, discovery)
            if route is None:
                raise ApiError(404, "NotFound", "the server could not find the requested resource", {})
            if role == "readonly" and method != "GET":
                verb = {"PATCH": "patch", "PUT": "update", "POST": "create", "DELETE": "delete"}[method]
                what = f"{route.res.plural}/{route.sub}" if route.sub else route.res.plural
                where = f' in the namespace "{route.namespace}"' if route.namespace else " at the cluster scope"
                raise ApiError(403, "Forbidden",
                               f'{route.res.qualified} "{route.name or ""}" is forbidden: User "lab-readonly" cannot '
                               f'{verb} resource "{what}" in API group "{route.res.group}"{where}',
                               status_details(route.res, route.name))
            if query.get("watch") in ("true", "1"):
                return self._watch(route, query)
            code, body = self._dispatch(method, route, query)
            self._send(code, body)
        except ApiError as e:
            if e.code >= 500 or e.code == 429:
                log.info("%s %s -> %d (%s)", method, path, e.code, e.message)
            self._send(e.code, e.status())
        except Exception as e:  # a bug in the emulator: answer like an API server would, and say so in the log
            log.exception("%s %s failed", method, path)
            why = f"an error on the server ({e!r}) has prevented the request from succeeding"
            self._send(500, ApiError(500, "InternalError", why).status())

    def _authenticate(self, route: Route | None) -> str:
        auth = self.cluster.auth
        if not auth or not (auth.get("token") or auth.get("readonly_token")):
            return "admin"
        header = self.headers.get("Authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else None
        if token and token == auth.get("token"):
            return "admin"
        if token and token == auth.get("readonly_token"):
            return "readonly"
        raise ApiError(401, "Unauthorized", "Unauthorized")

    def _discovery(self, path: str) -> Obj | None:
        groups: dict[str, list[str]] = {}
        for res in RESOURCES.values():
            if res.group and res.version not in groups.setdefault(res.group, []):
                groups[res.group].append(res.version)

        def group_entry(g: str) -> Obj:
            versions = [{"groupVersion": f"{g}/{v}", "version": v} for v in groups[g]]
            return {"name": g, "versions": versions, "preferredVersion": versions[0]}

        if path == "/api":
            return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
        if path == "/apis":
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [group_entry(g) for g in groups]}
        parts = [p for p in path.split("/") if p]
        if len(parts) == 2 and parts[0] == "apis" and parts[1] in groups:
            return {"kind": "APIGroup", "apiVersion": "v1", **group_entry(parts[1])}
        if parts == ["api", "v1"]:
            group, version = "", "v1"
        elif len(parts) == 3 and parts[0] == "apis" and parts[2] in groups.get(parts[1], []):
            group, version = parts[1], parts[2]
        else:
            return None
        resources = []
        for res in RESOURCES.values():
            if res.group != group or res.version != version:
                continue
            resources.append({"name": res.plural, "singularName": res.kind.lower(), "namespaced": res.namespaced,
                              "kind": res.kind, "verbs": VERBS[res], "shortNames": SHORT[res],
                              **({"categories": CATEGORIES[res]} if res in CATEGORIES else {})})
            for sub in res.subresources:
                kind = {"scale": "Scale", "log": "Pod"}.get(sub, res.kind)
                resources.append({"name": f"{res.plural}/{sub}", "singularName": "", "namespaced": res.namespaced,
                                  "kind": kind, "verbs": ["get"] if sub == "log" else ["get", "patch", "update"],
                                  **({"group": "autoscaling", "version": "v1"} if sub == "scale" else {})})
        return {"kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": f"{group}/{version}" if group else version, "resources": resources}

    def _watch(self, route: Route, query: dict) -> None:
        """``?watch=true`` on a list: a chunked stream of ADDED/MODIFIED/DELETED events (one JSON object a line),
        from ``resourceVersion`` on, until ``timeoutSeconds`` (at most 30 min) or the emulator stops. Polled from
        the store every 50 ms: what ``kubectl rollout status`` and informers need."""
        res, c = route.res, self.cluster
        assert res is not None
        if route.name is not None:
            raise bad_request("watch a list with fieldSelector=metadata.name=NAME")
        labels = _parse_label_selector(query.get("labelSelector"))
        fields = _parse_field_selector(query.get("fieldSelector"))
        since = int(query["resourceVersion"]) if str(query.get("resourceVersion", "")).isdigit() else 0
        deadline = time.monotonic() + min(float(query.get("timeoutSeconds") or 1800), 1800)

        def matching() -> dict[Key, Obj]:
            with c.lock:
                return {k: copy.deepcopy(o) for k, o in c.objects.items() if k[0] == res.plural
                        and (route.namespace is None or k[1] == route.namespace)
                        and labels(o["metadata"].get("labels", {})) and fields(o)}

        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        current = matching()
        seen = {k: o for k, o in current.items() if since and int(o["metadata"]["resourceVersion"]) <= since}
        try:
            while True:
                events = []
                for k, o in current.items():
                    if k not in seen or o["metadata"]["resourceVersion"] != seen[k]["metadata"]["resourceVersion"]:
                        events.append(("ADDED" if k not in seen else "MODIFIED", o))
                for k in [k for k in seen if k not in current]:
                    events.append(("DELETED", seen.pop(k)))
                seen.update(current)
                for kind, o in events:
                    data = json.dumps({"type": kind, "object": o}).encode() + b"\n"
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                if events:
                    self.wfile.flush()
                if time.monotonic() >= deadline or self.emulator.stop_event.wait(0.05):
                    break
                current = matching()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True

    # -- verbs -------------------------------------------------------------------------------------------
    def _dispatch(self, method: str, route: Route, query: dict) -> tuple[int, Obj]:
        res, ns, name, sub = route.res, route.namespace or "", route.name, route.sub
        assert res is not None
        c = self.cluster
        dry_run = query.get("dryRun") == "All"
        with c.lock:
            if name is None:
                if method == "GET":
                    items = c.list(res, route.namespace if res.namespaced else None, query.get("labelSelector"),
                                   query.get("fieldSelector"))
                    if tables.wanted(self.headers.get("Accept")) and (table := tables.table(
                            res, items, str(c.rv), include_object=query.get("includeObject", "Metadata"))):
                        return 200, table
                    return 200, {"kind": f"{res.kind}List", "apiVersion": res.api_version,
                                 "metadata": {"resourceVersion": str(c.rv)},
                                 "items": [{k: v for k, v in copy.deepcopy(o).items()
                                            if k not in ("kind", "apiVersion")} for o in items]}
                if method == "POST":
                    return self._create(res, ns, self._body(), dry_run)
                raise ApiError(405, "MethodNotAllowed",
                               "the server does not allow this method on the requested resource")
            if method == "DELETE" and sub is None:
                obj = c.get(res, ns, name)
                if not dry_run:
                    del c.objects[(res.plural, ns if res.namespaced else "", name)]
                    if res is NAMESPACES:
                        for key in [k for k in c.objects if k[1] == name]:
                            del c.objects[key]
                    c.rv += 1
                    c._dirty = True
                if res is SERVICES:  # as the API server: a deleted service comes back as the object
                    return 200, copy.deepcopy(obj)
                return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                             "details": {**status_details(res, name), "uid": obj["metadata"]["uid"]}}
            obj = c.get(res, ns, name)
            if sub == "log":
                if method != "GET":
                    raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on pods/log")
                return 200, workloads.pod_log(c, obj, query)
            include = query.get("includeObject", "Metadata")
            if method == "GET" and sub is None and tables.wanted(self.headers.get("Accept")) and (
                    table := tables.table(res, [obj], str(c.rv), include_object=include)):
                return 200, table
            if sub == "scale":
                return self._scale(method, res, ns, name, obj, query, dry_run)
            if method == "GET":
                return 200, copy.deepcopy(obj)
            if method in ("PATCH", "PUT"):
                return self._update(method, res, ns, name, sub, obj, dry_run)
            raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")

    def _patched(self, method: str, current: Obj) -> Obj:
        if method == "PUT":
            body = self._body()
            if not isinstance(body, dict):
                raise bad_request("the body of a PUT must be an object")
            return body
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        patcher = PATCHERS.get(ctype)
        if patcher is None:
            raise ApiError(415, "UnsupportedMediaType",
                           "the body of the request was in an unknown format - accepted media types include: "
                           f"{', '.join(PATCHERS)}")
        body = self._body()
        if ctype == "application/json-patch+json" and not isinstance(body, list):
            raise bad_request("a JSON patch is a list of operations")
        if ctype != "application/json-patch+json" and not isinstance(body, dict):
            raise bad_request(f"a {ctype} body must be an object")
        result = patcher(current, body)
        if not isinstance(result, dict):
            raise bad_request("the patch did not produce an object")
        return result

    def _precondition(self, res: Resource, name: str, current: Obj, new: Obj) -> None:
        want = (new.get("metadata") or {}).get("resourceVersion")
        if want and want != current["metadata"]["resourceVersion"]:
            raise conflict(res, name)

    def _update(self, method: str, res: Resource, ns: str, name: str, sub: str | None, obj: Obj,
                dry_run: bool) -> tuple[int, Obj]:
        c = self.cluster
        new = self._patched(method, obj)
        self._precondition(res, name, obj, new)
        new_meta = new.get("metadata") or {}
        if new_meta.get("name", name) != name:
            raise bad_request(f"the name of the object ({new_meta.get('name')}) does not match the name on the URL "
                              f"({name})")
        if res.namespaced and new_meta.get("namespace", ns) != ns:
            raise bad_request("the namespace of the provided object does not match the namespace sent on the request")
        if sub == "status":  # the status subresource changes status only
            merged = copy.deepcopy(obj)
            merged["status"] = new.get("status", {})
        else:  # the main resource ignores status
            merged = copy.deepcopy(new)
            merged["status"] = copy.deepcopy(obj.get("status", {}))
            meta = merged.setdefault("metadata", {})
            meta["name"] = name
            if res.namespaced:
                meta["namespace"] = ns
            for k in ("uid", "creationTimestamp", "generation"):
                if k in obj["metadata"]:
                    meta[k] = obj["metadata"][k]
                else:
                    meta.pop(k, None)
        validate(res, merged)
        if res in GENERATED and merged.get("spec") != obj.get("spec"):
            merged["metadata"]["generation"] = int(obj["metadata"].get("generation", 1)) + 1
        def without(d: Obj, key: str) -> Obj:
            return {k: v for k, v in d.items() if k != key}

        unchanged = without(merged, "metadata") == without(obj, "metadata") and \
            without(merged["metadata"], "resourceVersion") == without(obj["metadata"], "resourceVersion")
        if unchanged:  # a no-op write does not bump resourceVersion (as the API server)
            return 200, copy.deepcopy(obj)
        if dry_run:
            return 200, merged
        c._stamp(merged, res, new=False)
        c.objects[(res.plural, ns if res.namespaced else "", name)] = merged
        log.info("%s %s%s %s/%s (resourceVersion %s)", method, res.plural, f"/{sub}" if sub else "", ns or "-", name,
                 merged["metadata"]["resourceVersion"])
        return 200, copy.deepcopy(merged)

    def _create(self, res: Resource, ns: str, body: Any, dry_run: bool) -> tuple[int, Obj]:
        c = self.cluster
        if not isinstance(body, dict):
            raise bad_request("the body of a create must be an object")
        meta = body.setdefault("metadata", {})
        if res.namespaced:
            if meta.get("namespace", ns) != ns:
                raise bad_request("the namespace of the provided object does not match the namespace sent on the "
                                  "request")
            meta["namespace"] = ns
            if ("namespaces", "", ns) not in c.objects:
                raise not_found(NAMESPACES, ns)
        if res is DEPLOYMENTS:
            spec = body.setdefault("spec", {})
            spec.setdefault("replicas", 1)
            spec.setdefault("progressDeadlineSeconds", 600)
            spec.setdefault("revisionHistoryLimit", 10)
            spec.setdefault("strategy", {"type": "RollingUpdate",
                                         "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"}})
        # what the API server serializes for a new object (an HPA's counts are not omitempty)
        body["status"] = {NAMESPACES: {"phase": "Active"},
                          HPAS: {"currentReplicas": 0, "desiredReplicas": 0}}.get(res, {})
        validate(res, body)
        name = meta["name"]
        if (res.plural, ns if res.namespaced else "", name) in c.objects:
            raise ApiError(409, "AlreadyExists", f'{res.qualified} "{name}" already exists', status_details(res, name))
        if dry_run:
            return 201, body
        obj = c.put_new(res, body)
        log.info("created %s %s/%s", res.plural, ns or "-", name)
        return 201, copy.deepcopy(obj)

    def _scale(self, method: str, res: Resource, ns: str, name: str, obj: Obj, query: dict,
               dry_run: bool) -> tuple[int, Obj]:
        c = self.cluster
        scale = _scale_of(obj)
        if method == "GET":
            return 200, scale
        if method not in ("PATCH", "PUT"):
            raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
        new = self._patched(method, scale)
        self._precondition(res, name, obj, new)
        replicas = (new.get("spec") or {}).get("replicas", 0 if method == "PUT" else scale["spec"]["replicas"])
        if not _is_int(replicas) or replicas < 0:
            why = "must be greater than or equal to 0"
            raise ApiError(422, "Invalid", f'Scale.autoscaling "{name}" is invalid: spec.replicas: Invalid value: '
                                           f'{json.dumps(replicas)}: {why}',
                           {"name": name, "group": "autoscaling", "kind": "Scale",
                            "causes": [{"reason": "FieldValueInvalid", "message": why, "field": "spec.replicas"}]})
        if replicas == obj["spec"].get("replicas", 1) or dry_run:
            out = copy.deepcopy(scale)
            out["spec"]["replicas"] = replicas
            return 200, out
        before = obj["spec"].get("replicas", 1)
        obj["spec"]["replicas"] = replicas
        obj["metadata"]["generation"] = int(obj["metadata"].get("generation", 1)) + 1
        c._stamp(obj, res, new=False)
        log.info("scaled deployment %s/%s %d -> %d (generation %d)", ns, name, before, replicas,
                 obj["metadata"]["generation"])
        return 200, _scale_of(obj)


def _scale_of(dep: Obj) -> Obj:
    meta = dep["metadata"]
    return {"kind": "Scale", "apiVersion": "autoscaling/v1",
            "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                         if k in meta},
            "spec": {"replicas": dep["spec"].get("replicas", 1)},
            "status": {"replicas": int(dep.get("status", {}).get("replicas", 0)),
                       "selector": selector_string(dep["spec"].get("selector", {}).get("matchLabels", {}))}}


# -- running it -----------------------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # idle keep-alive connections must not hold up stop()
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):  # a client that left (kubectl ends a watch by closing it)
            log.debug("client %s went away", client_address)
            return
        super().handle_error(request, client_address)


class K8sEmulator(Emulator):
    """A running emulator: ``url``, ``stop()``, the cluster's knobs, and the emulators' fault API."""

    def __init__(self, cluster: Cluster):
        super().__init__()
        self.cluster = cluster

    def after_stop(self) -> None:
        self.cluster.save_state(force=True)
        log.info("k8s emulator on %s stopped", self.url)

    def describe(self) -> dict:
        with self.cluster.lock:
            return {"resourceVersion": self.cluster.rv, "seconds_per_replica": self.cluster.seconds_per_replica,
                    "objects": len(self.cluster.objects)}

    # Knobs. The same effects are reachable over the API (see the module docstring).
    def set_broken(self, name: str, namespace: str = "default", broken: bool = True) -> None:
        self.cluster.annotate(DEPLOYMENTS, namespace, name, BROKEN_ANNOTATION, "true" if broken else None)

    def set_node_ready(self, name: str, ready: bool) -> None:
        self.cluster.annotate(NODES, "", name, NODE_NOT_READY_ANNOTATION, None if ready else "true")

    @property
    def seconds_per_replica(self) -> float:
        return self.cluster.seconds_per_replica

    @seconds_per_replica.setter
    def seconds_per_replica(self, value: float) -> None:
        self.cluster.seconds_per_replica = float(value)

    def snapshot(self, plural: str, namespace: str, name: str) -> Obj:
        """A copy of a stored object, for debugging; tests should read through the real client."""
        with self.cluster.lock:
            return copy.deepcopy(self.cluster.objects[(plural, namespace, name)])

    def control(self) -> None:
        """The controller: moves the deployments' and nodes' status toward their spec until stop()."""
        cluster = self.cluster
        while not self.stop_event.is_set():
            try:
                cluster.reconcile()
            except Exception:  # keep the controller alive, as a real one would
                log.exception("controller step failed")
            step = cluster.seconds_per_replica
            self.stop_event.wait(0.02 if step <= 0 else min(max(step / 4, 0.01), 0.25))


def _fault_error(fault: Fault) -> ApiError:
    code = fault.status or 500
    reasons = {429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable", 504: "Timeout"}
    origin = "injected" if fault.kind == "planned" else "random"
    return ApiError(code, fault.code or reasons.get(code, "InternalError"),
                    fault.message or f"{origin} fault {code} (lab)", {"retryAfterSeconds": 1} if code == 429 else None)


def start_emulator(seed: dict, port: int = 0, *, host: str = "127.0.0.1", state_file: str | None = None,
                   seconds_per_replica: float | None = None) -> K8sEmulator:
    """Start an emulated cluster on ``host:port`` (0: any free port) in background threads.

    With a ``state_file`` that exists, its objects are loaded instead of the seed; the
    state is written back while running (at most twice a second) and on ``stop()``.
    """
    cluster = Cluster(state_file=state_file)
    if not cluster.load_state():
        cluster.seed(seed)
    if seconds_per_replica is not None:
        cluster.seconds_per_replica = float(seconds_per_replica)
    emu = K8sEmulator(cluster)
    handler = type("Handler", (_Handler,), {"emulator": emu, "cluster": cluster})
    server = _Server((host, port), handler)
    emu.port = server.server_address[1]
    emu.url = f"http://{host}:{emu.port}"
    emu.serve(server, f"k8s-emulator-{port}", poll_interval=0.05)
    emu.run(emu.control, f"k8s-controller-{port}")
    log.info("k8s emulator listening on %s (%d objects, %.2fs per replica)", emu.url, len(cluster.objects),
             cluster.seconds_per_replica)
    return emu


def load_seed(path: str | Path) -> dict:
    """A seed file: JSON, or YAML (a superset)."""
    text = Path(path).read_text()
    try:
        return json.loads(text)
    except ValueError:
        import yaml

        data = yaml.safe_load(text)
        if not isinstance(data, dict):
            raise ValueError(f"seed {path} must be a mapping") from None
        return data


def write_kubeconfig(path: str | Path, clusters: dict[str, str], *, tokens: dict[str, str] | None = None,
                     current: str | None = None) -> Path:
    """Write a kubeconfig with one context (and cluster and user) per name -> server URL.

    The lab names contexts ``lab-<region>``. ``tokens`` optionally gives a bearer token per
    name (for an emulator seeded with ``auth``); without one the user has no credentials.
    The current context is ``current`` or the first name. The file is written 0600.
    """
    import yaml

    if not clusters:
        raise ValueError("write_kubeconfig needs at least one cluster")
    tokens = tokens or {}
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "preferences": {},
        "clusters": [{"name": n, "cluster": {"server": url}} for n, url in clusters.items()],
        "users": [{"name": n, "user": {"token": tokens[n]} if n in tokens else {}} for n in clusters],
        "contexts": [{"name": n, "context": {"cluster": n, "user": n, "namespace": "default"}} for n in clusters],
        "current-context": current or next(iter(clusters)),
    }
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.k8s_emulator",
                                     description="A stateful Kubernetes API emulator for the opsflow lab.")
    parser.add_argument("--seed", required=True,
                        help="seed file (JSON or YAML): namespaces, deployments, services, nodes")
    parser.add_argument("--port", type=int, required=True, help="port to listen on (0: any free port, logged)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--state-file", help="persist the objects here; loaded instead of the seed when it exists")
    parser.add_argument("--seconds-per-replica", type=float,
                        help=f"controller pace (default {DEFAULT_SECONDS_PER_REPLICA}, or the seed's)")
    parser.add_argument("--log-level", default=os.environ.get("OPSFLOW_LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handle = start_emulator(load_seed(args.seed), args.port, host=args.host, state_file=args.state_file,
                            seconds_per_replica=args.seconds_per_replica)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    handle.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
