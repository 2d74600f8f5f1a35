"""Free TCP ports for the lab's processes, safe when several labs start at once (parallel tests, benches).

Ports come from below the kernel's ephemeral range (net.ipv4.ip_local_port_range, 32768-60999 on Linux): the
Temporal dev server picks the ports of its internal services (history, matching, worker) itself, by binding port
0, i.e. from the ephemeral range. A port we picked there could be taken by such a pick before our process bound
it (CI once lost a lab that way: "bind: address already in use", the dev server's worker service on the HTTP port
we had chosen). Below the range, only explicit picks like ours compete, and a reservation file per port (O_EXCL)
keeps two of our processes from handing out the same one.
"""

from __future__ import annotations

import os
import random
import socket
import time
from pathlib import Path

LOW = 20000
RESERVED_FOR = 3600  # seconds a reservation holds: a lab lives for minutes, a stale file is taken over after this

_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _reserve(port: int) -> bool:
    """True when no other process of ours reserved `port` within RESERVED_FOR seconds; reserves it."""
    # One folder for every process of this user, wherever its temporary directory is.
    folder = Path(os.environ.get("OPSFLOW_PORTS_DIR") or "/tmp") / f"opsflow-ports-{os.getuid()}"
    folder.mkdir(exist_ok=True)
    path = folder / str(port)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        return True
    except FileExistsError:
        try:
            if time.time() - path.stat().st_mtime > RESERVED_FOR:
                path.touch()  # stale: take it over (two takers at once both pass the bind check only by luck)
                return True
        except OSError:
            pass
        return False


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, outside the ephemeral range, and not handed out to
    another caller in the last hour."""
    high = _ephemeral_low() - 1
    for _ in range(200):
        port = random.randint(LOW, high)
        if port in _handed_out or not _bindable(port):
            continue
        if _reserve(port):
            _handed_out.add(port)
            return port
    raise RuntimeError(f"no free loopback port found in {LOW}-{high}")
