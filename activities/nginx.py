"""Plain NGINX as a rollout's router: the upstream file on the host, written by the worker that runs there.

The file holds one upstream block and is opsflow's (nginx.conf includes it; a person edits the inventory, not the
file). A role's share (stable, canary, baseline; percent) becomes the `weight=` of each of its servers, split
evenly among them; a role at 0 % has its servers marked `down`. Every write is: the new text beside the old file,
renamed over it, `nginx -t` (the inventory's `test`), and only then the reload (its `reload`); a test that fails
puts the old file back and raises, naming NGINX's own message. A reload is sent even when the text did not change,
so a retry after a worker crash between the write and the reload still reloads.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from math import lcm
from pathlib import Path

from temporalio.exceptions import ApplicationError

from activities.context import logger
from opsflow.rollout import NginxRouter

log = logging.getLogger(__name__)

HEADER = "# managed by opsflow (rollout router); nginx.conf includes this file. Edit the inventory, not this file."
SERVER = re.compile(r"^\s*server\s+(\S+?)(\s[^;]*)?;", re.M)


def render(r: NginxRouter, shares: dict[str, int]) -> str:
    """The upstream block for `shares` (role -> percent). Servers of a role share its weight evenly: with n servers
    each gets share x L / n, L the least common multiple of the roles' server counts (whole numbers, exact)."""
    roles = [role for role in ("stable", "canary", "baseline") if r.servers.get(role)]
    scale = lcm(*(len(r.servers[role]) for role in roles))
    lines = [HEADER, f"# shares: {', '.join(f'{role} {shares.get(role, 0)}%' for role in roles)}",
             f"upstream {r.upstream} {{"]
    for role in roles:
        share, servers = shares.get(role, 0), r.servers[role]
        for addr in servers:
            if share > 0:
                lines.append(f"    server {addr} weight={share * scale // len(servers)} max_fails=0;  # {role}")
            else:
                lines.append(f"    server {addr} down;  # {role}")
    if not any(shares.get(role, 0) > 0 for role in roles):
        raise ApplicationError("nginx router: every role at 0 %: nothing would serve", type="BadInput",
                               non_retryable=True)
    lines += ["    keepalive 16;", "}", ""]
    return "\n".join(lines)


def parse(r: NginxRouter, text: str) -> dict[str, int]:
    """role -> percent from an upstream file's servers (ours or a person's): `down` servers and servers of no
    role count 0; a missing upstream block is an error naming the file."""
    block = re.search(r"upstream\s+" + re.escape(r.upstream) + r"\s*\{(.*?)\}", text, re.S)
    if block is None:
        raise ApplicationError(f"{r.upstream_file} has no upstream {r.upstream!r} block", type="RouterConfig",
                               non_retryable=True)
    role_of = {a: role for role, addrs in r.servers.items() for a in addrs}
    weights: dict[str, float] = {role: 0 for role in r.servers}
    for m in SERVER.finditer(block.group(1)):
        addr, opts = m.group(1), (m.group(2) or "")
        role = role_of.get(addr)
        if role is None or re.search(r"\bdown\b", opts):
            continue
        w = re.search(r"\bweight=(\d+)", opts)
        weights[role] += int(w.group(1)) if w else 1
    total = sum(weights.values())
    return {role: round(100 * w / total) if total else 0 for role, w in weights.items()}


def _run(cmd: list[str], r: NginxRouter, what: str) -> None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=r.timeout, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise ApplicationError(f"nginx router: {what}: {cmd[0]} not found on this worker's host", type="RouterConfig",
                               non_retryable=True) from None
    except subprocess.TimeoutExpired:
        raise ApplicationError(f"nginx router: {what} took longer than {r.timeout:.0f}s",
                               type="RouterTimeout") from None
    if done.returncode != 0:
        out = (done.stderr or done.stdout).strip().splitlines()
        raise ApplicationError(f"nginx router: {what} ({' '.join(cmd)}) failed: {' / '.join(out[-3:])}",
                               type="RouterConfig", non_retryable=what.startswith("nginx -t"))


class NginxSplit:
    def __init__(self, router: NginxRouter):
        self.r = router
        self.path = Path(router.upstream_file)

    @property
    def name(self) -> str:
        return f"nginx upstream {self.r.upstream} in {self.r.upstream_file}"

    def read(self) -> str:
        try:
            return self.path.read_text()
        except FileNotFoundError:
            raise ApplicationError(f"nginx router: {self.r.upstream_file} does not exist on this worker's host",
                                   type="RouterConfig", non_retryable=True) from None

    def shares(self) -> dict[str, int]:
        return parse(self.r, self.read())

    def set(self, shares: dict[str, int]) -> dict[str, int]:
        old, new = self.read(), render(self.r, shares)
        if old != new:
            tmp = self.path.with_name(f".{self.path.name}.opsflow-tmp")
            tmp.write_text(new)
            os.replace(tmp, self.path)
            try:
                _run(self.r.test, self.r, "nginx -t")
            except ApplicationError:
                tmp.write_text(old)
                os.replace(tmp, self.path)  # the old file back: the next reload (anyone's) keeps serving
                raise
            logger(log).info("%s: %s", self.name, new.splitlines()[1])
        _run(self.r.reload, self.r, "reload")
        return parse(self.r, new)
