"""Random cloud faults for the lab's emulators (ARM, Kubernetes API, AWS): a fraction of the API requests is
answered the way a cloud under load answers — 429 with Retry-After, 503, or a connection dropped without an
answer (the client sees a timeout / reset). Control: `opsflow lab up --faults 0.2` (or OPSFLOW_LAB_FAULTS=0.2 in
the environment of the emulators), and each emulator's admin API ("fault_rate" setting) at run time.
"""

from __future__ import annotations

import os
import random
import threading

FAULTS_ENV = "OPSFLOW_LAB_FAULTS"
KINDS = ("throttle", "unavailable", "drop")  # 429 + Retry-After, 503, connection dropped


def rate_from_env() -> float:
    try:
        return min(1.0, max(0.0, float(os.environ.get(FAULTS_ENV) or 0)))
    except ValueError:
        return 0.0


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
