"""The lab's notification receiver and demo health endpoints.

POST any path: the JSON body is appended to <dir>/notifications.jsonl (what Slack/webhooks would get).
GET /health/<region>: 200 "ok", or 503 when <dir>/unhealthy-<region> exists (for smoke-test failures).
POST /gate/<name>: a rollout's webhook check (as Flagger's): recorded like any POST; answers 200 {"pass": true},
or 403 {"pass": false, "reason": ...} when <dir>/fail-<name> exists (its text is the reason).
/statuspage/v1/pages/<page>/incidents[...]: a status page in the shape of Atlassian Statuspage's API (create,
list scheduled, update scheduled-maintenance incidents); every call is appended to <dir>/statuspage.jsonl.
Run: python -m lab.receiver --dir DIR --port N
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

STATUSPAGE = "/statuspage/v1/pages/"


def make_handler(root: Path):
    lock = threading.Lock()
    incidents: dict[str, dict] = {}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def _statuspage(self, method: str) -> None:
            """Statuspage-shaped: POST .../incidents, PATCH .../incidents/<id>, GET .../incidents/scheduled."""
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if method != "GET" else b""
            payload = json.loads(body or b"null")
            parts = self.path[len(STATUSPAGE):].strip("/").split("/")  # <page>, incidents[, <id>|scheduled]
            with lock:
                if not self.headers.get("Authorization", "").startswith("OAuth "):
                    return self._json(401, {"error": "missing OAuth key"})
                with open(root / "statuspage.jsonl", "a") as f:
                    record = {"at": time.time(), "method": method, "path": self.path, "body": payload}
                    f.write(json.dumps(record) + "\n")
                if method == "GET" and parts[1:] == ["incidents", "scheduled"]:
                    return self._json(200, [i for i in incidents.values()
                                            if i["page_id"] == parts[0] and i["status"] == "scheduled"])
                if method == "POST" and parts[1:] == ["incidents"]:
                    incident = {**payload["incident"], "id": f"inc{len(incidents) + 1}", "page_id": parts[0]}
                    incidents[incident["id"]] = incident
                    return self._json(201, incident)
                if method == "PATCH" and len(parts) == 3 and parts[2] in incidents:
                    incidents[parts[2]].update(payload["incident"])
                    return self._json(200, incidents[parts[2]])
            self._json(404, {"error": "not found"})

        def _json(self, status: int, payload) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_PATCH(self) -> None:
            if self.path.startswith(STATUSPAGE):
                return self._statuspage("PATCH")
            self._json(404, {"error": "not found"})

        def do_POST(self) -> None:
            if self.path.startswith(STATUSPAGE):
                return self._statuspage("POST")
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                payload = json.loads(body or b"null")
            except ValueError:
                self.send_response(400)
                self.end_headers()
                return
            with lock, open(root / "notifications.jsonl", "a") as f:
                f.write(json.dumps({"at": time.time(), "path": self.path, "body": payload}) + "\n")
            parts = self.path.strip("/").split("/")
            if len(parts) == 2 and parts[0] == "gate":
                fail = root / f"fail-{parts[1]}"
                if fail.exists():
                    return self._json(403, {"pass": False, "reason": fail.read_text().strip() or "failed"})
                return self._json(200, {"pass": True})
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

        def do_GET(self) -> None:
            if self.path.startswith(STATUSPAGE):
                return self._statuspage("GET")
            parts = self.path.strip("/").split("/")
            if len(parts) == 2 and parts[0] == "health":
                healthy = not (root / f"unhealthy-{parts[1]}").exists()
                self.send_response(200 if healthy else 503)
                self.end_headers()
                self.wfile.write(b"ok" if healthy else b"unhealthy")
                return
            self.send_response(404)
            self.end_headers()

    return Handler


def serve(root: Path, port: int = 0) -> ThreadingHTTPServer:
    root.mkdir(parents=True, exist_ok=True)
    server = ThreadingHTTPServer(("127.0.0.1", port), make_handler(root))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def read_statuspage(root: Path) -> list[dict]:
    path = root / "statuspage.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def read_notifications(root: Path) -> list[dict]:
    path = root / "notifications.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True, type=Path)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(args.dir))
    server.serve_forever()
