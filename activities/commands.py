"""A program run by an activity: bounded in time, heartbeating while it runs, killed when the activity is cancelled.

One place for it: the self-managed database's host commands (pg_ctl, pg_controldata, tar) and a host workload's
start/check/stop commands run through it. The output goes to a temporary file, not a pipe, so a long one (pg_waldump's)
never blocks the program.
"""

from __future__ import annotations

import subprocess
import tempfile
import time

from temporalio.exceptions import ApplicationError

from activities.context import heartbeat, sleep_or_cancelled


def run_bounded(cmd: list[str], what: str, timeout: float, *, env: dict[str, str],
                input: str | None = None, poll: float = 0.05) -> subprocess.CompletedProcess:
    """Run `cmd` (stdout and stderr together, as text) within `timeout` seconds, heartbeating `what`. `input` (small:
    a configuration file's lines) is written to its stdin. Cannot start: non-retryable HostCommandFailed; no answer in
    time: HostCommandTimeout (the program killed); cancelled: the program killed, the cancellation raised."""
    with tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace") as out:
        try:
            p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL if input is None else subprocess.PIPE, stdout=out,
                                 stderr=subprocess.STDOUT, text=True, cwd="/", env=env)
        except OSError as e:
            raise ApplicationError(f"{what}: cannot run {cmd[0]}: {e.strerror}", type="HostCommandFailed",
                                   non_retryable=True) from None
        if input is not None:
            assert p.stdin is not None
            try:
                p.stdin.write(input)
                p.stdin.close()
            except BrokenPipeError:
                pass
        deadline = time.monotonic() + timeout
        while p.poll() is None:
            if time.monotonic() > deadline:
                p.kill()
                p.wait()
                raise ApplicationError(f"{what}: no answer after {timeout:.0f}s", type="HostCommandTimeout")
            heartbeat(what)
            try:
                sleep_or_cancelled(poll)
            except BaseException:
                p.kill()
                p.wait()
                raise
        out.seek(0)
        return subprocess.CompletedProcess(cmd, p.returncode, out.read(), None)
