"""A report to look at: one self-contained HTML file (inline CSS and SVG, no script, nothing fetched) for a
postmortem or a change board. Pure functions from a report model to a string, beside `opsflow/report.py` (text
and Markdown) whose figures it reuses.

- The step timeline as an SVG Gantt chart: a bar per step from `started_at` to `ended_at`, coloured by outcome;
  gates (people deciding) hatched, timed waits (the drain, a bake, a window) dotted; pauses as shaded bands;
  each decision and control event as a marker; what was left to do after a failure as rows of its own.
- The figures (RTO, RPO, the promotion, a drill's restore point, ...), the approvals and control events with
  their signatures' status (`opsflow/report_signatures.py`, what `opsflow verify-report` checks).
- A canary's or blue-green's analysis: per weight, each metric's canary mean against the baseline's (SVG).

Every text from a report goes through `html.escape`: reasons, details and names are typed by people.
"""

from __future__ import annotations

from datetime import datetime
from html import escape
from typing import Literal

from opsflow.models import (
    ControlEvent,
    Decision,
    DrillReport,
    FailbackReport,
    FailoverReport,
    ProcedureReport,
    StepRecord,
)
from opsflow.report import TREND_HEADER, figures, shown_detail, trend_row, trend_runs, trend_summary
from opsflow.report_signatures import ReportCheck
from opsflow.rollout_report import RolloutReport

StepKind = Literal["gate", "wait", "undo", "action"]

OUTCOME_COLOUR = {"ok": "#2e7d32", "failed": "#c62828", "running": "#1565c0", "skipped": "#9e9e9e",
                  "compensated": "#ef6c00", "planned": "#bdbdbd"}
CANARY, BASELINE = "#ef6c00", "#1565c0"
VERDICT_COLOUR = {"pass": "#2e7d32", "marginal": "#f9a825", "fail": "#c62828", "inconclusive": "#757575",
                  "high": "#c62828", "low": "#c62828", "breach": "#c62828"}

# Gantt geometry (px)
WIDTH, LABEL_W, RIGHT, ROW_H, BAR_H, TOP = 1100, 330, 24, 24, 14, 46


def e(value: object) -> str:
    """Escaped text (quotes too: the same text goes into attributes)."""
    return escape("" if value is None else str(value), quote=True)


def step_kind(report: ProcedureReport, step: StepRecord) -> StepKind:
    """What a step was, read from the report alone: a gate (people deciding: a gate id among the decisions,
    an approval or override step), a timed wait (the drain, a bake, waiting for a window), an undo, an action.
    The kernel records it (`StepRecord.kind`); reports recorded before it are read from names and titles."""
    if step.kind is not None and step.kind != "action":
        return step.kind
    gates = {d.gate for d in report.approvals} | {"approval"}
    if step.name in gates or step.title.startswith(("Approval", "Override needed")):
        return "gate"
    if step.name == "drain" or step.name.startswith("bake-") or step.title.startswith("Wait for the"):
        return "wait"
    if step.name.startswith("undo:") or step.outcome == "compensated":
        return "undo"
    return "action"


def _utc(at: datetime | None) -> str:
    return f"{at:%Y-%m-%d %H:%M:%S}Z" if at else ""


def _span(report: ProcedureReport) -> tuple[datetime | None, datetime | None]:
    """The chart's time range: the run's start to its end (a running one: the latest time it knows)."""
    times = [t for s in report.steps for t in (s.started_at, s.ended_at) if t]
    times += [d.at for d in report.approvals] + [ev.at for ev in report.events]
    if report.started_at:
        times.append(report.started_at)
    if report.ended_at:
        times.append(report.ended_at)
    if not times:
        return None, None
    return (report.started_at or min(times)), max(times)


def _tick_step(span: float) -> float:
    for step in (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600,
                 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400):
        if span / step <= 10:
            return step
    return 86400 * max(1.0, round(span / 86400 / 10))


def _tick_label(seconds: float, step: float) -> str:
    if step < 1:
        return f"{seconds:.{max(0, len(f'{step:g}') - 2)}f}s"
    s = int(round(seconds))
    if step < 60 and s < 60:
        return f"{s}s"
    h, m, sec = s // 3600, s % 3600 // 60, s % 60
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def _pauses(events: list[ControlEvent], end: datetime) -> list[tuple[datetime, datetime, ControlEvent]]:
    """(from, to, the pause) for each pause, until its resume or the end of the chart."""
    out, open_pause = [], None
    for ev in sorted(events, key=lambda x: x.at):
        if ev.action == "pause" and open_pause is None:
            open_pause = ev
        elif ev.action in ("resume", "abort") and open_pause is not None:
            out.append((open_pause.at, ev.at, open_pause))
            open_pause = None
    if open_pause is not None:
        out.append((open_pause.at, end, open_pause))
    return out


def gantt_svg(report: ProcedureReport) -> str:
    """The step timeline: one row per step (and per item left to do), a time axis since the start."""
    t0, t1 = _span(report)
    rows = len(report.steps) + len(report.remaining)
    height = TOP + max(rows, 1) * ROW_H + 30
    x0, x1 = LABEL_W, WIDTH - RIGHT
    span = max((t1 - t0).total_seconds(), 0.001) if t0 and t1 else 1.0

    def x(at: datetime) -> float:
        return x0 + (x1 - x0) * min(max((at - t0).total_seconds() / span, 0.0), 1.0)

    out = [f'<svg class="gantt" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
           f'viewBox="0 0 {WIDTH} {height}" role="img" aria-label="step timeline of {e(report.workflow_id)}">',
           '<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
           'patternTransform="rotate(45)"><rect width="3" height="6" fill="#fff" fill-opacity="0.55"/></pattern>'
           '<pattern id="dots" width="5" height="5" patternUnits="userSpaceOnUse">'
           '<circle cx="2.5" cy="2.5" r="1.2" fill="#fff" fill-opacity="0.7"/></pattern></defs>']
    # the axis
    bottom = TOP + max(rows, 1) * ROW_H
    if t0:
        step = _tick_step(span)
        out.append(f'<text class="axis-title" x="{x0}" y="14">time since the start, {e(_utc(t0))}</text>')
        k = 0
        while k * step <= span * 1.0000001 and k <= 200:
            tx = x0 + (x1 - x0) * (k * step / span)
            out.append(f'<g class="tick"><line x1="{tx:.1f}" y1="{TOP - 8}" x2="{tx:.1f}" y2="{bottom}" '
                       f'stroke="#e0e0e0"/><text x="{tx:.1f}" y="{TOP - 12}" text-anchor="middle">'
                       f'{e(_tick_label(k * step, step))}</text></g>')
            k += 1
        # pauses: bands over every row
        for start, end, ev in _pauses(report.events, t1):
            px0, px1 = x(start), x(end)
            out.append(f'<rect class="pause" x="{px0:.1f}" y="{TOP - 4}" width="{max(px1 - px0, 2):.1f}" '
                       f'height="{bottom - TOP + 4}" fill="#fff59d" fill-opacity="0.6">'
                       f'<title>paused by {e(ev.by)} {e(_utc(start))}{": " + e(ev.reason) if ev.reason else ""}'
                       '</title></rect>')
    # the rows
    for i, s in enumerate(report.steps):
        y = TOP + i * ROW_H
        kind, colour = step_kind(report, s), OUTCOME_COLOUR.get(s.outcome, "#757575")
        label = s.title if len(s.title) <= 46 else s.title[:45] + "…"
        shown = shown_detail(s)
        tip = f"{s.title} — {s.outcome}" + (f", {s.seconds:.2f}s" if s.seconds is not None else "") + (
            f": {shown}" if shown else "")
        out.append(f'<g class="step kind-{kind} outcome-{e(s.outcome)}" data-step="{e(s.name)}" '
                   f'data-kind="{kind}" data-outcome="{e(s.outcome)}"><title>{e(tip)}</title>')
        out.append(f'<text class="label" x="{x0 - 8}" y="{y + ROW_H / 2 + 4:.1f}" text-anchor="end">'
                   f'{e(label)}</text>')
        if s.started_at and t0:
            end = s.ended_at or t1
            bx0, bx1 = x(s.started_at), x(end)
            w = max(bx1 - bx0, 2.0)
            by = y + (ROW_H - BAR_H) / 2
            dash = ' stroke-dasharray="4 2"' if s.ended_at is None else ""
            out.append(f'<rect class="bar" x="{bx0:.1f}" y="{by:.1f}" width="{w:.1f}" height="{BAR_H}" '
                       f'fill="{colour}" stroke="{colour}"{dash} rx="2"/>')
            if kind in ("gate", "wait"):
                out.append(f'<rect class="overlay" x="{bx0:.1f}" y="{by:.1f}" width="{w:.1f}" height="{BAR_H}" '
                           f'fill="url(#{"hatch" if kind == "gate" else "dots"})" rx="2"/>')
            secs = f"{s.seconds:.2f}s" if s.seconds is not None else s.outcome
            if w > 70:  # inside a long bar, else beside it
                tx, anchor, cls = bx0 + w - 4, "end", "secs inside"
            else:
                tx, anchor, cls = (bx0 + w + 4, "start", "secs") if bx0 + w + 60 < x1 else (bx0 - 4, "end", "secs")
            out.append(f'<text class="{cls}" x="{tx:.1f}" y="{by + BAR_H - 3:.1f}" text-anchor="{anchor}">'
                       f'{e(secs)}</text>')
        else:
            out.append(f'<text class="not-run" x="{x0 + 4}" y="{y + ROW_H / 2 + 4:.1f}">not run ({e(s.outcome)})'
                       '</text>')
        out.append("</g>")
    for j, item in enumerate(report.remaining):
        y = TOP + (len(report.steps) + j) * ROW_H
        label = item if len(item) <= 46 else item[:45] + "…"
        out.append(f'<g class="step remaining" data-kind="remaining"><title>left to do: {e(item)}</title>'
                   f'<text class="label" x="{x0 - 8}" y="{y + ROW_H / 2 + 4:.1f}" text-anchor="end">{e(label)}</text>'
                   f'<rect class="todo" x="{x0 + 2}" y="{y + (ROW_H - BAR_H) / 2:.1f}" width="{x1 - x0 - 4}" '
                   f'height="{BAR_H}" fill="none" stroke="#c62828" stroke-dasharray="6 3"/>'
                   f'<text class="not-run" x="{x0 + 10}" y="{y + ROW_H / 2 + 4:.1f}">LEFT TO DO</text></g>')
    # decisions and control events: markers on the time axis, their labels staggered so none hides another
    if t0:
        marks = [(d.at, "decision", ("✓ " if d.approved else "✗ ") + d.by, d.reason) for d in report.approvals]
        marks += [(ev.at, "event", f"{ev.action} {ev.by}", ev.reason) for ev in report.events]
        line_ends: list[float] = []
        for at, cls, text, reason in sorted(marks, key=lambda m: m[0]):
            mx = x(at)
            line = next((n for n, end in enumerate(line_ends) if mx + 3 > end), len(line_ends))
            if line == len(line_ends):
                line_ends.append(0.0)
            line_ends[line] = mx + 3 + 7 * len(text) + 8
            colour = "#6a1b9a" if cls == "decision" else "#37474f"
            out.append(f'<g class="marker {cls}"><title>{e(text)} {e(_utc(at))}{": " + e(reason) if reason else ""}'
                       f'</title><line x1="{mx:.1f}" y1="{TOP - 4}" x2="{mx:.1f}" y2="{bottom + 16 * line + 4}" '
                       f'stroke="{colour}" stroke-width="1.5" stroke-dasharray="3 2"/><text x="{mx + 3:.1f}" '
                       f'y="{bottom + 14 + 16 * line}" fill="{colour}">{e(text)}</text></g>')
        extra = 16 * max(len(line_ends) - 1, 0)
        if extra:
            out[0] = out[0].replace(f'height="{height}" viewBox="0 0 {WIDTH} {height}"',
                                    f'height="{height + extra}" viewBox="0 0 {WIDTH} {height + extra}"')
    out.append("</svg>")
    return "\n".join(out)


def legend() -> str:
    items = [f'<span class="swatch" style="background:{c}"></span>{o}' for o, c in OUTCOME_COLOUR.items()]
    items += ['<span class="swatch gate"></span>gate (people deciding)', '<span class="swatch wait"></span>timed wait',
              '<span class="swatch pause"></span>paused', '<span class="swatch mark"></span>decision / event']
    return '<p class="legend">' + " ".join(f"<span>{i}</span>" for i in items) + "</p>"


def _signature_cell(signature: str | None, check: ReportCheck | None) -> str:
    if not signature:
        required = check is not None and check.require_signed
        return f'<td class="sig {"bad" if required else "none"}">unsigned{" (required)" if required else ""}</td>'
    if check is None:
        return '<td class="sig unchecked">signed, not checked</td>'
    verdict = check.status_of(signature)
    if verdict is None:
        return '<td class="sig unchecked">signed, not checked</td>'
    good, why = verdict
    return '<td class="sig ok">✓ verified</td>' if good else f'<td class="sig bad">✗ does not verify: {e(why)}</td>'


def people_table(report: ProcedureReport, check: ReportCheck | None) -> str:
    rows = []
    decisions: list[Decision] = report.approvals or ([report.approval] if report.approval else [])
    for d in decisions:
        roles = f" ({', '.join(d.roles)})" if d.roles else ""
        verb = "approved" if d.approved else "rejected"
        rows.append((d.at, f'<tr class="decision"><td>{e(_utc(d.at))}</td><td>{verb}'
                     f' at gate {e(d.gate)}</td><td>{e(d.by)}{e(roles)}</td><td class="reason">{e(d.reason)}</td>'
                     f'{_signature_cell(d.signature, check)}</tr>'))
    for ev in report.events:
        rows.append((ev.at, f'<tr class="event"><td>{e(_utc(ev.at))}</td><td>{e(ev.action)}</td><td>{e(ev.by)}</td>'
                     f'<td class="reason">{e(ev.reason)}</td>{_signature_cell(ev.signature, check)}</tr>'))
    if not rows:
        return "<p>No approvals or control events.</p>"
    body = "\n".join(r for _, r in sorted(rows, key=lambda r: r[0]))
    return ('<table class="people"><thead><tr><th>at</th><th>what</th><th>who</th><th>reason</th><th>signature</th>'
            f"</tr></thead><tbody>\n{body}\n</tbody></table>")


def signatures_summary(report: ProcedureReport, check: ReportCheck | None, keys_from: str) -> str:
    if check is None:
        return f'<p class="sigsum unchecked">Signatures not checked{": " + e(keys_from) if keys_from else ""}.</p>'
    good = len(check.results) - len(check.bad)
    lines = [f"{good} of {len(check.results)} signatures verify"
             + (f"; {len(check.unsigned)} action(s) without a signature" if check.unsigned else "")
             + (f" (checked against {e(keys_from)})" if keys_from else "")]
    start = check.status_of(report.start_signature)
    if report.start_signature and start is not None:
        who = f"the Schedule by {report.scheduled_by}" if report.schedule_id else f"the start by {report.requester}"
        lines.append(f"{e(who)}: " + ("✓ verified" if start[0] else f"✗ does not verify: {e(start[1])}"))
    elif not report.start_signature:
        lines.append("the start is not signed")
    lines += [f"✗ {e(p)}" for p in check.problems]
    lines += [f"unsigned: {e(u)}" for u in check.unsigned]
    cls = "ok" if check.ok else "bad"
    return f'<ul class="sigsum {cls}">' + "".join(f"<li>{line}</li>" for line in lines) + "</ul>"


def headline_cards(report: ProcedureReport) -> str:
    cards: list[tuple[str, str]] = []
    if isinstance(report, FailoverReport):
        if report.rto_seconds is not None:
            cards.append(("RTO", f"{report.rto_seconds:.2f} s"))
        if report.rpo_bytes is not None:
            cards.append(("RPO", f"{report.rpo_bytes} bytes" + (" (proven)" if report.rpo_proven else " (estimate)")))
        if report.promotion_seconds is not None:
            cards.append(("promotion", f"{report.promotion_seconds:.2f} s"))
        if report.lag_at_promotion_bytes is not None:
            cards.append(("lag at promotion", f"{report.lag_at_promotion_bytes} bytes"))
    if isinstance(report, DrillReport):
        if report.restore_seconds is not None:
            cards.append(("restore", f"{report.restore_seconds:.1f} s"))
        if report.restore_point_age_seconds is not None:
            cards.append(("restore point age (RPO)", f"{report.restore_point_age_seconds / 60:.0f} min"))
        if report.checks:
            cards.append(("checks", f"{sum(c.ok for c in report.checks)} of {len(report.checks)} passed"))
    if isinstance(report, FailbackReport) and report.rebuild_method:
        took = f" in {report.rebuild_seconds:.1f} s" if report.rebuild_seconds is not None else ""
        cards.append(("rebuild", f"{report.rebuild_method}{took}"))
    if isinstance(report, RolloutReport) and report.image:
        was = f" (was {report.previous_image})" if report.previous_image else ""
        cards.append((report.strategy, report.image + was))
        if report.status == "succeeded" or report.rolled_back:
            result = f"rolled back: {report.rollback_reason or ''}" if report.rolled_back else "promoted"
            cards.append(("result", result))
    if report.started_at and report.ended_at:
        cards.append(("duration", f"{(report.ended_at - report.started_at).total_seconds():.1f} s"))
    if not cards:
        return ""
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="k">{e(k)}</div><div class="v">{e(v)}</div></div>' for k, v in cards) + "</div>"


def analysis_svg(report: RolloutReport) -> str:
    """Per metric, per analysed weight: the canary's mean beside the baseline's, the verdict underneath."""
    names: list[str] = []
    for a in report.analysis:
        for m in a.metrics:
            if m.name not in names:
                names.append(m.name)
    charts = []
    for name in names:
        points = [(a, m) for a in report.analysis for m in a.metrics if m.name == name]
        top = max([v for _, m in points for v in (m.canary, m.baseline) if v is not None] or [0.0]) or 1.0
        group_w, bar_w, h, base_y, left = 140, 40, 210, 170, 60
        width = left + group_w * len(points) + 20
        out = [f'<svg class="analysis" data-metric="{e(name)}" xmlns="http://www.w3.org/2000/svg" width="{width}" '
               f'height="{h}" viewBox="0 0 {width} {h}" role="img" aria-label="{e(name)}: canary against baseline">',
               f'<text class="chart-title" x="4" y="14">{e(name)}</text>',
               f'<line x1="{left - 4}" y1="{base_y}" x2="{width - 10}" y2="{base_y}" stroke="#9e9e9e"/>',
               f'<text class="ylab" x="{left - 8}" y="34" text-anchor="end">{top:.4g}</text>',
               f'<text class="ylab" x="{left - 8}" y="{base_y}" text-anchor="end">0</text>']
        for i, (a, m) in enumerate(points):
            gx = left + i * group_w
            pair = (("canary", m.canary, CANARY), ("baseline", m.baseline, BASELINE))
            for j, (who, value, colour) in enumerate(pair):
                bh = 0.0 if value is None else max((base_y - 30) * value / top, 0.0)
                bx = gx + 8 + j * (bar_w + 14)
                shown = "n/a" if value is None else f"{value:.4g}"
                out.append(f'<g class="bar {who}" data-weight="{a.weight}" data-kind="{e(a.kind)}">'
                           f'<title>{who} {e(name)} at {a.weight} %: {e(shown)}</title>'
                           f'<rect x="{bx}" y="{base_y - bh:.1f}" width="{bar_w}" height="{max(bh, 1):.1f}" '
                           f'fill="{colour}"/><text x="{bx + bar_w / 2}" y="{base_y - bh - 3:.1f}" '
                           f'text-anchor="middle" class="val">{e(shown)}</text></g>')
            verdict_colour = VERDICT_COLOUR.get(m.verdict, "#757575")
            where = f"{a.weight} %" + ("" if a.kind == "judge" else f" {a.kind}")
            out.append(f'<text class="xlab" x="{gx + 8 + bar_w + 7}" y="{base_y + 16}" text-anchor="middle">'
                       f'{e(where)}</text><text class="verdict" x="{gx + 8 + bar_w + 7}" y="{base_y + 32}" '
                       f'text-anchor="middle" fill="{verdict_colour}">{e(m.verdict)}'
                       f'<title>{e(m.reason)}</title></text>')
        out.append("</svg>")
        charts.append("\n".join(out))
    return "\n".join(charts)


def rollout_section(report: RolloutReport) -> str:
    if not report.analysis:
        return ""
    rows = "".join(
        f'<tr><td>{a.weight} %</td><td>{e(a.kind)}</td><td style="color:{VERDICT_COLOUR.get(a.verdict, "#000")}">'
        f'{e(a.verdict)}</td><td>{"" if a.score is None else f"{a.score:.1f}"}</td>'
        f'<td>{"" if a.canary_requests is None else f"{a.canary_requests:.0f}"} / '
        f'{"" if a.baseline_requests is None else f"{a.baseline_requests:.0f}"}</td>'
        f'<td class="reason">{e(a.reason)}</td></tr>' for a in report.analysis)
    return ('<section class="rollout"><h2>Analysis: canary against baseline</h2>'
            f'<p class="legend"><span><span class="swatch" style="background:{CANARY}"></span>canary</span> '
            f'<span><span class="swatch" style="background:{BASELINE}"></span>baseline</span></p>'
            f'<div class="charts">{analysis_svg(report)}</div>'
            '<table><thead><tr><th>weight</th><th>kind</th><th>verdict</th><th>score</th>'
            f'<th>requests canary / baseline</th><th>reason</th></tr></thead><tbody>{rows}</tbody></table></section>')


def trend_section(report: DrillReport) -> str:
    """The drills before this one (read back from their stored reports) and this one: the trend across runs."""
    runs = trend_runs(report)
    if not runs:
        return ""
    head = "".join(f"<th>{e(h)}</th>" for h in TREND_HEADER)
    rows = "".join(
        f'<tr class="{"this-run" if run.stored_at == "this run" else ""}">'
        + "".join(f'<td style="color:{OUTCOME_COLOUR.get("ok" if c == "succeeded" else c, "inherit")}">{e(c)}</td>'
                  if i == 1 else f"<td>{e(c)}</td>" for i, c in enumerate(trend_row(run)))
        + "</tr>" for run in runs)
    return (f'<section class="trend"><h2>Trend: the last {len(runs)} drills</h2><p>{e(trend_summary(runs))}</p>'
            f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></section>")


def steps_table(report: ProcedureReport) -> str:
    rows = "".join(
        f'<tr class="outcome-{e(s.outcome)}"><td>{e(s.title)}</td><td>{e(step_kind(report, s))}</td>'
        f'<td style="color:{OUTCOME_COLOUR.get(s.outcome, "#000")}">{e(s.outcome)}</td>'
        f'<td>{e(f"{s.started_at:%H:%M:%S.%f}"[:12] if s.started_at else "")}</td>'
        f'<td>{e(f"{s.ended_at:%H:%M:%S.%f}"[:12] if s.ended_at else "")}</td>'
        f'<td class="num">{"" if s.seconds is None else f"{s.seconds:.3f}"}</td>'
        f'<td class="reason">{e(shown_detail(s))}</td>'
        "</tr>" for s in report.steps)
    return ('<table class="steps"><thead><tr><th>step</th><th>kind</th><th>outcome</th><th>start (UTC)</th>'
            f'<th>end</th><th>seconds</th><th>detail</th></tr></thead><tbody>{rows}</tbody></table>')


def report_body(report: ProcedureReport, check: ReportCheck | None, keys_from: str = "", level: int = 1) -> str:
    """One procedure's sections (a failback's child failover is rendered inside it, one level down)."""
    h = f"h{level}"
    status_cls = "ok" if report.status == "succeeded" else ("bad" if report.status in ("failed", "aborted",
                                                                                          "refused") else "other")
    facts = [("environment", report.environment), ("requested by", report.requester), ("reason", report.reason),
             ("started", _utc(report.started_at)), ("ended", _utc(report.ended_at)), ("run", report.run_id),
             ("waiting for", report.waiting_for or ""), ("rules", report.rules_sha256 or "")]
    if report.dry_run:
        facts.append(("dry run", "yes: nothing was changed"))
    dl = "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in facts if v)
    out = [f'<section class="procedure" data-procedure="{e(report.procedure)}">',
           f'<{h}>{e(report.procedure)} <code>{e(report.workflow_id)}</code> '
           f'<span class="status {status_cls}">{e(report.status)}</span></{h}>']
    if report.failure:
        out.append(f'<p class="failure"><strong>{e(report.status)}:</strong> {e(report.failure)}</p>')
    out += [f"<dl>{dl}</dl>", headline_cards(report)]
    lines = figures(report)
    if lines:
        out.append('<h2>Figures</h2><ul class="figures">' + "".join(f"<li>{e(x)}</li>" for x in lines) + "</ul>")
    out += ["<h2>Timeline</h2>", legend(), f'<div class="chart">{gantt_svg(report)}</div>']
    if report.remaining:
        out.append('<h2>Left to do</h2><ul class="remaining">'
                   + "".join(f"<li>{e(x)}</li>" for x in report.remaining) + "</ul>")
    out += ["<h2>Approvals and control events</h2>", signatures_summary(report, check, keys_from),
            people_table(report, check)]
    if isinstance(report, RolloutReport):
        out.append(rollout_section(report))
    if isinstance(report, DrillReport):
        out.append(trend_section(report))
    out += ["<h2>Steps</h2>", steps_table(report)]
    if isinstance(report, FailbackReport) and report.failover is not None:
        out.append('<div class="child"><h2>The failover it ran</h2>'
                   f"{report_body(report.failover, check, keys_from, level=min(level + 1, 6))}</div>")
    out.append("</section>")
    return "\n".join(x for x in out if x)


STYLE = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#212121;max-width:1160px}
h1{font-size:22px;margin:0 0 8px} h2{font-size:17px;margin:22px 0 8px;border-bottom:1px solid #e0e0e0}
code{font-size:90%} .status{padding:2px 8px;border-radius:10px;color:#fff;font-size:14px;vertical-align:middle}
.status.ok{background:#2e7d32} .status.bad{background:#c62828} .status.other{background:#1565c0}
.failure{background:#ffebee;border-left:4px solid #c62828;padding:6px 10px}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 14px;margin:8px 0} dt{color:#616161}
dd{margin:0} .cards{display:flex;gap:12px;flex-wrap:wrap;margin:10px 0}
.card{border:1px solid #e0e0e0;border-radius:6px;padding:8px 14px;min-width:120px}
.card .k{color:#616161;font-size:12px;text-transform:uppercase} .card .v{font-size:20px;font-weight:600}
svg text{font:12px system-ui,sans-serif;fill:#212121} svg .secs,svg .val,svg .ylab{fill:#616161;font-size:11px}
svg .secs.inside{fill:#fff;font-weight:600;paint-order:stroke;stroke:rgba(0,0,0,.6);stroke-width:3px}
svg .not-run{fill:#9e9e9e;font-style:italic}
svg .axis-title,svg .chart-title{font-weight:600}
.legend span{margin-right:12px;white-space:nowrap}
.swatch{display:inline-block;width:14px;height:10px;margin-right:4px;vertical-align:middle;border-radius:2px}
.swatch.gate{background:repeating-linear-gradient(45deg,#2e7d32 0 3px,#a5d6a7 3px 6px)}
.swatch.wait{background:radial-gradient(circle,#c8e6c9 30%,#2e7d32 35%);background-size:5px 5px}
.swatch.pause{background:#fff59d} .swatch.mark{background:#6a1b9a;width:3px}
table{border-collapse:collapse;margin:6px 0;width:100%} th,td{border-bottom:1px solid #eee;padding:3px 8px;
text-align:left;vertical-align:top} th{background:#fafafa} td.num{text-align:right}
.reason{max-width:420px;overflow-wrap:anywhere} .sig.ok{color:#2e7d32} .sig.bad{color:#c62828;font-weight:600}
.sig.none,.sig.unchecked{color:#757575} ul.sigsum.bad{color:#c62828} ul.sigsum.ok{color:#2e7d32}
.charts{display:flex;flex-wrap:wrap;gap:16px} .child{margin-left:16px;border-left:3px solid #e0e0e0;padding-left:12px}
tr.this-run td{font-weight:600}
footer{margin-top:28px;color:#9e9e9e;font-size:12px}
"""


def to_html(report: ProcedureReport, check: ReportCheck | None = None, *, keys_from: str = "",
            generated_at: datetime | None = None) -> str:
    """The whole page: one file, nothing fetched, nothing run (no script). `check`: the report's signatures
    checked (opsflow/report_signatures.py), `keys_from` says against which keys (or why they were not)."""
    title = f"{report.procedure} {report.workflow_id} — {report.status}"
    made = f" on {_utc(generated_at)}" if generated_at else ""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{e(title)}</title><style>{STYLE}</style></head><body>\n"
            f"{report_body(report, check, keys_from)}\n"
            f"<footer>opsflow report{e(made)}: `opsflow report {e(report.workflow_id)} --json` holds every figure;"
            " `opsflow verify-report` re-checks the signatures.</footer>\n</body></html>\n")
