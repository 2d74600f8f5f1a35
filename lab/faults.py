"""Cloud faults for the lab's emulators (ARM, AWS, Kubernetes API): ONE fault API for all three.

A request has a key, the one `GET /_emulator/counts` counts it under: "<METHOD> <path>" for the ARM and the
Kubernetes emulators, "<service> <Action>" for AWS (e.g. "rds DescribeDBInstances", "s3 PutObject").

Planned faults: "fail the next `count` requests whose key the regular expression `match` finds (optionally only
`method`) with HTTP `status`" — each emulator answers in its cloud's error shape, with `code` (default: the
cloud's name for the status), `message`, `retry_after` seconds; `delay` holds the answer back; `drop` closes
the connection unanswered (AWS answers a 500 instead: its server cannot drop a connection). The same spec, in
Python on every emulator object (`emu.inject_fault(r"/flexibleServers/pg-neu$", status=429, count=2)`,
`emu.clear_faults()`) and over HTTP (`POST /_emulator/faults` {"match", "status", "count", ...},
`GET|DELETE /_emulator/faults`).

Random faults: a fraction of the API requests is answered the way a cloud under load answers — 429 with
Retry-After, 503, or a connection dropped without an answer (the client sees a timeout / reset). Control:
`opsflow lab up --faults 0.2` (or OPSFLOW_LAB_FAULTS=0.2 in the environment of the emulators), and at run time
`emu.set_fault_rate(0.2)` / `POST /_emulator/fault_rate {"rate": 0.2}` (null: back to the environment's).
`GET /_emulator/counts` says how many of each kind were injected.
"""

from __future__ import annotations

import os
import random
import re
import threading
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

FAULTS_ENV = "OPSFLOW_LAB_FAULTS"
KINDS = ("throttle", "unavailable", "drop")  # 429 + Retry-After, 503, connection dropped
SPEC_KEYS = ("match", "status", "count", "method", "code", "message", "retry_after", "delay", "drop")


class FaultSpecError(ValueError):
    """A fault spec the emulators cannot take (the admin API answers 400 with this message)."""


def rate_from_env() -> float:
    try:
        return min(1.0, max(0.0, float(os.environ.get(FAULTS_ENV) or 0)))
    except ValueError:
        return 0.0


@dataclass
class Fault:
    """One fault: planned (kind "planned", with what it matches and how many are left) or random (its KINDS)."""

    kind: str
    status: int | None
    match: str = ""
    count: int = 1
    method: str | None = None
    code: str | None = None
    message: str | None = None
    retry_after: float | None = None
    delay: float = 0.0
    drop: bool = False
    hits: int = 0
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def public(self) -> dict[str, Any]:
        return asdict(self)


def _random_fault(kind: str) -> Fault:
    status = {"throttle": 429, "unavailable": 503}.get(kind)
    return Fault(kind=kind, status=status, retry_after=1 if kind == "throttle" else None, drop=kind == "drop",
                 id=f"random-{kind}")


def parse_spec(spec: Any) -> Fault:
    """A planned fault from its spec (a dict of SPEC_KEYS), checked."""
    if not isinstance(spec, dict) or not isinstance(spec.get("match"), str):
        raise FaultSpecError("a fault needs 'match': a regular expression on the request's key "
                             "('<METHOD> <path>', or '<service> <Action>' for AWS)")
    unknown = set(spec) - set(SPEC_KEYS)
    if unknown:
        raise FaultSpecError(f"unknown fault keys {', '.join(sorted(unknown))} (known: {', '.join(SPEC_KEYS)})")
    try:
        re.compile(spec["match"], re.IGNORECASE)
    except re.error as e:
        raise FaultSpecError(f"fault 'match' is not a regular expression: {e}") from None
    status = spec.get("status")
    drop = bool(spec.get("drop", False))
    delay = float(spec.get("delay") or 0)
    if status is None and not drop and not delay:
        raise FaultSpecError("a fault needs 'status' (e.g. 429, 503), 'drop': true or 'delay': seconds")
    if status is not None and not (isinstance(status, int) and 400 <= status <= 599):
        raise FaultSpecError("fault 'status' must be an HTTP error status (400..599)")
    return Fault(kind="planned", status=status, match=spec["match"], count=int(spec.get("count", 1)),
                 method=(spec.get("method") or "").upper() or None, code=spec.get("code"),
                 message=spec.get("message"), retry_after=spec.get("retry_after"), delay=delay, drop=drop)


class RandomFaults:
    """Decides, per request, whether to fail it and how. Thread-safe; counts what it injected."""

    def __init__(self, rate: float | None = None, seed: int | None = None):
        self.rate = rate_from_env() if rate is None else rate
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.injected = {k: 0 for k in KINDS}

    def pick(self) -> str | None:
        """None (answer normally) or one of KINDS."""
        if self.rate <= 0:
            return None
        with self._lock:
            if self._rng.random() >= self.rate:
                return None
            kind = self._rng.choice(KINDS)
            self.injected[kind] += 1
            return kind


class FaultBook:
    """An emulator's faults: the planned ones and the random ones. Thread-safe.

    `take(key, method)` per API request: a random fault first (at the current rate), else the first planned
    fault with requests left that matches; None: answer normally."""

    def __init__(self, rate: float | None = None):
        self._lock = threading.Lock()
        self._planned: list[Fault] = []
        self._env_rate = rate_from_env()
        self.random = RandomFaults(rate)

    def add(self, spec: Any) -> Fault:
        fault = parse_spec(spec)
        with self._lock:
            self._planned.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self._planned.clear()

    def planned(self) -> list[dict[str, Any]]:
        with self._lock:
            return [f.public() for f in self._planned]

    def set_rate(self, rate: float | None) -> float:
        """The fraction of requests failed at random; None: the environment's (OPSFLOW_LAB_FAULTS)."""
        if rate is not None and not (isinstance(rate, (int, float)) and 0 <= rate <= 1):
            raise FaultSpecError("the fault rate is a fraction of the requests, from 0 to 1 (or null)")
        self.random.rate = self._env_rate if rate is None else float(rate)
        return self.random.rate

    def injected(self) -> dict[str, int]:
        """How many random faults of each kind were injected."""
        return dict(self.random.injected)

    def take(self, key: str, method: str) -> Fault | None:
        kind = self.random.pick()
        if kind is not None:
            return _random_fault(kind)
        with self._lock:
            for f in self._planned:
                if f.count <= 0 or (f.method and f.method != method):
                    continue
                if re.search(f.match, key, re.IGNORECASE):
                    f.count -= 1
                    f.hits += 1
                    return Fault(**asdict(f))
        return None
