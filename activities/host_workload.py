"""An app outside Kubernetes (`workload.kind: host`): one instance per role on a host, behind the nginx router.

The inventory's `start`, `check` and `stop` commands run through its prefix (`run`, e.g. ssh; [] on the worker's
own host), placeholders filled ({role}, {name}, {image}, {version}); the model checked every argument, and the
image is checked here, so a remote shell splits nothing. Each command is bounded by `workload.timeout` and
heartbeats while it runs; the wait until an instance is ready is bounded by it too. `check` says what runs: exit 0
and the image on its last line (up and ready), exit 3 (not running), anything else (not ready). One instance per
role: the canary's size does not follow its weight (its share of NGINX's traffic does).
"""

from __future__ import annotations

import logging
import os
import subprocess
import time

from temporalio.exceptions import ApplicationError

from activities.commands import run_bounded
from activities.context import heartbeat, logger, sleep_or_cancelled
from opsflow.rollout import BASELINE_SUFFIX, HOST_IMAGE, HostWorkload, RolloutState, RolloutTarget

log = logging.getLogger(__name__)
POLL = 0.2
NOT_RUNNING = 3  # LSB's "program is not running", as systemctl is-active and pg_ctl status answer


def _run(w: HostWorkload, cmd: list[str], what: str) -> subprocess.CompletedProcess:
    """Run one command on the host, heartbeating; bounded by the workload's timeout."""
    return run_bounded(cmd, what, w.timeout, env=dict(os.environ))


def _tail(p: subprocess.CompletedProcess) -> str:
    return " | ".join((p.stdout or "").strip().splitlines()[-3:]) or "no output"


class HostInstances:
    """The app's instances on its host, by role: stable, canary, baseline (`target.canary_suffix`)."""

    def __init__(self, target: RolloutTarget):
        assert target.app.workload is not None
        self.target, self.w = target, target.app.workload
        self.role = "baseline" if target.canary_suffix == BASELINE_SUFFIX else "canary"

    def _name(self, role: str) -> str:
        return self.target.app.deployment if role == "stable" else self.target.canary

    def look(self, role: str) -> tuple[int, str]:
        """(exit status of `check`, the image it printed or its tail)."""
        p = _run(self.w, self.w.command("check", role, self._name(role)), f"check {self._name(role)}")
        out = (p.stdout or "").strip().splitlines()
        return p.returncode, (out[-1].strip() if p.returncode == 0 and out else _tail(p))

    def start(self, role: str, image: str) -> None:
        """Start (or replace) `role`'s instance with `image` and wait until `check` says it serves it. Idempotent:
        an instance that already serves the image is left alone."""
        if not HOST_IMAGE.match(image):
            raise ApplicationError(f"image {image!r} has characters a command on the host must not carry",
                                   type="BadInput", non_retryable=True)
        name = self._name(role)
        code, seen = self.look(role)
        if code == 0 and seen == image:
            return
        p = _run(self.w, self.w.command("start", role, name, image), f"start {name}")
        if p.returncode != 0:
            raise ApplicationError(f"start {name} ({image}): exit {p.returncode}: {_tail(p)}", type="HostCommandFailed")
        logger(log).info("%s: started %s with %s", self.target.region, name, image)
        deadline = time.monotonic() + self.w.timeout
        while True:
            code, seen = self.look(role)
            if code == 0 and seen == image:
                return
            if time.monotonic() > deadline:
                raise ApplicationError(f"{name} not ready with {image} after {self.w.timeout:.0f}s (check: exit "
                                       f"{code}: {seen})", type="NotReady")
            heartbeat(f"waiting for {name}")
            sleep_or_cancelled(POLL)

    def stop(self, role: str) -> None:
        """Stop `role`'s instance; one that does not run is success. Then `check` must say it does not run."""
        name = self._name(role)
        p = _run(self.w, self.w.command("stop", role, name), f"stop {name}")
        if p.returncode != 0:
            raise ApplicationError(f"stop {name}: exit {p.returncode}: {_tail(p)}", type="HostCommandFailed")
        code, seen = self.look(role)
        if code != NOT_RUNNING:
            raise ApplicationError(f"stop {name}: check still answers exit {code}: {seen}", type="HostCommandFailed")
        logger(log).info("%s: stopped %s", self.target.region, name)

    def state(self) -> RolloutState:
        code, seen = self.look("stable")
        s = RolloutState(stable=self.target.app.deployment)
        if code == 0:
            s.stable_image, s.stable_desired, s.stable_ready, s.stable_done = seen, 1, 1, True
        elif code != NOT_RUNNING:
            s.stable_desired = 1  # runs, not ready
        code, seen = self.look(self.role)
        if code != NOT_RUNNING:  # running, ready or not: a canary is there
            s.canary, s.canary_replicas = self.target.canary, 1
            s.canary_image, s.canary_ready = (seen, 1) if code == 0 else (None, 0)
        return s

    # -- what activities/workloads.py calls, one per activity --------------------------------------------------
    def create(self, image: str) -> RolloutState:
        self.start(self.role, image)
        return self.state()

    def size(self) -> RolloutState:
        """One instance per role: sizing only checks the canary is still up and ready."""
        code, seen = self.look(self.role)
        if code != 0:
            raise ApplicationError(f"{self.target.canary} is not ready (check: exit {code}: {seen})", type="NotReady")
        return self.state()

    def remove(self) -> RolloutState:
        self.stop(self.role)
        return self.state()

    def promote(self, image: str) -> RolloutState:
        self.start("stable", image)
        return self.state()
