"""What the worker tells Prometheus about its procedures, next to the SDK's own metrics (README "Running opsflow as
a team"), and the worker's health endpoints.

Where the figures come from, never from workflow code:
- a workflow interceptor (`MetricsInterceptor`) sees each procedure's report when its run ends on this worker (not on
  a replay): runs by outcome, duration, a failover's RTO and RPO, a drill's last success;
- a poller reads Temporal's visibility every `poll_seconds`: which procedures wait at a gate (`OpsStatus` =
  waiting; the gate and since when from the run's `progress` query), with the gate's timeout from the worker's rules;
- at start, the last successful drill and the last failover of each environment are read back from visibility
  (their results), so a restart does not reset the "last success" figures the alerts watch.

One HTTP endpoint serves it all (`--metrics-port`): `/metrics` is opsflow's registry followed by the SDK's (the
SDK's exporter listens on an internal loopback port), `/healthz` answers while the process runs, `/readyz` once
Temporal lists this worker as a poller of every task queue it serves.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from temporalio import activity, workflow
from temporalio.exceptions import ApplicationError
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    ExecuteWorkflowInput,
    Interceptor,
    WorkflowInboundInterceptor,
    WorkflowInterceptorClassInput,
)

from opsflow.contracts.maintenance import WATCH_METRICS

log = logging.getLogger("opsflow.metrics")
WATCH_ACTIVITY = WATCH_METRICS.name  # the metric watch after a maintenance

# Procedures last from seconds (a refused start) to hours (a maintenance window, a failback's rebuild).
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400)


class OpsMetrics:
    """opsflow's own metrics, in a registry of their own (the SDK's are its exporter's)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.runs = Counter(
            "opsflow_procedure_runs",
            "Procedures that ended on this worker, by outcome (report status)",
            ["procedure", "environment", "outcome"],
            registry=r,
        )
        self.duration = Histogram("opsflow_procedure_duration_seconds", "A procedure's duration, start to end",
                                  ["procedure", "environment"], buckets=DURATION_BUCKETS, registry=r)
        self.rto = Gauge("opsflow_failover_rto_seconds", "The last failover's RTO (approval, or an emergency's start, "
                         "until promotion and traffic switch)", ["environment"], registry=r)
        self.rpo = Gauge("opsflow_failover_rpo_bytes", "The last failover's RPO in WAL bytes (planned: 0, proven)",
                         ["environment"], registry=r)
        self.failover_end = Gauge("opsflow_failover_last_timestamp_seconds", "When the last failover ended",
                                  ["environment", "outcome"], registry=r)
        self.drill_success = Gauge("opsflow_drill_last_success_timestamp_seconds",
                                   "When the last successful restore drill ended", ["environment"], registry=r)
        self.gate_waiting = Gauge("opsflow_gate_waiting", "1 while a procedure waits at this gate",
                                  ["procedure", "environment", "gate"], registry=r)
        self.gate_seconds = Gauge("opsflow_gate_waiting_seconds", "How long the gate has been waiting",
                                  ["procedure", "environment", "gate"], registry=r)
        self.gate_timeout = Gauge("opsflow_gate_timeout_seconds", "The gate's approval timeout (the worker's rules)",
                                  ["procedure", "environment", "gate"], registry=r)
        self.watch_breaches = Counter("opsflow_maintenance_watch_breaches", "Metric watches after a maintenance that "
                                      "ended on a breached limit", ["environment", "query"], registry=r)
        self.readiness = Gauge("opsflow_readiness_ok", "1 when the last readiness check found the region ready to "
                               "fail over to or from (its own checks and the environment's all passed)",
                               ["environment", "region"], registry=r)
        self.environment = Gauge("opsflow_environment_info", "1 for each environment whose rules this worker holds",
                                 ["environment"], registry=r)
        self.worker_ready = Gauge("opsflow_worker_queue_polling", "1 while Temporal lists this worker as a poller "
                                  "of the task queue", ["queue"], registry=r)
        self._lock = threading.Lock()
        self._gates: set[tuple[str, str, str]] = set()

    def serve(self, environments: list[str], procedures: list[str]) -> None:
        """The environments this worker holds; their failure counters start at 0 (so an alert sees the first)."""
        for env in environments:
            self.environment.labels(env).set(1)
            for procedure in procedures:
                self.runs.labels(procedure, env, "failed")

    # -- a procedure's end --------------------------------------------------------------------------------------

    def record_end(self, report: Any) -> None:
        """Count a run from its report (a ProcedureReport, or its dict)."""
        r = report if isinstance(report, dict) else report.model_dump(mode="json")
        procedure, env, status = r.get("procedure") or "", r.get("environment") or "", r.get("status") or "unknown"
        if not procedure or not env:
            return
        self.runs.labels(procedure, env, status).inc()
        started, ended = _ts(r.get("started_at")), _ts(r.get("ended_at"))
        if started is not None and ended is not None and not r.get("dry_run"):
            self.duration.labels(procedure, env).observe(max(0.0, ended - started))
        self.record_last(r)

    def record_last(self, r: dict) -> None:
        """The 'last run' gauges from a report (at a run's end, and from visibility at start)."""
        procedure, env, status, ended = (
            r.get("procedure"),
            r.get("environment") or "",
            r.get("status"),
            r.get("ended_at"),
        )
        if r.get("dry_run") or status == "planned":
            return
        if procedure == "failover":
            if r.get("rto_seconds") is not None:
                self.rto.labels(env).set(r["rto_seconds"])
            if r.get("rpo_bytes") is not None:
                self.rpo.labels(env).set(r["rpo_bytes"])
            if _ts(ended) is not None and status in ("succeeded", "failed", "aborted"):
                self.failover_end.labels(env, status).set(_ts(ended))
        if procedure == "readiness" and status in ("succeeded", "failed"):
            checks = r.get("checks") or []
            everywhere = all(c.get("ok") for c in checks if not c.get("region"))
            for region in {c["region"] for c in checks if c.get("region")}:
                ok = everywhere and all(c.get("ok") for c in checks if c.get("region") == region)
                self.readiness.labels(env, region).set(1 if ok else 0)
        if procedure == "drill" and status == "succeeded" and _ts(ended) is not None:
            child = self.drill_success.labels(env)
            child.set(max(child._value.get(), _ts(ended)))  # never backwards (a read-back racing a run's end)

    def record_watch(self, task_queue: str, result: Any) -> None:
        """A maintenance watch's result: each breached query (the environment is the one whose workflow queue it ran
        on, by the worker's rules)."""
        from activities.rules import RULEBOOK

        r = result if isinstance(result, dict) else result.model_dump(mode="json")
        env = next((e for e in RULEBOOK.environments() if (inv := RULEBOOK.get(e)) and inv.task_queue == task_queue),
                   task_queue)
        for q in r.get("results") or []:
            if q.get("breached"):
                self.watch_breaches.labels(env, q.get("name") or "").inc()

    # -- gates -------------------------------------------------------------------------------------------------

    def set_gates(self, waiting: list[tuple[str, str, str, float, float | None]]) -> None:
        """The gates waiting now: (procedure, environment, gate, seconds waited, timeout); others drop out."""
        with self._lock:
            now = set()
            for procedure, env, gate, seconds, timeout in waiting:
                key = (procedure, env, gate)
                now.add(key)
                self.gate_waiting.labels(*key).set(1)
                self.gate_seconds.labels(*key).set(seconds)
                if timeout is not None:
                    self.gate_timeout.labels(*key).set(timeout)
            for key in self._gates - now:
                for g in (self.gate_waiting, self.gate_seconds, self.gate_timeout):
                    try:
                        g.remove(*key)
                    except KeyError:
                        pass
            self._gates = now


def _ts(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.timestamp()


# -- the workflow interceptor ---------------------------------------------------------------------------------

class MetricsInterceptor(Interceptor):
    """Counts each procedure when its run ends on this worker. Runs in the workflow sandbox but touches only this
    module's registry (imported outside it), and only when not replaying: a replayed end was counted when it
    happened (at least once: a worker killed between the end and its report to the server counts it again)."""

    def __init__(self, metrics: OpsMetrics, skip_types: frozenset[str] = frozenset()) -> None:
        self.metrics = metrics
        self.skip_types = skip_types

    def workflow_interceptor_class(self, input: WorkflowInterceptorClassInput) -> type[WorkflowInboundInterceptor]:
        metrics, skip = self.metrics, self.skip_types

        class Inbound(WorkflowInboundInterceptor):
            async def execute_workflow(self, input: ExecuteWorkflowInput) -> Any:
                try:
                    result = await super().execute_workflow(input)
                except ApplicationError as err:
                    _count(err.details[0] if err.details else None)
                    raise
                _count(result)
                return result

        def _count(report: Any) -> None:
            if workflow.info().workflow_type in skip or workflow.unsafe.is_replaying():
                return
            if report is None or not (isinstance(report, dict) or hasattr(report, "model_dump")):
                return
            try:
                metrics.record_end(report)
            except Exception:  # a metric must never fail a procedure
                log.exception("recording a procedure's end")

        return Inbound

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        metrics = self.metrics

        class Watched(ActivityInboundInterceptor):
            async def execute_activity(self, input: ExecuteActivityInput) -> Any:
                result = await super().execute_activity(input)
                if activity.info().activity_type == WATCH_ACTIVITY:
                    try:
                        metrics.record_watch(activity.info().task_queue, result)
                    except Exception:
                        log.exception("recording a maintenance watch")
                return result

        return Watched(next)


# -- visibility: gates now, and the last figures at start ----------------------------------------------------

async def gates_waiting(client, environments: set[str]) -> list[tuple[str, str, str, float, float | None]]:
    """Procedures of these environments waiting at a gate: (procedure, environment, gate, seconds, timeout)."""
    from activities.rules import RULEBOOK
    from opsflow.temporal import OPS_ENVIRONMENT, OPS_PROCEDURE

    found = []
    now = time.time()
    async for wf in client.list_workflows("ExecutionStatus = 'Running' AND OpsStatus = 'waiting'"):
        sa = wf.typed_search_attributes
        env, procedure = sa.get(OPS_ENVIRONMENT), sa.get(OPS_PROCEDURE) or wf.workflow_type
        if env not in environments:
            continue
        try:
            report = await client.get_workflow_handle(wf.id, run_id=wf.run_id).query(
                "progress", result_type=dict, rpc_timeout=_rpc(3))
        except Exception as e:  # no worker answers right now: the next poll tries again
            log.debug("progress of %s: %s", wf.id, e)
            continue
        step = next(
            (s for s in reversed(report.get("steps") or []) if s.get("name") == report.get("current_step")), None
        )
        if report.get("status") != "waiting" or step is None or not str(step.get("title", "")).startswith("Approval"):
            continue
        since = _ts(step.get("started_at")) or now
        inv = RULEBOOK.get(env)
        timeout = None
        if inv is not None:
            policy = inv.approval
            if procedure in ("canary", "bluegreen") and getattr(inv, "rollout", None) is not None:
                policy = getattr(inv.rollout, "approval", None) or policy
            timeout = float(policy.timeout)
        found.append((procedure, env, step["name"], max(0.0, now - since), timeout))
    return found


def _rpc(seconds: float):
    from datetime import timedelta

    return timedelta(seconds=seconds)


async def read_back(client, metrics: OpsMetrics, environments: set[str], per_type: int = 50) -> None:
    """The last successful drill, the last failover and the last readiness check of each environment, from their
    results in visibility."""
    for wtype, need in (("drill", "drill"), ("failover", "failover"), ("readiness", "readiness")):
        left = set(environments)
        seen = 0
        async for wf in client.list_workflows(f"WorkflowType = '{wtype}' AND ExecutionStatus != 'Running'"):
            if not left or seen >= per_type:
                break
            seen += 1
            try:
                report = await _final_report(client, wf)
            except Exception as e:
                log.warning("reading back %s: %s", wf.id, e)
                continue
            env = (report or {}).get("environment")
            if env not in left or report.get("dry_run") or report.get("status") == "planned":
                continue
            if need == "drill" and report.get("status") != "succeeded":
                continue
            metrics.record_last(report)
            left.discard(env)


async def _final_report(client, wf) -> dict | None:
    from temporalio.client import WorkflowFailureError

    from opsflow.client import report_data_in_failure

    handle = client.get_workflow_handle(wf.id, run_id=wf.run_id, result_type=dict)
    try:
        return await handle.result(follow_runs=False, rpc_timeout=_rpc(5))
    except WorkflowFailureError as e:  # failed or cancelled: the report the kernel put in the failure
        return report_data_in_failure(e)


# -- the endpoint ------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Endpoint:
    """`/metrics` (opsflow's, then the SDK's), `/healthz`, `/readyz` on one port."""

    def __init__(self, metrics: OpsMetrics, address: str, port: int, sdk_port: int | None) -> None:
        self.metrics, self.sdk_port = metrics, sdk_port
        self.ready = False
        self.ready_detail = "starting"
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                path = self.path.split("?")[0]
                if path == "/metrics":
                    self._send(200, endpoint.exposition(), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._send(200, b"ok\n")
                elif path == "/readyz":
                    self._send(200 if endpoint.ready else 503, (endpoint.ready_detail + "\n").encode())
                else:
                    self._send(404, b"not found: /metrics, /healthz, /readyz\n")

            def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((address, port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="metrics-http", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def exposition(self) -> bytes:
        ours = generate_latest(self.metrics.registry)
        if not self.sdk_port:
            return ours
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.sdk_port}/metrics", timeout=5) as resp:
                sdk = resp.read()
        except OSError as e:
            log.warning("the SDK's metrics did not answer: %s", e)
            sdk = b""
        return ours + b"\n" + sdk


async def watch(client, metrics: OpsMetrics, endpoint: Endpoint | None, environments: set[str], queues: list[str],
                poll_seconds: float, serve_workflows: bool) -> None:
    """The worker's background loop: readiness (every queue lists this worker as a poller) and the gate gauges."""
    from temporalio.api.enums.v1 import TaskQueueType

    from activities.temporal_queues import queue_pollers

    if serve_workflows:
        try:
            await read_back(client, metrics, environments)
        except Exception as e:
            log.warning("reading back the last drills and failovers: %s", e)
    while True:
        if endpoint is not None:
            try:
                missing = []
                for q in queues:
                    kinds = (TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY, TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW)
                    polling = client.identity in await queue_pollers(client, q, kinds)
                    metrics.worker_ready.labels(q).set(1 if polling else 0)
                    if not polling:
                        missing.append(q)
                endpoint.ready = not missing
                endpoint.ready_detail = "ready" if not missing else f"not yet polling: {', '.join(missing)}"
            except Exception as e:
                endpoint.ready, endpoint.ready_detail = False, f"Temporal does not answer: {e}"
        if serve_workflows:
            try:
                metrics.set_gates(await gates_waiting(client, environments))
            except Exception as e:
                log.warning("reading the waiting gates: %s", e)
        await asyncio.sleep(poll_seconds if endpoint is None or endpoint.ready else min(poll_seconds, 2))
