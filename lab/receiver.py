"""The lab's notification receiver and demo health endpoints.

POST any path: the JSON body is appended to <dir>/notifications.jsonl (what Slack/webhooks would get).
GET /health/<region>: 200 "ok", or 503 when <dir>/unhealthy-<region> exists (for smoke-test failures).
Run: python -m lab.receiver --dir DIR --port N
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def make_handler(root: Path):
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                payload = json.loads(body or b"null")
            except ValueError:
                self.send_response(400)
                self.end_headers()
                return
            with lock, open(root / "notifications.jsonl", "a") as f:
                f.write(json.dumps({"at": time.time(), "path": self.path, "body": payload}) + "\n")
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

        def do_GET(self) -> None:
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
