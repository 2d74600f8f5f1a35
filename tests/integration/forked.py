"""The CLI and workers the lab tests start, forked from a process that has imported them already.

A fresh `python -m starters.cli` or `python -m worker.main` spends ~1–1.5 s of CPU importing temporalio, the
cloud SDKs and every activity and workflow module before it does anything; the lab tests start a few hundred of
them (a CLI call per command, a worker per kill in the crash suites), which was a third of `make test`'s CPU on two
cores. multiprocessing's forkserver imports them once per test process and forks each one from there: a separate
process with its own pid, environment, working directory, stdout and stderr, exit code, killable with SIGKILL,
running the same `main` a console script runs. (The entry points themselves run as real commands in the CLI's unit
tests and in test_client_lab, whose fleet worker is `python -m worker.main`.)"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

# What the fork server imports ahead: the CLI and the worker with every activity and workflow module, and more.
PRELOAD = ["tests.integration.forkserver_preload"]
_context = None


def _fork_context():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _run(module: str, argv: list[str], env: dict, cwd: str, stdout: str, stderr: str) -> None:
    """In the forked child: become `python -m module argv...` with this environment, directory and output files."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for path, fd in ((stdout, 1), (stderr, 2)):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(out, fd)
        os.close(out)
    sys.argv = [module, *argv]
    code = 1
    try:
        if module == "starters.cli":
            from starters.cli import main
        elif module == "worker.main":
            from worker.main import main
        else:
            raise ValueError(f"not a forkable entry point: {module}")
        code = main(argv)
    except SystemExit as e:  # argparse's usage errors, as the console script would exit
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - the child reports anything on its stderr, as an interpreter would
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        # As the console scripts do (starters.cli.entry): no interpreter shutdown, nor multiprocessing's own.
        os._exit(code if isinstance(code, int) else 1)


class Forked:
    """A forked process with the part of subprocess.Popen the tests use."""

    def __init__(
        self, module: str, argv: list[str], env: dict, cwd: Path | str, stdout: Path | str, stderr: Path | str
    ):
        self.args = [module, *argv]
        # terminated when pytest ends, if a test left it running
        self._proc = _fork_context().Process(
            target=_run, args=(module, list(argv), dict(env), str(cwd), str(stdout), str(stderr)), daemon=True
        )
        self._proc.start()
        self.pid = self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.exitcode

    def poll(self) -> int | None:
        return self._proc.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._proc.join(timeout)
        if self._proc.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._proc.exitcode

    def send_signal(self, sig: int) -> None:
        if self._proc.exitcode is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def start(module: str, argv: list[str], env: dict, cwd: Path | str, log: Path | str) -> Forked:
    """A long-running process (a worker), both its outputs to `log`."""
    return Forked(module, argv, env, cwd, log, log)


def run(module: str, argv: list[str], env: dict, cwd: Path | str, timeout: float) -> subprocess.CompletedProcess:
    """A command to its end, as subprocess.run(capture_output=True, text=True) runs it."""
    with tempfile.TemporaryDirectory(prefix="opsflow-forked-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        proc = Forked(module, argv, env, cwd, out, err)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            raise
        return subprocess.CompletedProcess(proc.args, code, out.read_text() if out.exists() else "",
                                           err.read_text() if err.exists() else "")
