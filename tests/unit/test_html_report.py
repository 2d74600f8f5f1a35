"""`opsflow report ID --html`: the renderer (opsflow/html_report.py) on real reports — the results recorded in
tests/workflow/histories (a planned failover with its gate, a pause and the drain; one aborted during the drain and
undone; a canary with its analysis) — with real SSH signatures, a hostile reason, and the page as a real headless
Chromium shows it (its DOM and a screenshot's pixels)."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import pytest

from opsflow.client import parse_report
from opsflow.html_report import OUTCOME_COLOUR, gantt_svg, step_kind, to_html
from opsflow.models import ControlEvent, FailoverReport, ProcedureReport
from opsflow.report_signatures import check_report
from opsflow.rollout_report import RolloutReport
from opsflow.signing import Keyring, Signer
from tests.helpers import ssh_key_pair

HISTORIES = Path(__file__).resolve().parents[1] / "workflow" / "histories"
SVG = "{http://www.w3.org/2000/svg}"
HOSTILE = '</td><script>alert("x")</script><img src=x onerror=alert(1)> & "quotes"'


def recorded(name: str) -> ProcedureReport:
    """The report a recorded run ended with: its result, or the report in its failure's details."""
    last = json.loads((HISTORIES / f"{name}.json").read_text())["events"][-1]
    done = last.get("workflowExecutionCompletedEventAttributes")
    payload = (done["result"] if done else
               last["workflowExecutionFailedEventAttributes"]["failure"]["applicationFailureInfo"]["details"])
    return parse_report(json.loads(base64.b64decode(payload["payloads"][0]["data"])))


def svg(text: str) -> ET.Element:
    return ET.fromstring(text)  # well-formed XML, or this raises


def steps_of(root: ET.Element) -> list[ET.Element]:
    return [g for g in root.iter(f"{SVG}g") if "step" in g.get("class", "").split()]


def bar(g: ET.Element) -> ET.Element:
    return next(r for r in g.iter(f"{SVG}rect") if r.get("class") == "bar")


def test_a_planned_failover_shows_its_gate_its_drain_and_its_pause_on_a_time_axis():
    report = recorded("failover_planned-worker-rules")
    assert isinstance(report, FailoverReport)
    root = svg(gantt_svg(report))
    rows = steps_of(root)
    assert [g.get("data-step") for g in rows] == [s.name for s in report.steps]
    kinds = {g.get("data-step"): g.get("data-kind") for g in rows}
    assert kinds["approval"] == "gate" and kinds["drain"] == "wait" and kinds["promote"] == "action"
    overlays = {g.get("data-step"): r.get("fill") for g in rows for r in g.iter(f"{SVG}rect")
                if r.get("class") == "overlay"}
    assert overlays == {"approval": "url(#hatch)", "drain": "url(#dots)"}  # only gates and waits look different
    assert {bar(g).get("fill") for g in rows} == {OUTCOME_COLOUR["ok"]}

    # Geometry: bars sit on one time scale (the drain's 60 s is nearly the whole run; catch-up starts at its end).
    x = {g.get("data-step"): (float(bar(g).get("x")), float(bar(g).get("width"))) for g in rows}
    run = (report.ended_at - report.started_at).total_seconds()
    drain = next(s for s in report.steps if s.name == "drain")
    chart = 1100 - 24 - 330
    assert x["drain"][1] == pytest.approx(chart * drain.seconds / run, abs=0.2)
    assert x["catch-up"][0] == pytest.approx(x["drain"][0] + x["drain"][1], abs=0.2)
    assert x["preflight"][0] == pytest.approx(330 + chart * 0.038 / run, abs=0.2)  # started 38 ms after the run
    ticks = [t.text for g in root.iter(f"{SVG}g") if g.get("class") == "tick" for t in g.iter(f"{SVG}text")]
    assert ticks[0] == "0s" and "1:00" in ticks  # a time axis in minutes:seconds for a one-minute run

    pauses = [r for r in root.iter(f"{SVG}rect") if r.get("class") == "pause"]
    assert len(pauses) == 1 and "paused by alice" in pauses[0].find(f"{SVG}title").text
    markers = [" ".join(t.text for t in g.iter(f"{SVG}text")) for g in root.iter(f"{SVG}g")
               if "marker" in g.get("class", "")]
    assert markers == ["pause alice", "✓ bob", "resume alice"]  # in time order

    page = to_html(report)
    assert "<script" not in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert '<div class="k">RTO</div><div class="v">60.54 s</div>' in page
    assert '<div class="k">RPO</div><div class="v">0 bytes (proven)</div>' in page
    assert "RPO 0 bytes of WAL (proven by LSN compare)" in page  # the figures of opsflow/report.py
    assert "Signatures not checked" in page


def test_an_aborted_failover_shows_the_failed_drain_and_what_was_undone():
    report = recorded("failover_cancelled-worker-rules")
    assert report.status == "aborted"
    rows = {g.get("data-step"): g for g in steps_of(svg(gantt_svg(report)))}
    assert rows["drain"].get("data-outcome") == "failed" and bar(rows["drain"]).get("fill") == OUTCOME_COLOUR["failed"]
    undone = [name for name, g in rows.items() if g.get("data-kind") == "undo"]
    assert undone == ["undo:db.unfence", "undo:k8s.set_maintenance"]
    assert all(bar(rows[n]).get("fill") == OUTCOME_COLOUR["compensated"] for n in undone)
    page = to_html(report)
    assert '<p class="failure"><strong>aborted:</strong> aborted by temporal: cancelled through Temporal' in page
    assert '<span class="status bad">aborted</span>' in page


def test_a_failure_past_the_promotion_lists_what_is_left_to_do():
    """The recorded failover made to fail at its scale-up, past the promotion: the failed step, then what a person
    must still do (tests/workflow/test_html_report_workflow.py renders the report such a run really ends with)."""
    report = recorded("failover_planned-worker-rules").model_copy(deep=True)
    scale = next(s for s in report.steps if s.name == "scale-up")
    scale.outcome, scale.detail = "failed", "quota exceeded"
    report.steps = report.steps[: report.steps.index(scale) + 1]
    report.status, report.failure = "failed", "scale up in westeurope: quota exceeded"
    report.remaining = ["scale up in westeurope", "notify"]
    root = svg(gantt_svg(report))
    todo = [g for g in steps_of(root) if g.get("data-kind") == "remaining"]
    assert [g.find(f"{SVG}title").text for g in todo] == ["left to do: scale up in westeurope", "left to do: notify"]
    assert bar([g for g in steps_of(root) if g.get("data-step") == "scale-up"][0]).get("fill") == "#c62828"
    page = to_html(report)
    assert '<h2>Left to do</h2><ul class="remaining"><li>scale up in westeurope</li><li>notify</li></ul>' in page


def test_planned_steps_of_a_dry_run_have_no_bar():
    report = recorded("failover_planned-worker-rules").model_copy(deep=True)
    for s in report.steps:
        s.outcome, s.started_at, s.ended_at = "planned", None, None
    report.dry_run, report.started_at, report.ended_at = True, None, None
    report.approval, report.approvals, report.events = None, [], []
    root = svg(gantt_svg(report))
    assert len(steps_of(root)) == len(report.steps)
    assert not [r for r in root.iter(f"{SVG}rect") if r.get("class") == "bar"]
    assert "dry run" in to_html(report)


def test_a_canary_charts_each_metric_canary_against_baseline_per_weight():
    report = recorded("canary_worker-rules")
    assert isinstance(report, RolloutReport) and [a.weight for a in report.analysis] == [5, 25, 50]
    page = to_html(report)
    charts = [svg(m.group(0)) for m in re.finditer(r'<svg class="analysis".*?</svg>', page, re.S)]
    metrics = [m.name for m in report.analysis[0].metrics]
    assert [c.get("data-metric") for c in charts] == metrics
    p95 = charts[metrics.index("p95-latency")]
    bars = [(g.get("class"), g.get("data-weight"), float(g.find(f"{SVG}rect").get("height")))
            for g in p95.iter(f"{SVG}g")]
    assert [(c, w) for c, w, _ in bars] == [("bar canary", "5"), ("bar baseline", "5"), ("bar canary", "25"),
                                            ("bar baseline", "25"), ("bar canary", "50"), ("bar baseline", "50")]
    first = report.analysis[0].metrics[metrics.index("p95-latency")]
    assert bars[0][2] / bars[1][2] == pytest.approx(first.canary / first.baseline, rel=1e-3)  # heights to scale
    verdicts = [t.text for t in p95.iter(f"{SVG}text") if t.get("class") == "verdict"]
    assert verdicts == ["pass", "pass", "pass"]
    # the bakes are timed waits, the judges actions, the approval (two people, one per role) a gate
    kinds = {s.name: step_kind(report, s) for s in report.steps}
    assert kinds["bake-5"] == kinds["bake-50"] == "wait" and kinds["judge-5"] == "action"
    assert kinds["approval"] == "gate"
    assert "carol (platform-lead)" in page and "dave (qa)" in page
    assert '<div class="k">canary</div><div class="v">registry/shop:1.1 (was registry/shop:1.0)</div>' in page


def test_every_text_a_person_typed_is_escaped():
    report = recorded("failover_planned-worker-rules").model_copy(deep=True)
    report.reason = HOSTILE
    report.approvals[0].reason = HOSTILE
    report.approval = report.approvals[0]
    report.events.append(ControlEvent(action="abort", by="mallory<b>", at=report.ended_at, reason=HOSTILE))
    report.steps[0].title = HOSTILE
    report.steps[0].detail = HOSTILE
    report.remaining = [HOSTILE]
    page = to_html(report)
    assert "<script" not in page and "<img" not in page and "<b>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page and "&amp; &quot;quotes&quot;" in page
    svg(gantt_svg(report))  # still well-formed: a hostile title cannot break out of its element


def test_signatures_show_whether_they_verify(tmp_path):
    """Real SSH signatures: bob's approval verifies; alice's pause, doctored after signing, does not; resume is
    unsigned where signatures are required."""
    report = recorded("failover_planned-worker-rules").model_copy(deep=True)
    keys = {}
    for name in ("alice", "bob"):
        path, pub = ssh_key_pair(tmp_path, name)
        keys[name] = (Signer(name=name, key_path=path), pub)
    decision = report.approvals[0]
    signed = keys["bob"][0].sign_request(workflow_id=report.workflow_id, run_id=report.run_id, gate_id="approval",
                                         action="approve", reason=decision.reason, at=decision.at)
    decision.signature, decision.signed_at = signed["signature"], signed["signed_at"]
    report.approval = decision
    pause = report.events[0]
    signed = keys["alice"][0].sign_request(workflow_id=report.workflow_id, run_id=report.run_id, gate_id=None,
                                           action="pause", reason="", at=pause.at)
    pause.signature, pause.signed_at, pause.reason = signed["signature"], signed["signed_at"], "doctored"
    keyring = Keyring(keys={n: pub for n, (_, pub) in keys.items()}, require_signed=True)
    check = check_report(json.loads(report.model_dump_json()), keyring)  # what `opsflow verify-report` checks
    assert len(check.results) == 2 and len(check.bad) == 1 and not check.ok

    page = to_html(report, check, keys_from="prod.yaml")
    rows = {m.group(1): m.group(2) for m in re.finditer(r"<tr class=\"(?:decision|event)\"><td>[^<]*</td><td>([^<]*)"
                                                        r"</td>.*?<td class=\"sig[^\"]*\">([^<]*)</td></tr>", page)}
    assert rows["approved at gate approval"] == "✓ verified"
    assert rows["pause"].startswith("✗ does not verify")
    assert rows["resume"] == "unsigned (required)"
    assert "1 of 2 signatures verify; 1 action(s) without a signature (checked against prod.yaml)" in page
    assert "✗ the start is not signed (this environment requires it)" in page


# -- the page in a real browser ---------------------------------------------------------------------------

def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        if os.environ.get("OPSFLOW_SKIP_CHROMIUM"):
            pytest.skip("OPSFLOW_SKIP_CHROMIUM is set and chromium is missing")
        pytest.fail("chromium is missing: Debian's chromium package (scripts/setup.sh installs it); "
                    "set OPSFLOW_SKIP_CHROMIUM=1 to skip this test knowingly")
    return found


def test_a_missing_chromium_fails_the_suite_unless_skipped_knowingly(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("OPSFLOW_SKIP_CHROMIUM", raising=False)
    with pytest.raises(pytest.fail.Exception, match="chromium is missing"):
        chromium()
    monkeypatch.setenv("OPSFLOW_SKIP_CHROMIUM", "1")
    with pytest.raises(pytest.skip.Exception):
        chromium()


def test_a_drill_and_a_failback_show_their_own_figures():
    drill, failback = recorded("drill-worker-rules"), recorded("failback-worker-rules")
    page = to_html(drill)
    assert drill.restore_seconds is not None and drill.checks
    assert f'<div class="k">restore</div><div class="v">{drill.restore_seconds:.1f} s</div>' in page
    n = len(drill.checks)
    assert f'<div class="k">checks</div><div class="v">{sum(c.ok for c in drill.checks)} of {n} passed</div>' in page
    page = to_html(failback)
    assert '<div class="k">rebuild</div><div class="v">pg_rewind in ' in page
    assert page.count('<svg class="gantt"') == 2 and "The failover it ran" in page  # the child failover's too


def headless(tmp_path: Path, *args: str) -> str:
    cmd = [chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--disable-extensions",
           f"--user-data-dir={tmp_path / 'profile'}", "--disable-dev-shm-usage", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def png_pixels(path: Path) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB(A) bytes) of an 8-bit RGB/RGBA PNG: enough to count a colour's pixels."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, colour = header[:4]
    assert depth == 8 and colour in (2, 6)
    bpp = 3 if colour == 2 else 4
    raw, stride, rows, prev = zlib.decompress(idat), width * bpp, [], bytearray(width * bpp)
    for y in range(height):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], (prev[i - bpp] if i >= bpp else 0)
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, height, [bytes(r[i] for j in range(0, len(r), bpp) for i in range(j, j + 3)) for r in rows]


def test_chromium_renders_the_timeline_and_the_analysis(tmp_path):
    failover, canary = recorded("failover_planned-worker-rules"), recorded("canary_worker-rules")
    for name, report in (("failover", failover), ("canary", canary)):
        (tmp_path / f"{name}.html").write_text(to_html(report), encoding="utf-8")

    dom = headless(tmp_path, "--dump-dom", (tmp_path / "failover.html").as_uri())
    # What the browser built from the file: a row per step with its bar, the labels, the axis, the markers.
    assert len(re.findall(r'<g class="step kind-', dom)) == len(failover.steps)
    assert len(re.findall(r'<rect class="bar"', dom)) == len(failover.steps)
    assert 'data-step="drain" data-kind="wait"' in dom and 'data-step="approval" data-kind="gate"' in dom
    labels = re.findall(r'<text class="label"[^>]*>([^<]*)</text>', dom)
    assert labels == [s.title if len(s.title) <= 46 else s.title[:45] + "…" for s in failover.steps]
    assert '<div class="v">60.54 s</div>' in dom and "<script" not in dom
    dom = headless(tmp_path, "--dump-dom", (tmp_path / "canary.html").as_uri())
    assert len(re.findall(r'<svg class="analysis"', dom)) == len(canary.analysis[0].metrics)
    assert len(re.findall(r'<g class="bar canary"', dom)) == len(re.findall(r'<g class="bar baseline"', dom)) > 0

    shot = tmp_path / "failover.png"
    headless(tmp_path, f"--screenshot={shot}", "--window-size=1400,900", "--hide-scrollbars",
             (tmp_path / "failover.html").as_uri())
    width, height, rows = png_pixels(shot)
    assert (width, height) == (1400, 900)
    ok = bytes.fromhex(OUTCOME_COLOUR["ok"][1:])
    # The drain's bar, painted: a long horizontal run of the "ok" green (the dots pattern interrupts it).
    longest = max(sum(1 for i in range(0, len(r), 3) if r[i:i + 3] == ok) for r in rows)
    assert longest > 300, f"no row shows a long green bar (most green pixels in a row: {longest})"
    print(f"screenshot: {shot}")
