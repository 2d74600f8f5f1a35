"""The resources the lab's Kubernetes emulator serves, and the small helpers every part shares."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

Obj = dict[str, Any]
Key = tuple[str, str, str]  # (plural, namespace or "", name)


@dataclass(frozen=True)
class Resource:
    plural: str
    kind: str
    group: str
    namespaced: bool
    subresources: tuple[str, ...] = ()
    version: str = "v1"

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        """'deployments.apps', 'services': how the API server names a resource in messages."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def qualified_kind(self) -> str:
        return f"{self.kind}.{self.group}" if self.group else self.kind


NAMESPACES = Resource("namespaces", "Namespace", "", namespaced=False, subresources=("status",))
NODES = Resource("nodes", "Node", "", namespaced=False, subresources=("status",))
SERVICES = Resource("services", "Service", "", namespaced=True, subresources=("status",))
PODS = Resource("pods", "Pod", "", namespaced=True, subresources=("status", "log"))
ENDPOINTS = Resource("endpoints", "Endpoints", "", namespaced=True)
DEPLOYMENTS = Resource("deployments", "Deployment", "apps", namespaced=True, subresources=("status", "scale"))
REPLICASETS = Resource("replicasets", "ReplicaSet", "apps", namespaced=True, subresources=("status",))
HPAS = Resource("horizontalpodautoscalers", "HorizontalPodAutoscaler", "autoscaling", namespaced=True,
                subresources=("status",), version="v2")
ENDPOINTSLICES = Resource("endpointslices", "EndpointSlice", "discovery.k8s.io", namespaced=True)
# Gateway API HTTPRoute: the router a canary sets weights on (backendRefs[].weight); the lab's proxy follows it.
HTTPROUTES = Resource("httproutes", "HTTPRoute", "gateway.networking.k8s.io", namespaced=True, subresources=("status",))

ALL = (NAMESPACES, NODES, SERVICES, PODS, ENDPOINTS, DEPLOYMENTS, REPLICASETS, HPAS, ENDPOINTSLICES, HTTPROUTES)
RESOURCES = {(r.group, r.plural): r for r in ALL}
BY_KIND = {r.kind: r for r in ALL}
_RW = ["create", "delete", "get", "list", "patch", "update", "watch"]
VERBS = {r: _RW for r in ALL} | {NODES: ["get", "list", "patch", "update", "watch"]}
SHORT = {NAMESPACES: ["ns"], NODES: ["no"], SERVICES: ["svc"], PODS: ["po"], ENDPOINTS: ["ep"],
         DEPLOYMENTS: ["deploy"], REPLICASETS: ["rs"], HPAS: ["hpa"], ENDPOINTSLICES: [], HTTPROUTES: []}
CATEGORIES = {r: ["all"] for r in (SERVICES, PODS, DEPLOYMENTS, REPLICASETS, HPAS)}


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def selector_string(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def owner_ref(owner: Obj, res: Resource) -> Obj:
    """The ownerReference a controller sets on what it creates (controller: true, as kubectl rollout expects)."""
    return {"apiVersion": res.api_version, "kind": res.kind, "name": owner["metadata"]["name"],
            "uid": owner["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}


def controlled_by(obj: Obj, owner: Obj) -> bool:
    uid = owner["metadata"].get("uid")
    return any(r.get("controller") and r.get("uid") == uid for r in obj["metadata"].get("ownerReferences") or [])
