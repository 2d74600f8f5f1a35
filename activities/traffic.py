"""The traffic activities the procedures call. Provider-neutral: Azure Traffic Manager or Route 53."""

from __future__ import annotations

from activities.providers import traffic_provider
from opsflow.contracts.traffic import TRAFFIC_PREPARE, TRAFFIC_STATUS, TRAFFIC_SWITCH
from opsflow.models import TrafficRequest, TrafficStatus


@TRAFFIC_STATUS.implementation
def traffic_status(request: TrafficRequest) -> TrafficStatus:
    return traffic_provider(request).status()


@TRAFFIC_SWITCH.implementation
def traffic_switch(request: TrafficRequest) -> TrafficStatus:
    return traffic_provider(request).switch()


@TRAFFIC_PREPARE.implementation
def traffic_prepare(request: TrafficRequest) -> TrafficStatus:
    return traffic_provider(request).prepare()
