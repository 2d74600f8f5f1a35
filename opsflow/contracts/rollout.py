"""Canary and blue-green: the app's deployments and routes, its metrics and their judgement."""

from __future__ import annotations

from opsflow.contracts.base import Activity
from opsflow.rollout import (
    CheckResult,
    ChecksRequest,
    DeploymentRequest,
    ImageRequest,
    JudgeRequest,
    RolloutState,
    RolloutTarget,
    RouterState,
    Samples,
    SamplesRequest,
    StepAnalysis,
    WeightRequest,
)

K8S_ROLLOUT_STATUS = Activity("k8s.rollout_status", RolloutTarget, RolloutState)
K8S_CREATE_CANARY = Activity("k8s.create_canary", ImageRequest, RolloutState)
K8S_SCALE_CANARY = Activity("k8s.scale_canary", WeightRequest, RolloutState)
K8S_SET_WEIGHT = Activity("k8s.set_weight", WeightRequest, RolloutState)
K8S_DELETE_CANARY = Activity("k8s.delete_canary", RolloutTarget, RolloutState)
K8S_SET_IMAGE = Activity("k8s.set_image", ImageRequest, RolloutState)
K8S_CREATE_COLOUR = Activity("k8s.create_colour", ImageRequest, RolloutState)
K8S_SWITCH_SERVICE = Activity("k8s.switch_service", DeploymentRequest, RolloutState)
K8S_SCALE_DEPLOYMENT = Activity("k8s.scale_deployment", DeploymentRequest, RolloutState)
PROMETHEUS_SAMPLES = Activity("prometheus.samples", SamplesRequest, Samples)
HTTP_CHECKS = Activity("http.checks", ChecksRequest, list[CheckResult])
ANALYSIS_JUDGE = Activity("analysis.judge", JudgeRequest, StepAnalysis)

# The router the app's inventory names (httproute, nginx, traffic-manager), chosen by kind in activities/routers.py;
# run on the router's queue (the worker on the NGINX host) or the region's.
ROUTER_STATUS = Activity("router.status", RolloutTarget, RouterState)
ROUTER_SET_WEIGHT = Activity("router.set_weight", WeightRequest, RouterState)
