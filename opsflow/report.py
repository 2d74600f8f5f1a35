"""Reports rendered for people: Markdown (files, tickets) and terminal lines."""

from __future__ import annotations

from opsflow.models import DrillReport, DrillRun, FailoverReport, ProcedureReport

MARK = {"ok": "✓", "failed": "✗", "running": "…", "skipped": "-", "compensated": "↺", "planned": "•"}


def shown_detail(step) -> str:
    """A step's detail as shown beside its title: a dry run's planned step carries its title again in its detail
    (with the condition after it, "(when ...)"); shown once, the condition alone beside it."""
    detail = step.detail or ""
    if step.title and detail.startswith(step.title):
        detail = detail[len(step.title):].strip()
        if detail.startswith("(") and detail.endswith(")"):
            detail = detail[1:-1]
    return detail


def step_line(step) -> str:
    # a dry run's steps did not run: no seconds
    secs = f"{step.seconds:7.2f}s" if step.seconds is not None and step.outcome != "planned" else "        "
    shown = shown_detail(step)
    detail = f"  ({shown})" if shown else ""
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
        chosen = point_choice(r)
        if chosen:
            out.append(chosen)
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


def point_choice(r: DrillReport) -> str:
    """How the restore point was chosen, and the restorable window it was chosen in."""
    window = "the restorable window"
    if r.window_earliest and r.window_latest:
        window += f" {r.window_earliest:%Y-%m-%d %H:%M:%S}Z .. {r.window_latest:%Y-%m-%d %H:%M:%S}Z"
    how = {"random": f"restore point chosen at random within {window} (drill.restore_point: random)",
           "newest": f"restore point chosen: the newest of {window}",
           "given": f"restore point given by the requester, within {window}"}
    return how.get(r.restore_point_chosen or "", "")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400 * 3), ("h", 3600 * 3), ("min", 600)):
        if seconds >= size:
            return f"{seconds / (size / 3 if unit != 'min' else 60):.1f} {unit}"
    return f"{seconds:.1f} s"


TREND_HEADER = ("started (UTC)", "status", "restore time", "restore point age", "chosen", "newest point age (RPO)",
                "checks", "objectives")


def trend_row(run: DrillRun) -> tuple[str, ...]:
    objectives = ("met" if run.objectives_met else "MISSED " + ", ".join(run.missed)) \
        if run.objectives_met is not None else "-"
    started = f"{run.started_at:%Y-%m-%d %H:%M}" if run.started_at else "?"
    return (started + (" (this run)" if run.stored_at == "this run" else ""), run.status,
            _duration(run.restore_seconds), _duration(run.restore_point_age_seconds), run.restore_point_chosen or "-",
            _duration(run.latest_point_age_seconds), f"{run.checks_passed}/{run.checks}", objectives)


def trend_runs(r: DrillReport) -> list[DrillRun]:
    """The earlier drills read back, and this one last (once it has a restore)."""
    return [*r.trend, DrillRun.of(r, "this run")] if r.trend else []


def trend_summary(runs: list[DrillRun]) -> str:
    """One line over the runs: how many passed, the objectives, the restore time's median and worst."""
    if not runs:
        return "no drills stored yet"
    ok = sum(x.status == "succeeded" for x in runs)
    judged = [x for x in runs if x.objectives_met is not None]
    times = sorted(x.restore_seconds for x in runs if x.restore_seconds is not None)
    out = f"{ok} of {len(runs)} drill(s) succeeded"
    if judged:
        out += f"; objectives met in {sum(bool(x.objectives_met) for x in judged)} of {len(judged)}"
    if times:
        out += f"; restore time median {_duration(times[len(times) // 2])}, worst {_duration(times[-1])}"
    return out


def trend_text(runs: list[DrillRun]) -> str:
    rows = [TREND_HEADER, *(trend_row(x) for x in runs)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TREND_HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join([*lines, trend_summary(runs)])


def trend_markdown(r: DrillReport) -> list[str]:
    runs = trend_runs(r)
    if not runs:
        return []
    lines = ["", f"## Trend: the last {len(runs)} drills", "", trend_summary(runs), "",
             "| " + " | ".join(TREND_HEADER) + " |", "|" + " --- |" * len(TREND_HEADER)]
    lines += ["| " + " | ".join(trend_row(run)) + " |" for run in runs]
    return lines


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
        lines.append(f"| {s.title} | {s.outcome} | {start} | {end} | {secs} | {shown_detail(s).replace('|', '/')} |")
    if isinstance(r, DrillReport):
        lines += trend_markdown(r)
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
