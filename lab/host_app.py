"""The lab's app on a "host" (`opsflow lab up --rollout --router nginx --workload host`): what a Compose service or
a systemd unit is in production, the script the inventory's host workload runs (start, check, stop) through the
worker. Each role (stable, canary, baseline) is one `lab.app` process on the role's fixed port (ports.json in the
directory), detached from the script, its pid and image in <dir>/<role>.json.

    python -m lab.host_app --dir D start ROLE IMAGE   start (or replace) ROLE's instance; returns once it serves IMAGE
    python -m lab.host_app --dir D check ROLE         exit 0 printing the image it serves; 3: not running; 1: not ready
    python -m lab.host_app --dir D stop ROLE          stop it (a stopped one: nothing to do)

A new image's process takes the port over (SO_REUSEPORT) before the old one stops, so stable's promotion loses
no connection NGINX could not retry.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lab.rollout import APP, serves

NOT_RUNNING, NOT_READY = 3, 1
NAMES = {"stable": APP, "canary": f"{APP}-canary", "baseline": f"{APP}-baseline"}


def version(image: str) -> str:
    return image.rsplit(":", 1)[-1]


def ports(d: Path) -> dict[str, int]:
    return json.loads((d / "ports.json").read_text())


def alive(pid: int) -> bool:
    """The pid is a lab.app process that has not exited (a zombie, or a reused pid, is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z" and b"lab.app" in cmdline


def running(d: Path, role: str) -> dict | None:
    f = d / f"{role}.json"
    try:
        info = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    return info if alive(info["pid"]) else None


def terminate(pid: int, wait: float = 5.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + wait
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive(pid):
        os.kill(pid, signal.SIGKILL)


def start(d: Path, role: str, image: str, wait: float = 15.0) -> int:
    port, old = ports(d)[role], running(d, role)
    if old is not None and old["image"] == image and serves(port, version(image)):
        return 0
    with open(d / f"{role}.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "lab.app", "--port", str(port), "--deployment", NAMES[role],
                                 "--image", image], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)  # outlives this script, as a unit outlives systemctl
    # recorded at once (the old one too, until it is stopped): a start cut short (an abort) leaves nothing `stop`
    # does not find
    (d / f"{role}.json").write_text(json.dumps({"pid": proc.pid, "image": image, "port": port,
                                                "old": old["pid"] if old else None}))
    with open(d / "starts.log", "a") as f:  # what the lab's tests count: one process per start that did anything
        f.write(f"{role} {image} {proc.pid}\n")
    while (d / "hold-start").exists():  # the lab's tests: a start held open, to kill the worker that runs it
        time.sleep(0.05)
    deadline = time.monotonic() + wait
    while not serves(port, version(image)):
        if proc.poll() is not None or time.monotonic() > deadline:
            print(f"{NAMES[role]} did not serve {image} on port {port} (exit {proc.poll()})", file=sys.stderr)
            terminate(proc.pid)
            if old is not None:  # the old instance goes on serving, as before
                (d / f"{role}.json").write_text(json.dumps(old))
            else:
                (d / f"{role}.json").unlink(missing_ok=True)
            return 1
        time.sleep(0.05)
    if old is not None:
        terminate(old["pid"])
    (d / f"{role}.json").write_text(json.dumps({"pid": proc.pid, "image": image, "port": port, "old": None}))
    print(f"{NAMES[role]} serves {image} on port {port} (pid {proc.pid})")
    return 0


def check(d: Path, role: str) -> int:
    info = running(d, role)
    if info is None:
        print(f"{NAMES[role]} does not run")
        return NOT_RUNNING
    if not serves(ports(d)[role], version(info["image"])):
        print(f"{NAMES[role]} (pid {info['pid']}) does not answer with {info['image']}")
        return NOT_READY
    print(info["image"])
    return 0


def stop(d: Path, role: str) -> int:
    try:
        old = json.loads((d / f"{role}.json").read_text()).get("old")
    except (OSError, ValueError):
        old = None
    if old and alive(old):  # a replaced instance a cut-short start left running
        terminate(old)
    info = running(d, role)
    if info is not None:
        terminate(info["pid"])
        print(f"{NAMES[role]} (pid {info['pid']}) stopped")
    (d / f"{role}.json").unlink(missing_ok=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.host_app")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("action", choices=["start", "check", "stop"])
    p.add_argument("role", choices=sorted(NAMES))
    p.add_argument("image", nargs="?")
    a = p.parse_args(argv)
    if a.action == "start":
        if not a.image:
            p.error("start needs an image")
        return start(a.dir, a.role, a.image)
    return check(a.dir, a.role) if a.action == "check" else stop(a.dir, a.role)


if __name__ == "__main__":
    sys.exit(main())
