"""The lab's processes: its state file (lab.json), starting processes into their own logs and process groups,
ports, and stopping them.

    Lab(root)                        lab.json in `root`; spawn(name, argv) a process, stop_process, alive
    stop_pids(pids) / stop_pid(pid)  SIGTERM each process group, SIGKILL what is left after a timeout
    pick_port(preferred)             the preferred port when free, else lab.ports.free_port()
    wait_port / wait_file            until a process opened its port (or died) / wrote its file
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from lab.faults import FAULTS_ENV
from lab.ports import free_port
from opsflow.client import pid_alive


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def pick_port(preferred: int | None = None) -> int:
    if preferred and port_free(preferred):
        return preferred
    return free_port()


def wait_port(port: int, timeout: float, what: str, log: Path | None = None, pid: int | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not port_free(port):
            return
        if pid is not None and not pid_alive(pid):
            break  # it died: no point waiting
        time.sleep(0.1)
    tail = "\n".join(log.read_text().splitlines()[-20:]) if log and log.exists() else ""
    raise RuntimeError(f"{what} did not open port {port} (log {log}):\n{tail}")


def wait_file(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear within {timeout:.0f}s")
        time.sleep(0.1)


class Lab:
    """The lab's state (lab.json) and the processes it owns."""

    def __init__(self, root: Path):
        self.root = root
        self.state_file = root / "lab.json"
        self.state: dict = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}
        self.faults = 0.0  # the cloud emulators' random fault rate (lab up --faults)

    def save(self) -> None:
        self.state_file.write_text(json.dumps(self.state, indent=2))

    def spawn(self, name: str, argv: list[str], env: dict | None = None) -> int:
        if self.faults and (name in ("arm", "aws") or name.startswith("k8s-")):
            env = {**(env or {}), FAULTS_ENV: str(self.faults)}
            self.state["faults"] = self.faults
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, env={**os.environ, **(env or {})}, cwd=self.root)
        self.state.setdefault("processes", {})[name] = {"pid": proc.pid, "log": str(log), "argv": argv}
        self.save()
        return proc.pid

    def stop_process(self, name: str, timeout: float = 15) -> None:
        info = self.state.get("processes", {}).pop(name, None)
        if not info:
            return
        stop_pid(info["pid"], timeout)
        self.save()

    def alive(self, name: str) -> bool:
        info = self.state.get("processes", {}).get(name)
        return bool(info) and pid_alive(info["pid"])

    def wait_port(self, name: str, port: int, timeout: float = 60, what: str | None = None) -> None:
        """Until the process `name` opened `port`; its log's tail in the error if it did not (or died)."""
        info = self.state["processes"][name]
        wait_port(port, timeout, what or name, Path(info["log"]), pid=info["pid"])


def stop_pid(pid: int, timeout: float = 15) -> None:
    stop_pids([pid], timeout)


def stop_pids(pids: list[int], timeout: float = 15) -> None:
    """SIGTERM each process group, then SIGKILL what is left after the timeout; all at once, so that a lab's
    slowest process to stop sets the time, not the sum of them."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = [p for p in pids if pid_alive(p)]
        for pid in left:
            try:
                os.killpg(pid, sig)
            except (ProcessLookupError, PermissionError):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        while left and time.monotonic() < deadline:
            for pid in left:
                try:
                    os.waitpid(pid, os.WNOHANG)  # reap our children, or they stay zombies
                except ChildProcessError:
                    pass
            left = [p for p in left if pid_alive(p)]
            if left:
                time.sleep(0.05)
        if not left:
            return
