"""The HTML report (opsflow/html_report.py) of a failover that failed past its promotion, as the workflow itself
reports it on the time-skipping server: a pause before the approval, the drain's timed wait, the failed scale-up,
then what is left to do as rows of the timeline (the unit tests render the recorded runs' reports)."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest
from temporalio.client import WorkflowFailureError

from opsflow.client import send_update, start_procedure
from opsflow.contracts.k8s import K8S_SCALE_UP
from opsflow.html_report import OUTCOME_COLOUR, gantt_svg, to_html
from opsflow.models import FailoverReport
from tests.workflow.conftest import worker_holds
from tests.workflow.test_failover_workflow import until_waiting
from workflows.failover import FailoverInput
from workflows.procedure import Procedure, Request

SVG = "{http://www.w3.org/2000/svg}"


async def test_a_failure_past_the_promotion_shows_what_is_left_to_do(running, world, inventory):
    world.fail[K8S_SCALE_UP.name] = "quota exceeded"
    worker_holds(inventory)
    inp = FailoverInput(inventory=inventory, to_region="westeurope", requester="alice", reason="<b>drill</b> & co")
    handle = await start_procedure(running.client, inventory, "failover", inp, "test failover")
    await until_waiting(handle)
    await send_update(handle, Procedure.pause, Request(by="alice", reason="wait for the DBA"))
    await send_update(handle, Procedure.resume, Request(by="alice"))
    await send_update(handle, Procedure.approve, Request(by="bob", reason="change #42"))
    with pytest.raises(WorkflowFailureError) as exc:
        await handle.result()
    report = FailoverReport.model_validate(exc.value.cause.details[0])
    assert report.status == "failed" and report.remaining and report.rto_seconds is not None

    root = ET.fromstring(gantt_svg(report))
    rows = [g for g in root.iter(f"{SVG}g") if "step" in g.get("class", "").split()]
    done = {g.get("data-step"): g for g in rows if g.get("data-step")}
    assert list(done) == [s.name for s in report.steps]
    failed = [n for n, g in done.items() if g.get("data-outcome") == "failed"]
    assert failed == ["scale-up"]
    bar = next(r for r in done["scale-up"].iter(f"{SVG}rect") if r.get("class") == "bar")
    assert bar.get("fill") == OUTCOME_COLOUR["failed"]
    assert done["drain"].get("data-kind") == "wait" and done["approval"].get("data-kind") == "gate"
    todo = [g.find(f"{SVG}title").text for g in rows if g.get("data-kind") == "remaining"]
    assert todo == [f"left to do: {r}" for r in report.remaining] and todo[0] == "left to do: scale up in westeurope"
    markers = [" ".join(t.text for t in g.iter(f"{SVG}text")) for g in root.iter(f"{SVG}g")
               if "marker" in g.get("class", "")]
    assert markers == ["pause alice", "resume alice", "✓ bob"]

    page = to_html(report)
    assert '<span class="status bad">failed</span>' in page and "quota exceeded" in page
    assert re.search(r'<div class="k">RTO</div><div class="v">[0-9.]+ s</div>', page)
    assert "&lt;b&gt;drill&lt;/b&gt; &amp; co" in page and "<b>drill" not in page
