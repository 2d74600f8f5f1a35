"""`opsflow alert-receiver`: an alert may request a procedure, never perform one (README "Running opsflow as a team").

An Alertmanager webhook receiver. For a firing alert that a route of the inventory's `alerts:` section maps to a
procedure (opsflow/alert_routes.py), it starts that procedure as the section's `requester` (signing with `--key`,
the requester's own operator key, where the inventory requires signatures): a planned failover, which changes
nothing before a person approves it at its gate (the gate's notification tells the on-call). The worker's rules
bind it like any requester: its copy of the inventory (routes included) must be the worker's, the requester must
be an operator, and the worker refuses that name anything but a planned failover. Alertmanager repeats a firing
alert every `repeat_interval` and retries on errors: an alert is recognised by its fingerprint and its `startsAt`
(the same firing), remembered in a state file and in the memo of the run it started (`ALERT_MEMO`), so a repeat
starts nothing, even after a restart that lost the state file (a pod's emptyDir): a firing not in the file is
looked up in Temporal's visibility first. The environment's lock refuses a second procedure anyway.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import threading
from collections import Counter
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError
from temporalio.service import RPCError, RPCStatusCode

from opsflow.alert_routes import AlertRouting
from opsflow.client import ClientError, ProcedureRunning, connect, inventory_path, start_procedure
from opsflow.inventory import Inventory, load_inventory
from starters.common import CliError, add_key_argument, start_signer

log = logging.getLogger("opsflow.alerts")
# The memo key of a run an alert requested: its firing (fingerprint@startsAt), read back by a restarted receiver.
ALERT_MEMO = "opsflow-alert"


class Alert(BaseModel):
    """One alert of Alertmanager's webhook payload (version 4); what the receiver reads of it."""

    status: Literal["firing", "resolved"]
    labels: dict[str, str]
    annotations: dict[str, str] = {}
    startsAt: str  # noqa: N815 (Alertmanager's field name)
    fingerprint: str


class Payload(BaseModel):
    version: str
    status: str
    alerts: list[Alert]


def alert_routing(inv: Inventory) -> AlertRouting:
    if inv.alerts is None:
        raise CliError(f"the inventory of {inv.environment} has no alerts: section (which alerts request which "
                       "failover, as whom; see docs/inventory.example.yaml)")
    return inv.alerts


class Receiver:
    """Turns alerts into requested procedures; remembers which firing started which (a JSON state file)."""

    def __init__(self, inv: Inventory, key: str | None, state: Path) -> None:
        self.inv, self.key, self.state = inv, key, state
        self.routing = alert_routing(inv)
        self.requester = self.routing.requester
        self.outcomes: Counter[str] = Counter()  # what the alerts received came to, for GET (and the tests)
        self.seen: dict[str, str] = json.loads(state.read_text()) if state.exists() else {}
        self.lock = asyncio.Lock()
        self.client: Any = None

    async def receive(self, body: dict) -> list[dict]:
        payload = Payload.model_validate(body)
        results = [await self.one(a) for a in payload.alerts]
        self.outcomes.update(r["outcome"] for r in results)
        return results

    async def one(self, alert: Alert) -> dict:
        name = alert.labels.get("alertname", "")
        out: dict[str, Any] = {"alertname": name, "fingerprint": alert.fingerprint}
        if alert.status != "firing":
            return {**out, "outcome": "ignored", "detail": "resolved"}
        route = self.routing.route_for(alert.labels)
        if route is None:
            return {**out, "outcome": "ignored", "detail": "no route maps it to a procedure"}
        to = route.target(alert.labels)
        if not to or to not in self.inv.regions:
            return {
                **out,
                "outcome": "refused",
                "detail": f"target region {to!r} is not one of {list(self.inv.regions)}",
            }
        key = f"{alert.fingerprint}@{alert.startsAt}"
        async with self.lock:  # a repeat racing its first delivery finds it recorded
            if key in self.seen:
                return {**out, "outcome": "duplicate", "workflow_id": self.seen[key]}
            if self.client is None:
                self.client = await connect()
            earlier = await self.requested_before(key, alert.startsAt)
            if earlier is not None:
                self.remember(key, earlier)
                return {**out, "outcome": "duplicate", "workflow_id": earlier, "detail": "found in Temporal"}
            summary = alert.annotations.get("summary") or alert.annotations.get("description") or ""
            reason = f"requested by alert {name} ({alert.fingerprint}, firing since {alert.startsAt})" + (
                f": {summary}" if summary else "")
            from workflows.failover import FailoverInput

            inp = FailoverInput(inventory=self.inv, to_region=to, requester=self.requester, reason=reason[:500])
            try:
                handle = await start_procedure(self.client, self.inv, "failover", inp,
                                               f"Planned failover of {self.inv.environment} to {to}, requested by "
                                               f"alert {name}", memo={ALERT_MEMO: key},
                                               signer=start_signer(self.inv, self.requester, self.key))
            except ProcedureRunning as e:
                # Not remembered: once the environment is free, the alert's next repeat requests it.
                return {**out, "outcome": "refused", "detail": str(e), "workflow_id": e.workflow_id}
            self.remember(key, handle.id)
        log.info("alert %s (%s) requested a failover to %s: %s", name, alert.fingerprint, to, handle.id)
        return {**out, "outcome": "started", "workflow_id": handle.id, "procedure": "failover", "to": to,
                "waiting_for": "approval"}


    def remember(self, key: str, workflow_id: str) -> None:
        self.seen[key] = workflow_id
        tmp = self.state.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.seen, indent=1))
        tmp.replace(self.state)

    async def requested_before(self, key: str, starts_at: str) -> str | None:
        """The workflow id of a run this firing already requested, from Temporal's visibility (its memo), or None.
        Runs started since the alert began (an hour of clock skew allowed); a server without the query: None."""
        query = f"OpsEnvironment = '{self.inv.environment}' AND OpsProcedure = 'failover'"
        try:
            since = datetime.fromisoformat(starts_at.replace("Z", "+00:00")) - timedelta(hours=1)
            query += f" AND StartTime >= '{since.isoformat()}'"
        except ValueError:
            pass  # not a time: the newest runs
        try:
            async for wf in self.client.list_workflows(query, limit=200):
                if await wf.memo_value(ALERT_MEMO, None) == key:
                    return wf.id
        except RPCError as e:
            if e.status in (RPCStatusCode.UNIMPLEMENTED, RPCStatusCode.INVALID_ARGUMENT):
                return None
            raise
        return None


def serve(receiver: Receiver, address: str, port: int, token: str | None = None) -> None:
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name="alert-receiver-loop", daemon=True).start()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            given = self.headers.get("Authorization", "")
            if token is not None and not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return self._send(401, {"error": "Alertmanager's webhook must send the bearer token of --token-file "
                                                 "(http_config.authorization.credentials_file)"})
            if self.path.split("?")[0] not in ("/", "/alerts"):
                return self._send(404, {"error": "POST Alertmanager's webhook to /alerts"})
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")
                results = asyncio.run_coroutine_threadsafe(receiver.receive(body), loop).result(timeout=120)
            except (json.JSONDecodeError, ValidationError) as e:
                return self._send(400, {"error": f"not an Alertmanager webhook payload: {e}"})
            except Exception as e:  # Temporal unreachable...: 5xx, so Alertmanager retries
                log.exception("handling alerts")
                return self._send(503, {"error": str(e)})
            self._send(200, {"results": results})

        def do_GET(self) -> None:  # noqa: N802
            self._send(200, {"ok": True, "environment": receiver.inv.environment, "requester": receiver.requester,
                             "routes": len(receiver.routing.routes), "outcomes": dict(receiver.outcomes)})

        def _send(self, code: int, data: dict) -> None:
            body = json.dumps(data).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((address, port), Handler)
    print(f"opsflow alert-receiver: {receiver.inv.environment}, {len(receiver.routing.routes)} route(s), as "
          f"{receiver.requester}, http://{address}:{server.server_address[1]}/alerts", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def run_receiver(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    inv = load_inventory(inventory_path(args.env))
    state = Path(args.state or f"opsflow-alerts-{inv.environment}.json")
    try:
        receiver = Receiver(inv, args.key, state)
    except (OSError, json.JSONDecodeError) as e:
        raise CliError(f"--state {state}: {e}") from None
    token = None
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as e:
            raise CliError(f"--token-file {args.token_file}: {e}") from None
        if not token:
            raise CliError(f"--token-file {args.token_file} is empty")
    try:
        serve(receiver, args.address, args.port, token)
    except OSError as e:
        raise ClientError(f"cannot listen on {args.address}:{args.port}: {e}", 2) from None
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("alert-receiver", help="Alertmanager webhook: a mapped alert requests a failover (waiting for "
                                              "approval), once per firing")
    p.add_argument("--env", metavar="INVENTORY", help="the environment's inventory (default: the running lab's)")
    add_key_argument(p)  # the key of the inventory's alerts.requester, where starts are signed
    p.add_argument("--address", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=9095, help="listen port (default 9095)")
    p.add_argument("--token-file", metavar="FILE", help="refuse a POST without this bearer token (Alertmanager's "
                                                        "webhook http_config.authorization.credentials_file)")
    p.add_argument("--state", metavar="FILE", help="where the firings already handled are kept "
                                                   "(default ./opsflow-alerts-<environment>.json)")
    p.set_defaults(func=run_receiver)
