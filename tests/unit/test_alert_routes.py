"""The inventory's `alerts:` section (opsflow/alert_routes.py): which alerts request which failover, as whom. Added
after inventories had digests: an inventory without it keeps the digest it had before the section existed."""

from __future__ import annotations

import copy

import pytest
from pydantic import ValidationError

from opsflow.inventory import Inventory
from opsflow.rules import differences, digest_of
from starters.alerts import Alert, Receiver
from starters.common import CliError

# A fixed inventory, written out here so that nothing else moves it.
PINNED = {
    "environment": "pinned",
    "primary_region": "eastus",
    "regions": {r: {"database": {"provider": "postgres", "dsn": f"host=db-{r} dbname=app user=ops"},
                    "traffic_endpoint": f"ep-{r}"} for r in ("eastus", "westeurope")},
    "traffic": {"provider": "route53", "hosted_zone_id": "Z1", "record_name": "app.example.com"},
    "approval": {"approvers": ["alice", "bob"]},
    "operators": {"failover": ["alice", "alertmanager"]},
}
# Its digest as computed by opsflow at 5f88f25, before the alerts section existed: a Schedule created then, or a
# requester's copy one version behind, still matches the worker's.
PINNED_SHA256 = "1ea07473d4d780e0c4c34a24eab446162c2fc3906c4e0d17853321cc6d2e5fce"

ALERTS = {"requester": "alertmanager",
          "routes": [{"alertname": "RegionDegraded", "match": {"region": "eastus"}, "to": "westeurope"},
                     {"alertname": "DatabaseDown", "to_label": "failover_to"}]}


def with_alerts(**changes) -> dict:
    inv = copy.deepcopy(PINNED)
    inv["alerts"] = {**copy.deepcopy(ALERTS), **changes}
    return inv


def test_an_inventory_without_the_section_keeps_its_digest_and_its_recorded_form():
    inv = Inventory.model_validate(PINNED)
    assert digest_of(inv).sha256 == PINNED_SHA256
    assert "alerts" not in inv.model_dump(mode="json") and "alerts" not in inv.model_dump_json()
    assert "rollout" in inv.model_dump(mode="json")  # the sections that had digests already keep their null


def test_the_section_is_bound_by_the_digest_naming_what_differs():
    inv = Inventory.model_validate(with_alerts())
    assert inv.alerts is not None and inv.model_dump(mode="json")["alerts"]["requester"] == "alertmanager"
    assert Inventory.model_validate(inv.model_dump(mode="json")) == inv
    plain = digest_of(Inventory.model_validate(PINNED))
    assert "alerts.routes" in differences(digest_of(inv), plain)
    other = Inventory.model_validate(with_alerts(routes=[{"alertname": "RegionDegraded", "to": "eastus"}]))
    assert differences(digest_of(inv), digest_of(other)) == ["alerts.routes"]


@pytest.mark.parametrize("changes, message", [
    ({"routes": [{"alertname": "X", "to": "mars"}]}, "alerts.routes.0.to: 'mars' is not a region"),
    ({"routes": [{"alertname": "X"}]}, "exactly one of to (a region) or to_label"),
    ({"routes": []}, "at least 1 item"),
    ({"requester": "bob"}, "'bob' is an approver: an alert may request a failover, never approve one"),
    ({"requester": "carol"}, "'carol' is not among the operators of failover (alice, alertmanager)"),
    ({"routes": [{"alertname": "X", "to": "westeurope", "procedure": "emergency-failover"}]}, "'failover'"),
])
def test_a_bad_section_is_refused_naming_what_is_wrong(changes, message):
    with pytest.raises(ValidationError) as e:
        Inventory.model_validate(with_alerts(**changes))
    assert message in str(e.value)


def test_routes_pick_the_first_match_and_its_target(tmp_path):
    routing = Inventory.model_validate(with_alerts()).alerts
    assert routing.route_for({"alertname": "RegionDegraded", "region": "westeurope"}) is None
    route = routing.route_for({"alertname": "RegionDegraded", "region": "eastus"})
    assert route is not None and route.target({"region": "eastus"}) == "westeurope"
    by_label = routing.route_for({"alertname": "DatabaseDown", "failover_to": "westeurope"})
    assert by_label is not None and by_label.target({"failover_to": "westeurope"}) == "westeurope"


async def test_the_receiver_needs_the_section_and_refuses_a_target_that_is_not_a_region(tmp_path):
    with pytest.raises(CliError, match="has no alerts: section"):
        Receiver(Inventory.model_validate(PINNED), None, tmp_path / "state.json")
    receiver = Receiver(Inventory.model_validate(with_alerts()), None, tmp_path / "state.json")
    alert = Alert(status="firing", labels={"alertname": "DatabaseDown", "failover_to": "mars"},
                  startsAt="2026-12-06T03:00:00Z", fingerprint="f1")
    out = await receiver.one(alert)
    assert out["outcome"] == "refused" and "'mars' is not one of" in out["detail"]
    assert (await receiver.one(alert.model_copy(update={"labels": {"alertname": "Other"}})))["outcome"] == "ignored"
