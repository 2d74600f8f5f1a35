"""`opsflow verify-report` fails on what a doctored report would show: no start signature, an approval that is not
among the recorded ones, a decision whose signature does not verify."""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone

import yaml

from opsflow.signing import Signer
from starters.security import verify_report
from tests.helpers import ssh_key_pair
from tests.workflow.conftest import inventory_dict

AT = datetime(2026, 12, 6, 10, 0, tzinfo=timezone.utc)


def key(tmp_path, name):
    path, pub = ssh_key_pair(tmp_path, name)
    return Signer(name=name, key_path=path), pub


def check(tmp_path, report, inventory) -> tuple[int, dict]:
    (tmp_path / "r.json").write_text(json.dumps(report, default=str))
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = verify_report(argparse.Namespace(report=str(tmp_path / "r.json"), env=inventory, json=True))
    return code, json.loads(out.getvalue())


def test_a_doctored_report_fails(tmp_path):
    (alice, alice_pub), (bob, bob_pub) = key(tmp_path, "alice"), key(tmp_path, "bob")
    inv = inventory_dict(
        environment="prod",
        approval={"approvers": [{"name": "bob", "ssh_key": bob_pub}], "require_signed": True},
        operators={"failover": [{"name": "alice", "ssh_key": alice_pub}]},
    )
    (tmp_path / "prod.yaml").write_text(yaml.safe_dump(inv))
    start = alice.sign_start(
        environment="prod", procedure="failover", reason="dr", at=AT, input_sha256="ab" * 32, nonce="n1"
    )
    approve = bob.sign_request(
        workflow_id="opsflow-prod", run_id="r1", gate_id="approval", action="approve", reason="ok", at=AT
    )
    decision = {"approved": True, "by": "bob", "at": AT.isoformat(), "reason": "ok", "gate": "approval", **approve}
    report = {
        "procedure": "failover",
        "workflow_id": "opsflow-prod",
        "run_id": "r1",
        "environment": "prod",
        "requester": "alice",
        "reason": "dr",
        "start_signature": start["signature"],
        "start_signed_at": AT.isoformat(),
        "start_input_sha256": "ab" * 32,
        "start_nonce": "n1",
        "approval": decision,
        "approvals": [decision],
    }
    code, out = check(tmp_path, report, str(tmp_path / "prod.yaml"))
    assert code == 0 and out["verified"] == 2 and out["problems"] == []

    code, out = check(tmp_path, {**report, "start_signature": None}, str(tmp_path / "prod.yaml"))
    assert code == 1 and "the start is not signed" in out["problems"][0]
    code, out = check(tmp_path, {**report, "approvals": []}, str(tmp_path / "prod.yaml"))
    assert code == 1 and "not among the recorded approvals" in out["problems"][0]
    # another input
    code, out = check(tmp_path, {**report, "start_input_sha256": "cd" * 32}, str(tmp_path / "prod.yaml"))
    assert code == 1 and out["failed"][0]["action"] == "start"
    altered = {**decision, "reason": "fine by me"}
    code, out = check(tmp_path, {**report, "approval": altered, "approvals": [altered]}, str(tmp_path / "prod.yaml"))
    assert code == 1 and out["failed"][0]["by"] == "bob"
