"""A status page with the shape of Atlassian Statuspage's API: scheduled-maintenance incidents.

    POST  {api}/pages/{page}/incidents        {"incident": {name, status: scheduled, scheduled_for, scheduled_until,
                                                              body, component_ids, metadata}}
    PATCH {api}/pages/{page}/incidents/{id}   {"incident": {status: in_progress|verifying|completed, body}}
    GET   {api}/pages/{page}/incidents/scheduled

The API key is fetched on the worker from where the inventory says it lives (`Authorization: OAuth <key>`).
Creating is idempotent: the incident carries the workflow id in its metadata, and a retried create finds it.
"""

from __future__ import annotations

import httpx
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.context import heartbeating
from activities.secrets import resolve
from opsflow.contracts.notify import STATUSPAGE_UPDATE
from opsflow.maintenance_models import StatusPageRequest, StatusPageResult

TIMEOUT = httpx.Timeout(10.0, connect=5.0)


def _client(req: StatusPageRequest) -> httpx.Client:
    return httpx.Client(base_url=req.page.api_url.rstrip("/"), timeout=TIMEOUT,
                        # .strip(): a key from a file or variable often ends in a newline, which no header can carry
                        headers={"Authorization": f"OAuth {resolve(req.page.api_key).strip()}",
                                 "Content-Type": "application/json"})


def _check(resp: httpx.Response, what: str) -> dict:
    if resp.status_code in (401, 403):
        raise ApplicationError(
            f"status page: {what}: refused ({resp.status_code}); check the API key",
            type="StatusPageAuth",
            non_retryable=True,
        )
    if resp.status_code in (400, 404, 422):
        raise ApplicationError(
            f"status page: {what}: {resp.status_code} {resp.text[:200]}", type="BadInput", non_retryable=True
        )
    if resp.status_code >= 300:
        raise ApplicationError(
            f"status page: {what}: {resp.status_code} {resp.text[:200]}", type="StatusPageUnavailable"
        )
    return resp.json() if resp.content else {}


@STATUSPAGE_UPDATE.implementation
def update(req: StatusPageRequest) -> StatusPageResult:
    """Create the scheduled maintenance (incident_id None) or move it to the next status."""
    page = req.page.page_id
    workflow_id = activity.info().workflow_id if activity.in_activity() else "local"
    try:
        # heartbeats while it sends: a worker lost mid-call is noticed within the heartbeat timeout, not the step's
        with heartbeating("status page"), _client(req) as http:
            if req.incident_id is None:
                for incident in _check(http.get(f"/pages/{page}/incidents/scheduled"), "list scheduled maintenances"):
                    if ((incident.get("metadata") or {}).get("opsflow") or {}).get("workflow_id") == workflow_id:
                        return StatusPageResult(incident_id=incident["id"], status=incident.get("status", "scheduled"))
                body = {
                    "incident": {
                        "name": req.page.title,
                        "status": "scheduled",
                        "body": req.body,
                        "scheduled_for": req.scheduled_for.isoformat() if req.scheduled_for else None,
                        "scheduled_until": req.scheduled_until.isoformat() if req.scheduled_until else None,
                        "component_ids": req.page.component_ids,
                        "metadata": {"opsflow": {"workflow_id": workflow_id}},
                    }
                }
                created = _check(http.post(f"/pages/{page}/incidents", json=body), "create the scheduled maintenance")
                return StatusPageResult(incident_id=created["id"], status=created.get("status", "scheduled"))
            updated = _check(
                http.patch(
                    f"/pages/{page}/incidents/{req.incident_id}",
                    json={"incident": {"status": req.status, "body": req.body}},
                ),
                f"set the maintenance to {req.status}",
            )
            return StatusPageResult(incident_id=req.incident_id, status=updated.get("status", req.status))
    except httpx.HTTPError as e:
        raise ApplicationError(
            f"status page {req.page.api_url}: {type(e).__name__}: {e}", type="StatusPageUnavailable"
        ) from None
