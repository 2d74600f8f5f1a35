"""verify_request inside a real workflow Update validator, in the sandbox (cryptography is a native extension
with lazy imports: this proves the passed-through import works for each key type), using workflow.now()."""

from __future__ import annotations

import subprocess
import uuid
from datetime import datetime, timedelta

import pytest
from pydantic import BaseModel
from temporalio import workflow
from temporalio.client import WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError
from temporalio.worker import Worker

with workflow.unsafe.imports_passed_through():  # the sandbox re-imports this module: cryptography must pass
    from opsflow.client import send_update
    from opsflow.signing import Keyring, Signer, verify_request


class SignedReq(BaseModel):
    by: str
    reason: str = ""
    signature: str | None = None
    signed_at: datetime | None = None


class Keys(BaseModel):
    keys: dict[str, str]


@workflow.defn(name="signing-probe")
class SigningProbe:
    # The keys come in through @workflow.init, as in the procedures: an update delivered with the first workflow
    # task is validated before run() starts, and must already see them.
    @workflow.init
    def __init__(self, keys: Keys) -> None:
        self.approved: list[str] = []
        self.keys = keys.keys

    @workflow.run
    async def run(self, keys: Keys) -> list[str]:
        await workflow.wait_condition(lambda: len(self.approved) >= 1, timeout=timedelta(hours=1))
        return self.approved

    @workflow.update
    def approve(self, req: SignedReq) -> str:
        self.approved.append(req.by)
        return "ok"

    @approve.validator
    def _check(self, req: SignedReq) -> None:
        info = workflow.info()
        try:
            verify_request(
                Keyring(self.keys, require_signed=True),
                req,
                workflow_id=info.workflow_id,
                run_id=info.run_id,
                gate_id="approval",
                action="approve",
                now=workflow.now(),
            )
        except ValueError as e:
            raise ApplicationError(str(e), type="NotAllowed") from None


@pytest.mark.parametrize("kind, extra", [("ed25519", []), ("ecdsa", ["-b", "256"])])
async def test_signed_update_in_the_sandbox(env, tmp_path, kind, extra):
    key = tmp_path / "k"
    subprocess.run(["ssh-keygen", "-q", "-t", kind, *extra, "-N", "", "-f", str(key)], check=True)
    pub = (tmp_path / "k.pub").read_text().strip()
    queue = f"q-{uuid.uuid4().hex[:8]}"
    async with Worker(env.client, task_queue=queue, workflows=[SigningProbe]):
        handle = await env.client.start_workflow(
            SigningProbe.run, Keys(keys={"bob": pub}), id=f"probe-{uuid.uuid4().hex[:8]}", task_queue=queue
        )
        desc = await handle.describe()
        signer = Signer(name="bob", key_path=str(key))
        now = await env.get_current_time()

        wrong_gate = signer.sign_request(
            workflow_id=handle.id, run_id=desc.run_id, gate_id="other", action="approve", at=now
        )
        with pytest.raises(WorkflowUpdateFailedError) as e:
            await send_update(handle, SigningProbe.approve, SignedReq(by="bob", **wrong_gate))
        assert "another run/gate" in str(e.value.cause)
        with pytest.raises(WorkflowUpdateFailedError) as e:
            await send_update(handle, SigningProbe.approve, SignedReq(by="bob"))
        assert "missing signature" in str(e.value.cause)

        good = signer.sign_request(
            workflow_id=handle.id, run_id=desc.run_id, gate_id="approval", action="approve", at=now
        )
        assert await send_update(handle, SigningProbe.approve, SignedReq(by="bob", **good)) == "ok"
        assert await handle.result() == ["bob"]
        # Refused updates never reached the history: only the accepted one is there.
        history = await handle.fetch_history()
        accepted = [ev for ev in history.events if ev.HasField("workflow_execution_update_accepted_event_attributes")]
        assert len(accepted) == 1
