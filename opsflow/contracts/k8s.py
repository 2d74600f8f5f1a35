"""A region's Kubernetes deployments in a failover: status, maintenance mode, scale, autoscalers
(activities/kubernetes.py)."""

from __future__ import annotations

from opsflow.contracts.base import Activity
from opsflow.models import AutoscalerResult, FenceResult, KubeStatus, MaintenanceRequest, RegionTarget, ScaleRequest

K8S_STATUS = Activity("k8s.status", RegionTarget, KubeStatus)
K8S_SET_MAINTENANCE = Activity("k8s.set_maintenance", MaintenanceRequest, KubeStatus)
K8S_SCALE_UP = Activity("k8s.scale_up", ScaleRequest, KubeStatus)
K8S_SCALE_TO_ZERO = Activity("k8s.scale_to_zero", RegionTarget, FenceResult)
K8S_LOWER_AUTOSCALERS = Activity("k8s.lower_autoscalers", RegionTarget, AutoscalerResult)
