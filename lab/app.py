"""The lab's application: a small real HTTP service whose behaviour comes from its image name.

The lab "pulls" no image: the image reference only names a behaviour, read from its last path segment
before the tag (``registry.lab/shop:healthy-2`` -> ``healthy``):

- ``healthy``: answers 200 in 5-25 ms;
- ``faulty``: like healthy, but about 15 % of the answers are HTTP 500;
- ``slow``: like healthy, plus 300 ms.

``/metrics`` exposes Prometheus metrics labelled with the deployment and the version (the image tag):
``http_requests_total{deployment,version,status}`` and ``http_request_duration_seconds`` (histogram).
``/healthz`` answers 200 without counting.

Run: python -m lab.app --port N --deployment web --image registry.lab/shop:healthy-1
"""

from __future__ import annotations

import argparse
import random
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

FAULTY_ERROR_RATE = 0.15
SLOW_EXTRA_SECONDS = 0.3
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


def behaviour_of(image: str) -> str:
    """'registry.lab/shop:faulty-2' -> 'faulty'; anything unknown behaves as healthy."""
    tag = image.rsplit(":", 1)[-1] if ":" in image.rsplit("/", 1)[-1] else "healthy"
    kind = tag.split("-", 1)[0]
    return kind if kind in ("healthy", "faulty", "slow") else "healthy"


def version_of(image: str) -> str:
    last = image.rsplit("/", 1)[-1]
    return last.rsplit(":", 1)[-1] if ":" in last else "latest"


def make_server(port: int, deployment: str, image: str) -> ThreadingHTTPServer:
    registry = CollectorRegistry()
    labels = {"deployment": deployment, "version": version_of(image)}
    requests = Counter("http_requests", "requests served", ["deployment", "version", "status"], registry=registry)
    latency = Histogram("http_request_duration_seconds", "time to answer", ["deployment", "version"],
                        buckets=LATENCY_BUCKETS, registry=registry)
    # Only the 200 series exists from the start; the 500 series appears with the first error, as in a real app
    # (labelled counters are born when first used), so "no 5xx yet" is a missing series, not a zero: the
    # inventory's error-rate says `missing: zero`.
    requests.labels(status="200", **labels)
    kind = behaviour_of(image)
    rng = random.Random()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def _answer(self, code: int, body: bytes, ctype: str = "text/plain") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Version", labels["version"])
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/metrics":
                return self._answer(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            if self.path == "/healthz":
                return self._answer(200, b"ok")
            started = time.perf_counter()
            time.sleep(rng.uniform(0.005, 0.025) + (SLOW_EXTRA_SECONDS if kind == "slow" else 0.0))
            code = 500 if kind == "faulty" and rng.random() < FAULTY_ERROR_RATE else 200
            latency.labels(**labels).observe(time.perf_counter() - started)
            requests.labels(status=str(code), **labels).inc()
            self._answer(code, f"{deployment} {labels['version']} {code}\n".encode())

    server = Server(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    return server


class Server(ThreadingHTTPServer):
    allow_reuse_port = True  # the next image's process binds the port while this one finishes (the nginx router)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.app")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--deployment", required=True)
    p.add_argument("--image", required=True)
    args = p.parse_args(argv)
    server = make_server(args.port, args.deployment, args.image)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    done.wait()
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
