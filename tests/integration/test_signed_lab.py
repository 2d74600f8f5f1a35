"""Signed approvals on the lab (issue 11, "done when"): with `require_signed` and a two-role quorum, an unsigned
approval, one signed with another approver's key, one signed for another run, and a stale one are refused and
absent from the history; correctly signed ones (through the CLI, with --key and through ssh-agent) are accepted,
both roles are needed, and `opsflow verify-report` checks every signature offline. A start by someone who is not
an operator, or without the requester's signature, is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml
from temporalio.client import Client, WorkflowUpdateFailedError

from opsflow.client import send_update
from opsflow.signing import Signer
from tests.integration.conftest import wait_for
from tests.integration.test_failover_lab import wait_end
from workflows.procedure import Procedure

pytestmark = pytest.mark.lab


def keygen(d: Path, name: str, kind: str = "ed25519") -> tuple[str, str]:
    path = d / name
    subprocess.run(
        [
            "ssh-keygen",
            "-q",
            "-t",
            kind,
            *(["-b", "256"] if kind == "ecdsa" else []),
            "-N",
            "",
            "-C",
            name,
            "-f",
            str(path),
        ],
        check=True,
    )
    return str(path), Path(f"{path}.pub").read_text().strip()


@pytest.fixture
def keys(tmp_path):
    d = tmp_path / "keys"
    d.mkdir()
    return {
        "carol": keygen(d, "carol"),
        "bob": keygen(d, "bob"),
        "dana": keygen(d, "dana", "ecdsa"),
        "eve": keygen(d, "eve"),
    }


@pytest.fixture
def agent(tmp_path, keys):
    sock = tmp_path / "agent.sock"
    proc = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(sock.exists, 10, 0.02, "the ssh-agent socket")
    subprocess.run(
        ["ssh-add", "-q", keys["dana"][0]],
        env={**os.environ, "SSH_AUTH_SOCK": str(sock)},
        check=True,
        stderr=subprocess.DEVNULL,
    )
    yield str(sock)
    proc.send_signal(signal.SIGTERM)
    proc.wait(10)


@pytest.fixture
def signed_lab(lab, keys):
    inv = yaml.safe_load(Path(lab.inventory).read_text())
    inv["approval"].update(
        approvers={
            "platform-lead": [{"name": "bob", "ssh_key": keys["bob"][1]}],
            "qa": [{"name": "dana", "ssh_key": keys["dana"][1]}],
        },
        require=["platform-lead", "qa"],
        require_signed=True,
    )
    inv["operators"] = {"failover": [{"name": "carol", "ssh_key": keys["carol"][1]}]}
    Path(lab.inventory).write_text(yaml.safe_dump(inv, sort_keys=False))
    lab.start_worker()
    return lab


def status(lab, wid: str) -> dict:
    return lab.cli_json("status", wid)


async def test_signed_approvals_on_the_lab(signed_lab, keys, agent, tmp_path):
    lab = signed_lab
    # Starts: not an operator, unsigned, then carol signing with her key file.
    refused = lab.cli(
        "failover", "--to", "westeurope", "--requester", "eve", "--key", keys["eve"][0], "--wait", "--json"
    )
    assert refused.returncode == 1 and "'eve' may not start failover" in refused.stdout + refused.stderr, refused
    started = lab.cli_json(
        "failover", "--to", "westeurope", "--requester", "carol", "--reason", "signed drill", "--key", keys["carol"][0]
    )
    wid = started["workflow_id"]
    wait_for(lambda: lab.status(wid)["status"] == "waiting", 120, what="the approval gate")

    client = await Client.connect(lab.state["temporal"]["address"])
    handle = client.get_workflow_handle(wid)
    run_id = (await handle.describe()).run_id
    now = datetime.now(timezone.utc)
    bob = Signer(name="bob", key_path=keys["bob"][0])

    def req(by: str, **signed) -> dict:
        return {"by": by, "reason": "ok", **signed}

    attempts = {
        "missing signature": req("bob"),
        "signed by another key": req(
            "bob",
            **Signer(name="bob", key_path=keys["eve"][0]).sign_request(
                workflow_id=wid, run_id=run_id, gate_id="approval", action="approve", reason="ok"
            ),
        ),
        "another run/gate": req(
            "bob",
            **bob.sign_request(workflow_id=wid, run_id="0" * 36, gate_id="approval", action="approve", reason="ok"),
        ),
        "stale": req(
            "bob",
            **bob.sign_request(
                workflow_id=wid,
                run_id=run_id,
                gate_id="approval",
                action="approve",
                reason="ok",
                at=now - timedelta(minutes=10),
            ),
        ),
    }
    for why, body in attempts.items():
        with pytest.raises(WorkflowUpdateFailedError) as e:
            await send_update(handle, Procedure.approve, body)
        assert why in str(e.value.cause), (why, e.value.cause)

    # Correct: bob through the CLI with his key file; one role is not enough.
    lab.cli("approve", wid, "--as", "bob", "--reason", "lead ok", "--key", keys["bob"][0], check=True)
    st = status(lab, wid)
    assert st["status"] == "waiting" and "qa" in (st.get("waiting_for") or ""), st
    # dana through ssh-agent (no --key): her ecdsa key is in the agent.
    done = subprocess.run(
        [*lab_cli(lab), "approve", wid, "--as", "dana", "--reason", "qa ok"],
        capture_output=True,
        text=True,
        env={**lab.env(), "SSH_AUTH_SOCK": agent},
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr
    wait_end(lab, wid, 300, lambda r: r["status"] in ("succeeded", "failed"), "the failover to end")

    # None of the refused requests reached the history: exactly the two accepted approvals are there.
    history = await handle.fetch_history()
    accepted = [e for e in history.events if e.HasField("workflow_execution_update_accepted_event_attributes")]
    assert len(accepted) == 2

    report_file = tmp_path / "report.json"
    report_file.write_text(lab.cli("report", wid, "--json", check=True).stdout)
    verified = lab.cli("verify-report", str(report_file), "--env", lab.inventory, "--json")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    result = json.loads(verified.stdout)
    assert result["verified"] == 3 and not result["failed"]  # the start and both approvals
    # The page to look at shows the same verdicts (keys: the inventory the run acted by, from its history).
    page_file = tmp_path / "report.html"
    lab.cli("report", wid, "--html", str(page_file), check=True)
    page = page_file.read_text()
    assert "3 of 3 signatures verify" in page and "the start by carol: ✓ verified" in page
    assert page.count('<td class="sig ok">✓ verified</td>') == 2
    steps = json.loads(report_file.read_text())["steps"]
    assert len(steps) > 10 and page.count('<g class="step kind-') == len(steps)  # a row per step
    assert 'data-step="drain" data-kind="wait"' in page and 'data-step="approval" data-kind="gate"' in page
    page = lab.cli("report", wid, "--html", "-", "--env", lab.inventory, check=True).stdout  # the keys given
    assert f"3 of 3 signatures verify (checked against the public keys in {lab.inventory})" in page
    # A tampered report does not verify.
    data = json.loads(report_file.read_text())
    data["approvals"][0]["reason"] = "something else"
    report_file.write_text(json.dumps(data))
    assert lab.cli("verify-report", str(report_file), "--env", lab.inventory).returncode == 1


def lab_cli(lab) -> list[str]:
    import sys

    return [sys.executable, "-m", "starters.cli"]
