"""The lab for integration tests: real PostgreSQL, the ARM and Kubernetes emulators, the Temporal dev server.

A fresh lab per test (a failover changes the world for good), without the lab's own worker: tests start
and kill worker processes themselves. The CLI runs in a process of its own, the way a person runs it, and so does
each worker (both forked from a process that imported them once: forked.py); waits poll the status in-process
(`Lab.status`), through the same library code."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from tests.helpers import eventually
from tests.integration import forked

ROOT = Path(__file__).resolve().parents[2]
# The Patroni labs' modules: Debian's patroni and etcd-server, which scripts/setup.sh installs.
NEEDS_PATRONI = pytest.mark.skipif(
    not (os.path.exists("/usr/bin/patroni") and os.path.exists("/usr/bin/etcd")),
    reason="Debian's patroni and etcd-server are not installed (scripts/setup.sh installs them)",
)
# Worker flags for tests that SIGKILL workers: a killed worker costs each procedure the sticky timeout at its next
# step (10 s by default), 1 s with these.
FAST_RESTART = ("--sticky-timeout", "1")


def fast_recovery(lab, **failover) -> str:
    """The lab's inventory with what a killed worker costs made short, for tests that kill workers: a long step's
    heartbeat timeout (5 s: it is retried after that; a failback's rebuild too), a decision a killed workflow worker
    held (the workflow task timeout, 1 s, the least: then another worker gets it). `failover`: more of the failover
    policy. Written into the lab's own inventory, the one its workers hold (they read it again when it changes):
    a procedure runs by its worker's rules, and a copy that differed would be refused. Returns its path."""
    import yaml

    inv = yaml.safe_load(open(lab.inventory))
    inv.setdefault("failover", {}).update({"heartbeat_timeout": "5s", **failover})
    inv.setdefault("failback", {})["rebuild_heartbeat_timeout"] = "5s"
    inv.setdefault("drill", {})["heartbeat_timeout"] = "5s"
    inv.setdefault("limits", {})["workflow_task_timeout"] = "1s"
    path = Path(lab.inventory)
    path.write_text(yaml.safe_dump(inv))
    return str(path)


@pytest.fixture
def lab_home(tmp_path, monkeypatch):
    # Isolate the "current lab" pointer from a lab the developer may have running.
    home = tmp_path / "home"
    monkeypatch.setenv("OPSFLOW_HOME", str(home))
    monkeypatch.delenv("TEMPORAL_ADDRESS", raising=False)
    return home


def lab_root() -> Path:
    """A lab directory outside pytest's tmp_path: every pytest session started as root chmods /tmp/pytest-of-root
    back to 0700, which locks the clusters' `postgres` OS user out of its configuration files mid-test (a reload
    then silently keeps the old settings: a fence that never takes effect)."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix="opsflow-lab-test-")) / "lab"


@pytest.fixture
def lab(lab_home):
    from lab.manage import up

    root = lab_root()
    state = up(root, with_worker=False, quiet=True, default_ports=False)
    lab = Lab(root, state)
    yield lab
    lab.stop_workers()  # a worker outliving its lab would poll the next lab's server on a reused port
    take_down(root)


def take_down(root: Path) -> None:
    import shutil

    from lab.manage import down

    keep = os.environ.get("OPSFLOW_TEST_KEEP_LOGS")  # a directory: each lab's logs copied there before it goes
    if keep and (root / "logs").is_dir():
        shutil.copytree(root / "logs", Path(keep) / root.parent.name, dirs_exist_ok=True)
    down(root, quiet=True)
    shutil.rmtree(root.parent, ignore_errors=True)


class Lab:
    def __init__(self, root: Path, state: dict):
        self.root = root
        self.state = state
        self.inventory = state["inventory"]
        self.workers: list[forked.Forked] = []
        self._status_loop: asyncio.AbstractEventLoop | None = None  # a thread's loop, holding one client
        self._client = None
        self._followers: dict[str, asyncio.Event] = {}  # workflow id -> set on each new history event (wait_change)
        self._follower_tasks: set[asyncio.Task] = set()

    def dsn(self, region: str) -> str:
        return self.state["regions"][region]["dsn"]

    def env(self) -> dict:
        from lab.manage import worker_env

        return {**os.environ, **worker_env(self.state), "PYTHONPATH": str(ROOT)}

    def cli(self, *args: str, check: bool = False, timeout: float = 300) -> subprocess.CompletedProcess:
        """`opsflow ARGS`, forked (tests/integration/forked.py) with the lab's environment."""
        proc = forked.run("starters.cli", list(args), self.env(), ROOT, timeout)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"opsflow {' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc

    def cli_json(self, *args: str) -> dict:
        return json.loads(self.cli(*args, "--json", check=True).stdout)

    def start_worker(self, *flags: str) -> forked.Forked:
        log = self.root / f"worker-{len(self.workers)}.log"
        proc = forked.start("worker.main", ["--env", self.inventory, *flags], self.env(), ROOT, log)
        self.workers.append(proc)
        return proc

    def kill_worker(self, proc: forked.Forked) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def _run(self, coro, timeout: float):
        """Run a coroutine on this lab's own event loop (a thread holding one Temporal client)."""
        if self._status_loop is None:
            self._status_loop = asyncio.new_event_loop()
            threading.Thread(target=self._status_loop.run_forever, daemon=True).start()
        return asyncio.run_coroutine_threadsafe(coro, self._status_loop).result(timeout=timeout)

    async def _connect(self):
        import dataclasses

        from temporalio.client import Client

        from opsflow.codec import codec_from_env
        from opsflow.temporal import DATA_CONVERTER

        if self._client is None:
            codec = codec_from_env(self.env())  # an encrypted lab's key file, as its CLI finds it
            converter = dataclasses.replace(DATA_CONVERTER, payload_codec=codec) if codec else DATA_CONVERTER
            self._client = await Client.connect(self.state["temporal"]["address"], data_converter=converter)
        return self._client

    def status(self, wid: str, missing_ok: bool = False) -> dict | None:
        """What `opsflow status WID --json` prints, read in this process with the CLI's own `describe_status`: a
        test polling the CLI as a subprocess spent ~0.5 s of CPU a poll, most of a core while it waited. No such
        procedure: None with `missing_ok`, else the CLI's ClientError."""
        return self._run(self._status(wid, missing_ok), timeout=60)

    async def _status(self, wid: str, missing_ok: bool) -> dict | None:
        from opsflow.client import ClientError, describe_status

        client = await self._connect()
        try:
            st = await describe_status(client, wid)
        except ClientError:
            if missing_ok:
                return None
            raise
        return json.loads(json.dumps(st.as_dict(), default=str))

    def wait_change(self, wid: str, timeout: float) -> None:
        """Until the procedure's history grows (every change of its status is a workflow task, an event), or
        `timeout`: a status read every 0.3 s through a long step cost the test, the server and the worker CPU."""
        self._run(self._wait_change(wid, timeout), timeout=timeout + 30)

    async def _wait_change(self, wid: str, timeout: float) -> None:
        if wid not in self._followers:
            changed = asyncio.Event()
            self._followers[wid] = changed

            async def follow() -> None:
                handle = (await self._connect()).get_workflow_handle(wid)
                try:
                    async for _ in handle.fetch_history_events(wait_new_event=True):
                        changed.set()
                finally:
                    self._followers.pop(wid, None)  # closed, or not found: the next wait starts over

            task = asyncio.get_running_loop().create_task(follow())
            self._follower_tasks.add(task)  # the loop keeps only a weak reference
            task.add_done_callback(self._follower_tasks.discard)
        changed = self._followers.get(wid)
        if changed is None:
            return
        try:
            await asyncio.wait_for(changed.wait(), timeout)
        except TimeoutError:
            pass
        changed.clear()

    def wait_closed(self, wid: str, timeout: float) -> bool:
        """Until the procedure's run closes, on a long poll for its close event: a status read every 0.3 s for the
        whole of a procedure cost the test, the server and the worker CPU. False if still open after `timeout`."""
        return self._run(self._wait_closed(wid, timeout), timeout=timeout + 30)

    async def _wait_closed(self, wid: str, timeout: float) -> bool:
        from temporalio.client import WorkflowHistoryEventFilterType

        handle = (await self._connect()).get_workflow_handle(wid)
        try:
            async with asyncio.timeout(timeout):
                async for _ in handle.fetch_history_events(
                    wait_new_event=True, event_filter_type=WorkflowHistoryEventFilterType.CLOSE_EVENT
                ):
                    return True
        except TimeoutError:
            return False
        return True

    def stop_workers(self) -> None:
        if self._status_loop is not None:
            self._status_loop.call_soon_threadsafe(self._status_loop.stop)
            self._status_loop, self._client = None, None
            self._followers.clear()
            self._follower_tasks.clear()
        for w in self.workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
                try:
                    w.wait(30)
                except subprocess.TimeoutExpired:
                    w.kill()


@pytest.fixture(scope="module")
def fake_aws_credentials():
    """boto3 against moto: fake credentials, and none of the developer's real AWS configuration."""
    from lab.aws_lab import FAKE_CREDENTIALS

    fake = {
        **FAKE_CREDENTIALS,
        "AWS_CONFIG_FILE": "/nonexistent/aws-config",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
    }
    saved = {k: os.environ.get(k) for k in [*fake, "AWS_PROFILE"]}
    os.environ.pop("AWS_PROFILE", None)
    os.environ.update(fake)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def aws_lab(tmp_path, lab_home, monkeypatch):
    from lab.aws_lab import worker_env
    from lab.manage import up

    for k, v in worker_env().items():
        monkeypatch.setenv(k, v)
    root = lab_root()
    state = up(root, with_worker=False, quiet=True, cloud="aws", default_ports=False)
    lab = Lab(root, state)
    yield lab
    lab.stop_workers()
    take_down(root)


@pytest.fixture
def worker(lab):
    proc = lab.start_worker()
    yield proc
    lab.stop_workers()


def explain(report: dict) -> str:
    """What a failed procedure's report says, whole (pytest cuts a dict short): its failure, what is left to do,
    each step's outcome."""
    return f"{report.get('failure')}; remaining {report.get('remaining')}; " + "; ".join(
        f"{s['name']}: {s['outcome']} {(s.get('detail') or '')[:300]}" for s in report.get("steps", []))


def wait_for(predicate, timeout: float = 60, interval: float = 0.2, what: str = "condition"):
    return eventually(predicate, timeout, what, interval=interval)


def printed_report(proc) -> dict:
    """The JSON report a `--wait --json` command printed after its progress lines; a command that printed none
    (it failed before the report) fails the test with its exit code and error output."""
    assert "{" in proc.stdout, f"no report printed (exit {proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(proc.stdout[proc.stdout.index("{"):])


@contextmanager
def module_lab(*, worker: bool = True, **flags) -> Iterator[Lab]:
    """A lab shared by one module's tests: `opsflow lab up` with `flags` (database="patroni", ...), an OPSFLOW_HOME
    of its own, and a worker unless `worker=False` (the crash kit brings its own two). Taken down afterwards, also
    when it came only half up."""
    from lab.manage import up

    root = lab_root()
    lab = None
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPSFLOW_HOME", str(root.parent / "home"))
        mp.delenv("TEMPORAL_ADDRESS", raising=False)
        try:
            lab = Lab(root, up(root, with_worker=False, quiet=True, default_ports=False, **flags))
            if worker:
                lab.start_worker()
            yield lab
        finally:
            if lab is not None:
                lab.stop_workers()
            take_down(root)
