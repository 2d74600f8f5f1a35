"""The traffic activities the procedures call. Provider-neutral: Azure Traffic Manager or Route 53."""

from __future__ import annotations

from temporalio import activity

from activities.providers import traffic_provider
from opsflow.models import TrafficRequest, TrafficStatus


@activity.defn(name="traffic.status")
def traffic_status(request: TrafficRequest) -> TrafficStatus:
    return traffic_provider(request).status()


@activity.defn(name="traffic.switch")
def traffic_switch(request: TrafficRequest) -> TrafficStatus:
    return traffic_provider(request).switch()
