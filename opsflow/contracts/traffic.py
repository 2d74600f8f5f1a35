"""Where the service's traffic goes, and the smoke tests that follow it (activities/traffic.py, http_checks.py)."""

from __future__ import annotations

from opsflow.contracts.base import Activity
from opsflow.models import RegionTarget, SmokeResult, TrafficRequest, TrafficStatus

TRAFFIC_STATUS = Activity("traffic.status", TrafficRequest, TrafficStatus)
TRAFFIC_SWITCH = Activity("traffic.switch", TrafficRequest, TrafficStatus)
# Before a planned switch: the target's endpoint in the router's rotation behind the serving one (no traffic yet), so
# its health probes have passed by the switch.
TRAFFIC_PREPARE = Activity("traffic.prepare", TrafficRequest, TrafficStatus)
HTTP_SMOKE = Activity("http.smoke", RegionTarget, list[SmokeResult])
