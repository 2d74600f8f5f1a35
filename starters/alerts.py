"""`opsflow alert-receiver`: an alert may request a procedure, never perform one (README "Running opsflow as a team").

An Alertmanager webhook receiver. For a firing alert that a route maps to a procedure, it starts that procedure as
its own requester (`--as`, signing with `--key` where the inventory requires signatures): a planned failover, which
changes nothing before a person approves it at its gate (the gate's notification tells the on-call). Alertmanager
repeats a firing alert every `repeat_interval` and retries on errors: an alert is recognised by its fingerprint and
its `startsAt` (the same firing), remembered in a state file, so a repeat starts nothing; the environment's lock
refuses a second procedure anyway.

Routes (`--routes FILE`, YAML):

    routes:
      - alertname: DatabaseDown
        match: {region: eastus}        # labels the alert must carry, with these values
        procedure: failover            # a planned failover (the only one that waits at its gate before acting)
        to: westeurope                 # or to_label: the alert's label naming the target region
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from opsflow.client import ClientError, ProcedureRunning, connect, inventory_path, start_procedure
from opsflow.inventory import Inventory, load_inventory
from starters.common import CliError, add_key_argument, start_signer

log = logging.getLogger("opsflow.alerts")


class AlertRoute(BaseModel):
    model_config = ConfigDict(extra="forbid")

    alertname: str
    match: dict[str, str] = {}
    procedure: Literal["failover"] = "failover"
    to: str | None = None
    to_label: str | None = None

    @model_validator(mode="after")
    def _target(self) -> "AlertRoute":
        if (self.to is None) == (self.to_label is None):
            raise ValueError(f"route for {self.alertname}: give exactly one of to (a region) or to_label (a label)")
        return self

    def matches(self, labels: dict[str, str]) -> bool:
        return labels.get("alertname") == self.alertname and all(labels.get(k) == v for k, v in self.match.items())


class Routes(BaseModel):
    model_config = ConfigDict(extra="forbid")

    routes: list[AlertRoute]


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


def load_routes(path: str, inv: Inventory) -> list[AlertRoute]:
    try:
        routes = Routes.model_validate(yaml.safe_load(Path(path).read_text()) or {}).routes
    except (OSError, yaml.YAMLError) as e:
        raise CliError(f"--routes {path}: {e}") from None
    except ValidationError as e:
        raise CliError(f"--routes {path}: {e}") from None
    for r in routes:
        if r.to is not None and r.to not in inv.regions:
            raise CliError(f"--routes {path}: route for {r.alertname} fails over to {r.to!r}, not a region of "
                           f"{inv.environment} ({', '.join(inv.regions)})")
    return routes


class Receiver:
    """Turns alerts into requested procedures; remembers which firing started which (a JSON state file)."""

    def __init__(self, inv: Inventory, routes: list[AlertRoute], requester: str, key: str | None, state: Path) -> None:
        self.inv, self.routes, self.requester, self.key, self.state = inv, routes, requester, key, state
        self.seen: dict[str, str] = json.loads(state.read_text()) if state.exists() else {}
        self.lock = asyncio.Lock()
        self.client: Any = None

    async def receive(self, body: dict) -> list[dict]:
        payload = Payload.model_validate(body)
        return [await self.one(a) for a in payload.alerts]

    async def one(self, alert: Alert) -> dict:
        name = alert.labels.get("alertname", "")
        out: dict[str, Any] = {"alertname": name, "fingerprint": alert.fingerprint}
        if alert.status != "firing":
            return {**out, "outcome": "ignored", "detail": "resolved"}
        route = next((r for r in self.routes if r.matches(alert.labels)), None)
        if route is None:
            return {**out, "outcome": "ignored", "detail": "no route maps it to a procedure"}
        to = route.to or alert.labels.get(route.to_label or "")
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
            summary = alert.annotations.get("summary") or alert.annotations.get("description") or ""
            reason = f"requested by alert {name} ({alert.fingerprint}, firing since {alert.startsAt})" + (
                f": {summary}" if summary else "")
            from workflows.failover import FailoverInput

            inp = FailoverInput(inventory=self.inv, to_region=to, requester=self.requester, reason=reason[:500])
            if self.client is None:
                self.client = await connect()
            try:
                handle = await start_procedure(self.client, self.inv, "failover", inp,
                                               f"Planned failover of {self.inv.environment} to {to}, requested by "
                                               f"alert {name}", signer=start_signer(self.inv, self.requester, self.key))
            except ProcedureRunning as e:
                # Not remembered: once the environment is free, the alert's next repeat requests it.
                return {**out, "outcome": "refused", "detail": str(e), "workflow_id": e.workflow_id}
            self.seen[key] = handle.id
            tmp = self.state.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.seen, indent=1))
            tmp.replace(self.state)
        log.info("alert %s (%s) requested a failover to %s: %s", name, alert.fingerprint, to, handle.id)
        return {**out, "outcome": "started", "workflow_id": handle.id, "procedure": "failover", "to": to,
                "waiting_for": "approval"}


def serve(receiver: Receiver, address: str, port: int, ready: threading.Event | None = None) -> None:
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name="alert-receiver-loop", daemon=True).start()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
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
            self._send(200, {"ok": True, "routes": len(receiver.routes)})

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
    print(f"opsflow alert-receiver: {receiver.inv.environment}, {len(receiver.routes)} route(s), "
          f"http://{address}:{server.server_address[1]}/alerts", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def run_receiver(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    inv = load_inventory(inventory_path(args.env))
    routes = load_routes(args.routes, inv)
    state = Path(args.state or f"opsflow-alerts-{inv.environment}.json")
    try:
        receiver = Receiver(inv, routes, args.requester, args.key, state)
    except (OSError, json.JSONDecodeError) as e:
        raise CliError(f"--state {state}: {e}") from None
    try:
        serve(receiver, args.address, args.port)
    except OSError as e:
        raise ClientError(f"cannot listen on {args.address}:{args.port}: {e}", 2) from None
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("alert-receiver", help="Alertmanager webhook: a mapped alert requests a failover (waiting for "
                                              "approval), once per firing")
    p.add_argument("--env", metavar="INVENTORY", help="the environment's inventory (default: the running lab's)")
    p.add_argument("--routes", required=True, metavar="FILE", help="YAML: which alerts request which failover")
    p.add_argument("--as", dest="requester", required=True, metavar="NAME",
                   help="the receiver's requester name (an operator of the inventory; signs with --key)")
    add_key_argument(p)
    p.add_argument("--address", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=9095, help="listen port (default 9095)")
    p.add_argument("--state", metavar="FILE", help="where the firings already handled are kept "
                                                   "(default ./opsflow-alerts-<environment>.json)")
    p.set_defaults(func=run_receiver)
