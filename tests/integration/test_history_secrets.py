"""What the Temporal history holds, on the lab.

1. With secrets set (webhook URLs and a database password from the worker's environment): run a failover with
   approval and a restore drill, export every history, and find no secret value in any of them.
2. With payload encryption on (`lab up --encrypt`): the history holds none of the inventory's host and
   resource names, and the lab's codec server (what the UI calls) decodes it back.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format
from temporalio.api.common.v1 import Payload, Payloads
from temporalio.client import Client

from tests.integration.conftest import Lab, wait_for
from tests.integration.test_failover_lab import wait_end

pytestmark = pytest.mark.lab

DB_PASSWORD = "lab-db-s3cret-7f3a9c"


def _payload_bytes(message, out: list[bytes]) -> None:
    """Every Payload's data in a protobuf message tree (JSON export shows payload data only as base64)."""
    from google.protobuf.descriptor import FieldDescriptor

    if isinstance(message, Payload):
        out.append(message.data)
        out.extend(message.metadata.values())
        return
    for field, value in message.ListFields():
        if field.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        if field.message_type.GetOptions().map_entry:
            values = list(value.values())
        elif getattr(field, "is_repeated", False) or getattr(field, "label", None) == FieldDescriptor.LABEL_REPEATED:
            values = list(value)
        else:
            values = [value]
        for v in values:
            if hasattr(v, "ListFields"):
                _payload_bytes(v, out)


async def all_histories(address: str) -> dict[str, str]:
    """Every workflow's history, read with a client that has no codec (what the cluster stores): the JSON export
    plus every payload's bytes decoded, so a value inside a payload is found too."""
    client = await Client.connect(address)
    out = {}
    async for wf in client.list_workflows():
        history = await client.get_workflow_handle(wf.id, run_id=wf.run_id).fetch_history()
        chunks: list[bytes] = []
        for event in history.events:
            _payload_bytes(event, chunks)
        out[f"{wf.id}/{wf.run_id}"] = history.to_json() + "\n" + "\n".join(c.decode("utf-8", "replace") for c in chunks)
    return out


@pytest.fixture
def secret_lab(tmp_path, lab_home, monkeypatch):
    from lab.manage import down, up

    root = tmp_path / "lab"
    state = up(root, with_worker=False, quiet=True, default_ports=False)
    inv = yaml.safe_load(Path(state["inventory"]).read_text())
    for region in inv["regions"].values():
        region["database"]["password"] = {"env": "OPSFLOW_LAB_DB_PASSWORD"}
    Path(state["inventory"]).write_text(yaml.safe_dump(inv, sort_keys=False))
    monkeypatch.setenv("OPSFLOW_LAB_DB_PASSWORD", DB_PASSWORD)  # the worker inherits it (Lab.env)
    lab = Lab(root, state)
    yield lab
    lab.stop_workers()
    down(root, quiet=True)


async def test_no_secret_value_in_any_history(secret_lab):
    from lab.manage import worker_env

    lab = secret_lab
    lab.start_worker()
    started = lab.cli_json("failover", "--to", "westeurope", "--requester", "carol", "--reason", "secret scan")
    wid = started["workflow_id"]
    def at_gate() -> bool:
        r = lab.status(wid)
        assert r["status"] not in ("failed", "aborted", "refused"), r
        return (r.get("waiting_for") or "").startswith("approval")

    wait_for(at_gate, 120, what="the approval gate")
    lab.cli("approve", wid, "--as", "bob", "--reason", "ok", check=True)
    wait_end(lab, wid, 300, lambda r: r["status"] in ("succeeded", "failed"), "the failover to end")
    drill = lab.cli("drill", "--requester", "alice", "--wait", "--json", timeout=400)
    assert drill.returncode in (0, 1), drill.stderr  # the scan matters here, not the drill's verdict

    secrets = [DB_PASSWORD, *(v for k, v in worker_env(lab.state).items() if k.startswith("OPSFLOW_LAB_WEBHOOK"))]
    # The notifications were delivered (the webhook secrets were fetched: ops' from the worker's environment,
    # oncall's from the lab's Key Vault), so their absence below means something.
    from lab.receiver import read_notifications

    paths = {n["path"] for n in read_notifications(Path(lab.state["receiver"]["dir"]))}
    assert {"/ops", "/oncall"} <= paths, paths
    histories = await all_histories(lab.state["temporal"]["address"])
    assert len(histories) >= 2
    # Unencrypted, the histories do hold the inventory (so the scan reads real content, not ciphertext).
    assert any("lab-eastus-pg" in text for text in histories.values())
    for name, text in histories.items():
        for secret in secrets:
            assert secret not in text, f"{name} holds a secret value"


@pytest.fixture
def encrypted_lab(tmp_path, lab_home):
    from lab.manage import down, up

    root = tmp_path / "lab"
    state = up(root, with_worker=False, quiet=True, default_ports=False, encrypt=True)
    lab = Lab(root, state)
    yield lab
    lab.stop_workers()
    down(root, quiet=True)


async def test_encrypted_history_holds_no_host_names_and_the_codec_server_decodes_it(encrypted_lab):
    lab = encrypted_lab
    lab.start_worker()
    report = lab.cli_json("failover", "--to", "westeurope", "--dry-run", "--requester", "carol")
    assert report["status"] == "planned", report

    inv = yaml.safe_load(Path(lab.inventory).read_text())
    names = [inv["traffic"]["profile"], inv["traffic"]["subscription_id"], inv["azure"]["arm_endpoint"]]
    for region in inv["regions"].values():
        names += [region["database"]["server_name"], region["database"]["dsn"], region["traffic_endpoint"]]
    histories = await all_histories(lab.state["temporal"]["address"])
    assert histories
    for name, text in histories.items():
        for secret in names:
            assert secret not in text, f"{name} holds {secret!r} in clear text"

    # A person's CLI pointed at the encrypted lab (no key configured, no address): it finds the lab's key.
    import subprocess
    import sys

    env = {
        k: v
        for k, v in lab.env().items()
        if k not in ("OPSFLOW_CODEC_KEY_FILE", "TEMPORAL_ADDRESS", "TEMPORAL_NAMESPACE")
    }
    shown = subprocess.run(
        [sys.executable, "-m", "starters.cli", "report", report["workflow_id"], "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        timeout=120,
    )
    assert shown.returncode == 0 and json.loads(shown.stdout)["status"] == "planned", shown.stderr

    # The UI's view: the started event's input through the codec server.
    client = await Client.connect(lab.state["temporal"]["address"])
    history = await client.get_workflow_handle(report["workflow_id"]).fetch_history()
    encoded = history.events[0].workflow_execution_started_event_attributes.input
    assert encoded.payloads[0].metadata["encoding"] == b"binary/encrypted"
    request = urllib.request.Request(
        f"{lab.state['codec']['server']}/decode",
        data=json_format.MessageToJson(encoded).encode(),
        headers={
            "Content-Type": "application/json",
            "X-Namespace": "default",
            "Origin": lab.state["temporal"]["ui_url"],
        },
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.headers["Access-Control-Allow-Origin"] == lab.state["temporal"]["ui_url"]
        decoded = json_format.Parse(resp.read(), Payloads())
    plain = json.loads(decoded.payloads[0].data)
    # The input carries no rules (the environment and the digest of the CLI's copy); the worker's answer to
    # rules.inventory, the first activity, holds the inventory the run acted by.
    assert (
        plain["environment"] == inv["environment"]
        and plain["inventory"] is None
        and plain["inventory_digest"]["sha256"]
    )
    completed = next(e.activity_task_completed_event_attributes.result for e in history.events
                     if e.HasField("activity_task_completed_event_attributes"))
    request = urllib.request.Request(
        f"{lab.state['codec']['server']}/decode",
        data=json_format.MessageToJson(completed).encode(),
        headers={"Content-Type": "application/json", "X-Namespace": "default"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        rules = json.loads(json_format.Parse(resp.read(), Payloads()).payloads[0].data)
    server = rules["environments"][0]["inventory"]["regions"]["eastus"]["database"]["server_name"]
    assert server == inv["regions"]["eastus"]["database"]["server_name"]
