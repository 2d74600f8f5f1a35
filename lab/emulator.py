"""The one base of the lab's emulators (ARM: lab/arm_emulator.py + lab/arm/, AWS: lab/aws_emulator.py,
Kubernetes: lab/k8s_emulator.py): what every one of them has, written once.

- the HTTP server's lifecycle: `serve(server, name)` runs it in a daemon thread, `run(target, name)` adds a
  background thread (a controller, a metrics loop), `stop()` (idempotent; also `with emu:`) shuts them down and
  then calls `after_stop()` (save the state, drop scratch clusters);
- the requests: `count_request(key)` counts every API request under its key ("<METHOD> <path>", AWS
  "<service> <Action>"), `log_request(...)` keeps the last 5000 (method, path, status, fault);
- the faults (lab.faults, one API for all three): `take_fault(key, method)` per API request,
  `inject_fault(match, status, count, ...)`, `clear_faults()`, `set_fault_rate(rate)`;
- the admin API, served by each emulator under /_emulator/ (no token; loopback lab only), JSON:

    GET    /_emulator/health                 {"ok": true}
    GET    /_emulator/state                  the emulator's own picture (describe()) + "faults"
    GET    /_emulator/counts                 {"requests": {"<key>": n}, "random_faults": {"throttle": n, ...}}
    GET|DELETE /_emulator/requests           the request log
    POST   /_emulator/faults                 a fault spec (lab.faults) or a list of them
    GET|DELETE /_emulator/faults             the planned faults
    POST   /_emulator/fault_rate             {"rate": 0.2 | null}

  plus what `admin_route()` of an emulator adds. Errors: {"error": {"code", "message"}} (ARM's shape).

A new emulator subclasses Emulator, gives `describe()` (and `admin_route()` for its own knobs), calls
`count_request` / `take_fault` for each API request, answers a Fault in its cloud's error shape and routes
/_emulator/ to `admin()`.
"""

from __future__ import annotations

import socketserver
import threading
import time
from collections import deque
from typing import Any, Callable
from urllib.parse import unquote

from lab.faults import Fault, FaultBook, FaultSpecError

ADMIN_PREFIX = "/_emulator"


class EmulatorError(Exception):
    """An error answer: HTTP status + {"error": {"code", "message"}} (and headers)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}


def is_admin_path(path: str) -> bool:
    return path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/")


class Emulator:
    """The base of a running emulator: .url, .port, the faults, the request counts and log, the admin API."""

    join_timeout = 5.0

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.fault_book = FaultBook()
        self.request_counts: dict[str, int] = {}  # API requests since the start, by key
        self.request_log: deque[dict] = deque(maxlen=5000)
        self.url = ""
        self.port = 0
        self.stop_event = threading.Event()
        self._server: socketserver.BaseServer | None = None
        self._threads: list[threading.Thread] = []

    # -- lifecycle -------------------------------------------------------------------------------------------
    def serve(self, server: socketserver.BaseServer, name: str, poll_interval: float = 0.2) -> None:
        """Serve `server` in a daemon thread until stop()."""
        self._server = server
        self.run(server.serve_forever, name, poll_interval=poll_interval)

    def run(self, target: Callable[..., Any], name: str, **kwargs: Any) -> threading.Thread:
        thread = threading.Thread(target=target, kwargs=kwargs, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)
        return thread

    def stop(self) -> None:
        """Stop serving and the background threads, then after_stop(). Idempotent."""
        if self.stop_event.is_set():
            return
        self.stop_event.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for t in self._threads:
            t.join(timeout=self.join_timeout)
        self._threads.clear()
        self.after_stop()

    def after_stop(self) -> None:
        """What an emulator does once it no longer serves (save its state...)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- requests and faults ---------------------------------------------------------------------------------
    def count_request(self, key: str) -> None:
        with self.lock:
            self.request_counts[key] = self.request_counts.get(key, 0) + 1

    def log_request(self, method: str, path: str, status: int, fault: bool = False) -> None:
        self.request_log.append({"t": time.time(), "method": method, "path": path, "status": status, "fault": fault})

    def requests(self) -> list[dict]:
        return list(self.request_log)

    def take_fault(self, key: str, method: str) -> Fault | None:
        """The fault to answer this API request with (random, else planned), or None."""
        return self.fault_book.take(key, method)

    def inject_fault(self, match: str, status: int | None = 503, count: int = 1, *, method: str | None = None,
                     code: str | None = None, message: str | None = None, retry_after: float | None = None,
                     delay: float = 0.0, drop: bool = False) -> dict:
        """Answer the next `count` API requests whose key `match` (a regex) finds with `status` (or drop them)."""
        return self.fault_book.add({"match": match, "status": status, "count": count, "method": method, "code": code,
                                    "message": message, "retry_after": retry_after, "delay": delay,
                                    "drop": drop}).public()

    def clear_faults(self) -> None:
        self.fault_book.clear()

    def set_fault_rate(self, rate: float | None) -> float:
        """A fraction of API requests answered 429/503/dropped at random; None: $OPSFLOW_LAB_FAULTS's."""
        return self.fault_book.set_rate(rate)

    def counts(self) -> dict:
        with self.lock:
            return {"requests": dict(self.request_counts), "random_faults": self.fault_book.injected()}

    # -- state and admin -------------------------------------------------------------------------------------
    def describe(self) -> dict:
        """The emulator's own picture of its world, for GET /_emulator/state."""
        return {}

    def state(self) -> dict:
        return {**self.describe(), "faults": self.fault_book.planned()}

    def admin_route(self, method: str, segs: list[str], body: Any) -> tuple[int, Any] | None:
        """An emulator's own admin resources (segs: the path after /_emulator/); None: not one of them."""
        return None

    def admin(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        """Answer an admin request (path under /_emulator/, body parsed JSON or None): (status, JSON payload)."""
        segs = [unquote(s) for s in path.strip("/").split("/")][1:]
        try:
            answer = self._admin(method, segs, body)
            if answer is None:
                answer = self.admin_route(method, segs, body)
            if answer is None:
                raise EmulatorError(404, "NotFound", f"no admin resource {method} {path}")
            return answer
        except EmulatorError as e:
            return e.status, e.body()
        except (FaultSpecError, KeyError, TypeError, ValueError) as e:
            return 400, {"error": {"code": "BadRequest", "message": f"{type(e).__name__}: {e}"}}

    def _admin(self, method: str, segs: list[str], body: Any) -> tuple[int, Any] | None:
        if segs == ["health"] and method == "GET":
            return 200, {"ok": True}
        if segs == ["state"] and method == "GET":
            return 200, self.state()
        if segs == ["counts"] and method == "GET":
            return 200, self.counts()
        if segs == ["requests"] and method == "GET":
            return 200, {"value": self.requests()}
        if segs == ["requests"] and method == "DELETE":
            self.request_log.clear()
            return 200, {"value": []}
        if segs == ["faults"] and method == "POST":
            for spec in body if isinstance(body, list) else [body]:
                self.fault_book.add(spec)
            return 201, {"value": self.fault_book.planned()}
        if segs == ["faults"] and method == "GET":
            return 200, {"value": self.fault_book.planned()}
        if segs == ["faults"] and method == "DELETE":
            self.clear_faults()
            return 200, {"value": []}
        if segs == ["fault_rate"] and method == "POST":
            if not isinstance(body, dict) or "rate" not in body:
                raise EmulatorError(400, "BadRequest", 'body must be {"rate": 0.2 | null}')
            return 200, {"rate": self.set_fault_rate(body["rate"])}
        return None
