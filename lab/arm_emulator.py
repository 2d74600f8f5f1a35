"""A local Azure Resource Manager emulator for the lab: the real azure-mgmt SDK clients talk to it over HTTPS.

This module is the server: HTTPS (a trustme test CA), ARM's request/answer plumbing, the faults, the admin API and
the command line. What it serves lives in lab/arm/, one module per resource type (lab/arm/__init__.py lists
them): flexible servers (Microsoft.DBforPostgreSQL/flexibleServers: bodies, configurations, create/delete,
promotions and replicas, point-in-time restores, backups), Traffic Manager profiles (Microsoft.Network), Key
Vault's get-secret, and the long-running operations' protocol.

The admin API (no token needed; loopback lab only) is the emulators' one (lab/emulator.py): /_emulator/health,
state, counts, requests, faults, fault_rate — plus the ARM emulator's own (lab/arm/world.py World.admin_route):
/_emulator/settings, /_emulator/vault/secrets/{name}, /_emulator/trafficmanagerprofiles/{p}/endpoints/{e}/health,
/_emulator/flexibleServers/{server}. Faults (lab/faults.py): a fault's `match` is searched in "<METHOD> <path>".

Config (JSON):

    {
      "subscription_id": "00000000-0000-0000-0000-000000000000",
      "tokens": ["lab-token"],              # optional: accepted bearer tokens (default: any bearer token)
      "settings": {"lro_seconds": 1, "tm_checking_seconds": 2},
      "key_vault_secrets": {"db-password": "..."},
      "flexible_servers": {
        "pg-westeurope":  {"resource_group": "rg-lab", "location": "westeurope",
                           "cluster": {<lab.postgres.Cluster.to_dict()>}, "role": "Primary"},
        "pg-northeurope": {"resource_group": "rg-lab", "location": "northeurope",
                           "cluster": {...}, "role": "AsyncReplica", "source": "pg-westeurope"}
      },
      "traffic_manager_profiles": {
        "tm-lab": {"resource_group": "rg-lab", "routing_method": "Priority",
                   "endpoints": {
                     "ep-westeurope":  {"region": "westeurope",  "target": "weu.app.example", "priority": 1},
                     "ep-northeurope": {"region": "northeurope", "target": "neu.app.example", "priority": 2,
                                        "status": "Disabled", "type": "externalEndpoints"}}}
      }
    }

Roles, sources, configuration overrides, endpoint states and the servers created through the API (scratch
restores, replicas) live in memory and are saved to a state file (default: next to the config file,
<config>.state.json) on every change, so a restarted emulator keeps them. created_clusters(state_file) names
the clusters the emulator created, for a lab teardown.

Run it:  python -m lab.arm_emulator --config FILE --port N --ca-dir DIR
In-process: start_emulator(config, ca_dir, port=0) -> ArmEmulator (.url, .ca_path, .stop(), .inject_fault(), ...).
The test CA (trustme) is kept in ca_dir (ca.pem, ca.key) and reused across restarts; clients pass ca.pem as
`connection_verify` (the SDK refuses bearer tokens over plain HTTP, so there is no HTTP listener at all).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import ssl
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import trustme

from lab.arm.common import ERROR_CODES, ArmError, bad_request
from lab.arm.world import World
from lab.emulator import Emulator, is_admin_path
from lab.faults import Fault

log = logging.getLogger("opsflow.lab.arm_emulator")


class ArmEmulator(Emulator):
    """A running ARM emulator: .url (https://127.0.0.1:PORT), .ca_path (the CA file clients trust), .world."""

    def __init__(self, world: World, ca_path: Path):
        super().__init__()
        self.world, self.ca_path = world, ca_path

    def after_stop(self) -> None:
        self.world.persist()

    def describe(self) -> dict:
        return self.world.snapshot()

    def admin_route(self, method: str, segs: list[str], body: Any) -> tuple[int, Any] | None:
        return self.world.admin_route(method, segs, body)

    def configure(self, **settings: Any) -> dict:
        """lro_seconds, tm_checking_seconds, planned_sync_timeout, promote_timeout, lro_retry_after."""
        return self.world.set_settings(settings)

    def set_endpoint_health(self, profile: str, endpoint: str, healthy: bool) -> dict:
        return self.world.set_endpoint_health(profile, endpoint, healthy)

    def set_server_state(self, server: str, state: str | None) -> dict:
        return self.world.set_server_state(server, state)

    def created_clusters(self) -> list[dict]:
        """Cluster.to_dict() of every lab cluster the emulator created (restores, new replicas) and still maps."""
        return self.world.created_clusters()


# ---------------------------------------------------------------------------------------------------------------
# HTTPS server
# ---------------------------------------------------------------------------------------------------------------


def _fault_error(fault: Fault, method: str, path: str) -> ArmError:
    assert fault.status is not None
    code = fault.code or ERROR_CODES.get(fault.status, "EmulatedFault")
    extra = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
    message = fault.message or f"Injected fault {fault.id} ({code}) for {method} {path}."
    return ArmError(fault.status, code, message, extra)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "opsflow-arm-emulator/1"
    server: "_HttpsServer"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("%s " + format, self.client_address[0], *args)

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def do_PATCH(self) -> None:  # noqa: N802
        self._dispatch("PATCH")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self, method: str) -> None:
        emu = self.server.emulator
        world = emu.world
        url = urlsplit(self.path)
        path = url.path
        raw = self._read_body()
        status, payload, headers = 500, None, {}
        faulted = False
        try:
            body: Any = None
            if raw.strip():
                try:
                    body = json.loads(raw)
                except ValueError as e:
                    raise bad_request(f"The request content was invalid and could not be deserialized: {e}.",
                                      "InvalidRequestContent") from None
            host = self.headers.get("Host") or f"127.0.0.1:{self.server.server_address[1]}"
            if is_admin_path(path):
                status, payload = emu.admin(method, path, body if body is not None else {})
            elif path.startswith("/secrets/"):
                status, payload, headers = world.key_vault(method, path, self.headers.get("Authorization"),
                                                           f"https://{host}")
            else:
                world.check_auth(self.headers.get("Authorization"))
                fault = emu.take_fault(f"{method} {path}", method)
                if fault:
                    faulted = True
                    if fault.delay:
                        time.sleep(fault.delay)
                    if fault.drop:
                        self._drop(method, path)
                        return
                    if fault.status:
                        raise _fault_error(fault, method, path)
                status, payload, headers = world.handle(method, path, parse_qs(url.query), body, f"https://{host}")
        except ArmError as e:
            status, payload, headers = e.status, e.body(), e.headers
        except Exception as e:  # noqa: BLE001
            log.exception("emulator error on %s %s", method, self.path)
            error = {"code": "InternalServerError", "message": f"{type(e).__name__}: {e}"}
            status, payload, headers = 500, {"error": error}, {}
        self._log(method, path, status, faulted)
        self._send(status, payload, headers)

    def _log(self, method: str, path: str, status: int, faulted: bool) -> None:
        emu = self.server.emulator
        emu.log_request(method, path, status, faulted)
        if not is_admin_path(path):
            emu.count_request(f"{method} {path.split('?')[0]}")

    def _drop(self, method: str, path: str) -> None:
        """Close the connection without an answer (the client sees a reset)."""
        self._log(method, path, 0, True)
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _send(self, status: int, payload: Any, headers: dict[str, str]) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        if payload is not None:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        request_id = str(uuid.uuid4())
        self.send_header("x-ms-request-id", request_id)
        self.send_header("x-ms-correlation-request-id", request_id)
        client_id = self.headers.get("x-ms-client-request-id")
        if client_id:
            self.send_header("x-ms-client-request-id", client_id)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if data:
            self.wfile.write(data)


class _HttpsServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], emulator: ArmEmulator, ssl_context: ssl.SSLContext):
        self.emulator = emulator
        self.ssl_context = ssl_context
        super().__init__(address, _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        # TLS handshake in the connection's own thread: a client that never speaks cannot stall accept().
        request.settimeout(30)
        try:
            tls = self.ssl_context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as e:
            log.debug("TLS handshake with %s failed: %s", client_address, e)
            return
        try:
            self.RequestHandlerClass(tls, client_address, self)
        finally:
            try:
                tls.close()
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("connection error from %s", client_address, exc_info=True)


def load_ca(ca_dir: Path) -> tuple[trustme.CA, Path]:
    """The lab's test CA (trustme), created once in ca_dir and reused: ca.pem (give it to clients), ca.key."""
    ca_dir = Path(ca_dir)
    ca_dir.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = ca_dir / "ca.pem", ca_dir / "ca.key"
    if cert_path.exists() and key_path.exists():
        return trustme.CA.from_pem(cert_path.read_bytes(), key_path.read_bytes()), cert_path
    ca = trustme.CA(organization_name="opsflow lab")
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(ca.private_key_pem.bytes())
    ca.cert_pem.write_to_path(str(cert_path))
    return ca, cert_path


def created_clusters(state_path: Path) -> list[dict]:
    """Cluster.to_dict() of the lab clusters an emulator created (point-in-time restores, new replicas), read from
    its state file: what a lab teardown must stop besides its own clusters (lab.postgres.drop_cluster). [] when
    there is no state file."""
    try:
        data = json.loads(Path(state_path).read_text())
    except (OSError, ValueError):
        return []
    return [dict(s["cluster"]) for s in (data.get("servers") or {}).values()
            if s.get("origin") == "api" and s.get("cluster")]


def start_emulator(config: dict, ca_dir: Path, port: int = 0, host: str = "127.0.0.1",
                   state_path: Path | None = None) -> ArmEmulator:
    """Start the emulator in this process (a daemon thread). state_path default: ca_dir/arm_emulator.state.json."""
    ca, ca_path = load_ca(Path(ca_dir))
    cert = ca.issue_cert("127.0.0.1", "localhost", "::1")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    cert.configure_cert(ctx)
    world = World(config, state_path if state_path is not None else Path(ca_dir) / "arm_emulator.state.json")
    emu = ArmEmulator(world, ca_path)
    server = _HttpsServer((host, port), emu, ctx)
    emu.port = server.server_address[1]
    emu.url = f"https://{host}:{emu.port}"
    emu.serve(server, "arm-emulator")
    log.info("ARM emulator on %s (CA %s)", emu.url, ca_path)
    return emu


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.arm_emulator",
                                 description="Azure Resource Manager emulator for the opsflow lab (HTTPS only).")
    ap.add_argument("--config", required=True, type=Path,
                    help="JSON config: servers mapped to lab clusters, Traffic Manager profiles")
    ap.add_argument("--port", type=int, default=0, help="TCP port on --host (0: any free port, printed at start)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--ca-dir", required=True, type=Path,
                    help="where the test CA lives (ca.pem for clients); created if missing")
    ap.add_argument("--state", type=Path, default=None, help="state file (default: <config>.state.json)")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        config = json.loads(args.config.read_text())
    except (OSError, ValueError) as e:
        print(f"arm_emulator: cannot read config {args.config}: {e}", file=sys.stderr)
        return 2
    state = args.state or args.config.with_name(args.config.name + ".state.json")
    try:
        emu = start_emulator(config, args.ca_dir, port=args.port, host=args.host, state_path=state)
    except (ValueError, OSError) as e:
        print(f"arm_emulator: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(json.dumps({"url": emu.url, "ca_path": str(emu.ca_path), "state": str(state), "pid": os.getpid()}),
          flush=True)
    stop.wait()
    emu.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
