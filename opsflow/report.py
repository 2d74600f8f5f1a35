"""Reports rendered for people: Markdown (files, tickets) and terminal lines."""

from __future__ import annotations

from opsflow.models import DrillReport, FailoverReport, ProcedureReport

MARK = {"ok": "✓", "failed": "✗", "running": "…", "skipped": "-", "compensated": "↺", "planned": "•"}


def step_line(step) -> str:
    secs = f"{step.seconds:7.2f}s" if step.seconds is not None else "        "
    detail = f"  ({step.detail})" if step.detail else ""
    return f"  {MARK.get(step.outcome, '?')} {secs}  {step.title}{detail}"


def headline(r: ProcedureReport) -> str:
    extra = ""
    if isinstance(r, FailoverReport):
        kind = "emergency failover" if r.emergency else "planned failover"
        extra = f" {kind} {r.from_region or '?'} → {r.to_region}"
    return f"{r.procedure} {r.workflow_id}{extra}: {r.status}" + (f" — {r.failure}" if r.failure else "")


def figures(r: ProcedureReport) -> list[str]:
    out = []
    if r.approval:
        out.append(
            f"{'approved' if r.approval.approved else 'rejected'} by {r.approval.by} "
            f"at {r.approval.at:%Y-%m-%d %H:%M:%S}Z"
            + (f" ({r.approval.reason})" if r.approval.reason else "")
        )
    if isinstance(r, FailoverReport):
        if r.rto_seconds is not None:
            out.append(
                f"RTO {r.rto_seconds:.2f}s ({'start' if r.emergency and not r.approval else 'approval'} "
                "→ traffic moved and primary writable)"
            )
        if r.promotion_seconds is not None:
            out.append(f"promotion {r.promotion_seconds:.2f}s")
        if r.lag_at_promotion_bytes is not None:
            secs = f", {r.lag_at_promotion_seconds:.2f}s" if r.lag_at_promotion_seconds is not None else ""
            out.append(f"replication lag at promotion {r.lag_at_promotion_bytes} bytes{secs}")
        if r.rpo_bytes is not None:
            out.append(
                f"RPO {r.rpo_bytes} bytes of WAL"
                + (" (proven by LSN compare)" if r.rpo_proven else " (estimate: WAL not replayed)")
            )
    if isinstance(r, DrillReport):
        if r.restore_point:
            age = (
                f", {r.restore_point_age_seconds / 60:.0f} min old at the drill (the RPO the backups give)"
                if r.restore_point_age_seconds is not None
                else ""
            )
            out.append(f"restore point {r.restore_point:%Y-%m-%d %H:%M:%S}Z ({r.method} from {r.source_region}){age}")
        if r.restore_seconds is not None:
            out.append(f"restore took {r.restore_seconds:.1f}s into {r.scratch_name}")
        for c in r.checks:
            out.append(
                f"check {'passed' if c.ok else 'FAILED'}: {c.kind} {c.name}" + (f" — {c.detail}" if c.detail else "")
            )
        if r.scratch_deleted is not None:
            out.append(
                f"scratch target {r.scratch_name} "
                f"{'deleted' if r.scratch_deleted else 'NOT deleted: delete it by hand'}"
            )
    out += r.figure_lines() if hasattr(r, "figure_lines") else []  # a report model that renders its own figures
    for item in r.remaining:
        out.append(f"LEFT TO DO: {item}")
    return out


def to_text(r: ProcedureReport) -> str:
    return "\n".join([headline(r), *(step_line(s) for s in r.steps), *(f"  {f}" for f in figures(r))])


def to_markdown(r: ProcedureReport) -> str:
    lines = [f"# {r.procedure} `{r.workflow_id}` — {r.status}", ""]
    lines.append(
        f"- environment: `{r.environment}`; requested by {r.requester}" + (f" ({r.reason})" if r.reason else "")
    )
    if r.started_at:
        lines.append(
            f"- started {r.started_at:%Y-%m-%d %H:%M:%S}Z"
            + (f", ended {r.ended_at:%Y-%m-%d %H:%M:%S}Z" if r.ended_at else "")
        )
    if r.failure:
        lines.append(f"- **{r.status}:** {r.failure}")
    lines += [f"- {f}" for f in figures(r)]
    for e in r.events:
        lines.append(f"- {e.action} by {e.by} at {e.at:%H:%M:%S}Z" + (f": {e.reason}" if e.reason else ""))
    lines += ["", "| step | outcome | start | end | seconds | detail |", "| --- | --- | --- | --- | --- | --- |"]
    for s in r.steps:
        start = f"{s.started_at:%H:%M:%S}" if s.started_at else ""
        end = f"{s.ended_at:%H:%M:%S}" if s.ended_at else ""
        secs = f"{s.seconds:.2f}" if s.seconds is not None else ""
        lines.append(f"| {s.title} | {s.outcome} | {start} | {end} | {secs} | {s.detail.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


class ProgressLines:
    """Turns successive live reports into the lines a terminal should print next: each step once when it
    starts and once when it ends, and a line whenever what the procedure waits for changes."""

    def __init__(self) -> None:
        self.seen: dict[int, str] = {}
        self.last_wait: str | None = None

    def new_lines(self, report: ProcedureReport) -> list[str]:
        out = []
        for i, s in enumerate(report.steps):
            line = step_line(s)
            if self.seen.get(i) != line and (s.outcome != "running" or self.seen.get(i) is None):
                out.append(line)
                self.seen[i] = line
        if report.waiting_for and report.waiting_for != self.last_wait:
            out.append(f"  ⏸ waiting for {report.waiting_for}")
        self.last_wait = report.waiting_for
        return out
