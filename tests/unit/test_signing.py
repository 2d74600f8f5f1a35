"""SSH signatures: real keys from ssh-keygen, cross-checked both ways with `ssh-keygen -Y sign/verify`,
through a real ssh-agent, and the refusals verify_request must make."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from opsflow import signing
from opsflow.signing import Signer, SigningError, request_payload, verify_request, verify_signature, verify_start

pytestmark = pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen (openssh-client)")

KEY_TYPES = [("ed25519", []), ("ecdsa", ["-b", "256"]), ("rsa", ["-b", "2048"])]


def keygen(dirpath: Path, name: str, kind: str, extra: list[str]) -> tuple[Path, str]:
    path = dirpath / f"{name}_{kind}"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", kind, *extra, "-N", "", "-C", f"{name}@laptop", "-f", str(path)], check=True
    )
    return path, Path(f"{path}.pub").read_text().strip()


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    d = tmp_path_factory.mktemp("keys")
    out = {}
    for kind, extra in KEY_TYPES:
        out[kind] = keygen(d, "bob", kind, extra)
    out["alice"] = keygen(d, "alice", "ed25519", [])
    return out


@pytest.fixture(scope="module")
def agent(tmp_path_factory, keys):
    """A real ssh-agent on a private socket, holding bob's ecdsa key and alice's ed25519 key."""
    sock = tmp_path_factory.mktemp("agent") / "agent.sock"
    proc = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if sock.exists():
                break
            subprocess.run(["sleep", "0.02"])  # the agent creates its socket asynchronously
        env = {**os.environ, "SSH_AUTH_SOCK": str(sock)}
        for k in ("ecdsa", "alice"):
            subprocess.run(["ssh-add", "-q", str(keys[k][0])], env=env, check=True, stderr=subprocess.DEVNULL)
        yield str(sock)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def ssh_keygen_sign(key: Path, message: bytes, tmp: Path) -> str:
    msg = tmp / "msg"
    msg.write_bytes(message)
    subprocess.run(
        ["ssh-keygen", "-q", "-Y", "sign", "-n", "opsflow", "-f", str(key), str(msg)], check=True, capture_output=True
    )
    return (tmp / "msg.sig").read_text()


def ssh_keygen_verify(
    pub: str, message: bytes, sig: str, tmp: Path, namespace: str = "opsflow"
) -> subprocess.CompletedProcess:
    (tmp / "allowed").write_text(f"bob {pub}\n")
    (tmp / "sig").write_text(sig)
    return subprocess.run(
        [
            "ssh-keygen",
            "-Y",
            "verify",
            "-f",
            str(tmp / "allowed"),
            "-I",
            "bob",
            "-n",
            namespace,
            "-s",
            str(tmp / "sig"),
        ],
        input=message,
        capture_output=True,
    )


@pytest.mark.parametrize("kind", [k for k, _ in KEY_TYPES])
def test_ssh_keygen_signature_verifies_with_our_code(keys, tmp_path, kind):
    key, pub = keys[kind]
    message = b'{"action":"approve"}'
    sig = ssh_keygen_sign(key, message, tmp_path)
    verify_signature(message, sig, pub)
    with pytest.raises(ValueError, match="does not match"):
        verify_signature(message + b" ", sig, pub)
    with pytest.raises(ValueError, match="another key"):
        verify_signature(message, sig, keys["alice"][1])


@pytest.mark.parametrize("kind", [k for k, _ in KEY_TYPES])
def test_our_signature_verifies_with_ssh_keygen(keys, tmp_path, kind):
    key, pub = keys[kind]
    message = b'{"action":"abort","reason":"r\\u00e9"}'
    sig = signing.sign(message, key_path=key, public_key=pub)
    done = ssh_keygen_verify(pub, message, sig, tmp_path)
    assert done.returncode == 0, done.stderr
    assert ssh_keygen_verify(pub, message + b"x", sig, tmp_path).returncode != 0
    assert ssh_keygen_verify(pub, message, sig, tmp_path, namespace="git").returncode != 0


def test_agent_signs_with_the_inventorys_key(keys, agent, tmp_path):
    message = b"hello"
    for kind in ("ecdsa", "alice"):
        pub = keys[kind][1]
        sig = signing.sign(message, public_key=pub, agent_socket=agent)
        verify_signature(message, sig, pub)
        assert ssh_keygen_verify(pub, message, sig, tmp_path).returncode == 0
    with pytest.raises(SigningError, match="does not hold"):
        signing.sign(message, public_key=keys["ed25519"][1], agent_socket=agent)
    with pytest.raises(SigningError, match="2 keys"):
        signing.sign(message, agent_socket=agent)


def test_key_file_must_be_the_inventorys_key(keys):
    with pytest.raises(SigningError, match="not the inventory's key"):
        signing.sign(b"x", key_path=keys["alice"][0], public_key=keys["ed25519"][1])
    with pytest.raises(SigningError, match="cannot read"):
        signing.sign(b"x", key_path="/nonexistent/key")


def test_no_agent_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    with pytest.raises(SigningError, match="SSH_AUTH_SOCK"):
        signing.sign(b"x")


# -- verify_request ------------------------------------------------------------------------------------


@dataclass
class Policy:
    keys: dict[str, str]
    require_signed: bool = True

    def key_of(self, name: str) -> str | None:
        return self.keys.get(name)


@dataclass
class Req:
    by: str
    reason: str = ""
    gate: str | None = None
    full: bool = False
    signature: str | None = None
    signed_at: datetime | None = None


NOW = datetime(2026, 11, 25, 16, 0, tzinfo=timezone.utc)
RUN = dict(workflow_id="opsflow-prod", run_id="run-1", gate_id="approval", action="approve")


def signed(keys, who: str, key: str, *, at=NOW, reason="go", **bind) -> Req:
    b = {**RUN, **bind}
    fields = Signer(name=who, key_path=str(keys[key][0])).sign_request(
        workflow_id=b["workflow_id"], run_id=b["run_id"], gate_id=b["gate_id"], action=b["action"], reason=reason, at=at
    )
    return Req(by=who, reason=reason, **fields)


@pytest.fixture
def policy(keys) -> Policy:
    return Policy({"bob": keys["ed25519"][1], "alice": keys["alice"][1]})


def test_a_correct_signature_is_accepted(keys, policy):
    verify_request(policy, signed(keys, "bob", "ed25519"), now=NOW + timedelta(seconds=20), **RUN)


@pytest.mark.parametrize(
    "make, error",
    [
        (lambda k: Req(by="bob", reason="go"), "missing signature"),
        (lambda k: signed(k, "bob", "alice"), "signed by another key"),
        (lambda k: signed(k, "bob", "ed25519", run_id="run-0"), "another run/gate"),
        (lambda k: signed(k, "bob", "ed25519", gate_id="bake-25"), "another run/gate"),
        (lambda k: signed(k, "bob", "ed25519", workflow_id="opsflow-staging"), "another run/gate"),
        (lambda k: signed(k, "bob", "ed25519", action="reject"), "another run/gate"),
        (lambda k: signed(k, "bob", "ed25519", at=NOW - timedelta(minutes=6)), "stale"),
        (lambda k: signed(k, "bob", "ed25519", at=NOW + timedelta(minutes=6)), "stale"),
        (lambda k: Req(by="carol", reason="go", signature="x", signed_at=NOW), "no SSH public key"),
    ],
)
def test_refusals(keys, policy, make, error):
    with pytest.raises(ValueError, match=error):
        verify_request(policy, make(keys), now=NOW, **RUN)


def test_an_altered_reason_or_name_is_refused(keys, policy):
    req = signed(keys, "bob", "ed25519")
    req.reason = "something else"
    with pytest.raises(ValueError, match="does not match"):
        verify_request(policy, req, now=NOW, **RUN)
    req = signed(keys, "bob", "ed25519")
    req.by = "alice"  # bob's signature presented as alice's: alice's key does not match
    with pytest.raises(ValueError, match="another key"):
        verify_request(policy, req, now=NOW, **RUN)


def test_a_replayed_signature_is_refused(keys, policy):
    req = signed(keys, "bob", "ed25519")
    verify_request(policy, req, now=NOW, **RUN)
    with pytest.raises(ValueError, match="replayed"):
        verify_request(policy, req, now=NOW, used=[req.signature], **RUN)


def test_unsigned_passes_when_not_required_but_a_bad_signature_never_does(keys, policy):
    policy.require_signed = False
    verify_request(policy, Req(by="bob"), now=NOW, **RUN)
    with pytest.raises(ValueError, match="another run/gate"):
        verify_request(policy, signed(keys, "bob", "ed25519", run_id="other"), now=NOW, **RUN)


def test_garbage_signature_is_a_clear_error(policy):
    with pytest.raises(ValueError, match="not an SSH signature"):
        verify_request(policy, Req(by="bob", signature="hello", signed_at=NOW), now=NOW, **RUN)


def test_start_signature(keys, policy):
    s = Signer(name="bob", key_path=str(keys["ed25519"][0])).sign_start(
        environment="prod", procedure="failover", reason="drill", at=NOW
    )
    verify_start(policy, environment="prod", procedure="failover", requester="bob", reason="drill", now=NOW, **s)
    with pytest.raises(ValueError, match="does not match"):
        verify_start(policy, environment="prod", procedure="maintenance", requester="bob", reason="drill", now=NOW, **s)
    with pytest.raises(ValueError, match="missing signature"):
        verify_start(
            policy,
            environment="prod",
            procedure="failover",
            requester="bob",
            reason="",
            signature=None,
            signed_at=None,
            now=NOW,
        )


def test_operators():
    signing.check_operator({}, "failover", "anyone")
    signing.check_operator({"failover": ["bob"]}, "drill", "anyone")
    with pytest.raises(ValueError, match="'eve' may not start failover; operators for failover: bob"):
        signing.check_operator({"failover": ["bob"]}, "failover", "eve")


def test_payload_is_canonical():
    a = request_payload(workflow_id="w", run_id="r", gate_id=None, action="pause", by="bob", reason="é", at=NOW)
    b = request_payload(
        workflow_id="w",
        run_id="r",
        gate_id="",
        action="pause",
        by="bob",
        reason="é",
        at=NOW.astimezone(timezone(timedelta(hours=2))),
    )
    assert a == b and a.isascii()


def test_verify_report_checks_every_recorded_signature(keys, tmp_path):
    import json

    import opsflow.inventory

    if not hasattr(opsflow.inventory, "Person"):
        pytest.skip("needs the kernel's ApprovalPolicy with {name, ssh_key} approvers")

    import yaml

    from starters.cli import main as cli
    from tests.workflow.conftest import inventory_dict

    inv = inventory_dict(environment="prod")
    inv["approval"]["approvers"] = [
        {"name": "bob", "ssh_key": keys["ed25519"][1]},
        {"name": "alice", "ssh_key": keys["alice"][1]},
    ]
    (tmp_path / "inv.yaml").write_text(yaml.safe_dump(inv))
    bob = Signer(name="bob", key_path=str(keys["ed25519"][0]))
    alice = Signer(name="alice", key_path=str(keys["alice"][0]))
    approve = bob.sign_request(
        workflow_id="opsflow-prod", run_id="r1", gate_id="approval", action="approve", reason="ok", at=NOW
    )
    pause = alice.sign_request(workflow_id="opsflow-prod", run_id="r1", gate_id=None, action="pause", reason="", at=NOW)
    start = alice.sign_start(environment="prod", procedure="failover", reason="drill", at=NOW)
    report = {
        "procedure": "failover",
        "workflow_id": "opsflow-prod",
        "run_id": "r1",
        "environment": "prod",
        "requester": "alice",
        "reason": "drill",
        "start_signature": start["signature"],
        "start_signed_at": NOW.isoformat(),
        "approvals": [
            {
                "approved": True,
                "by": "bob",
                "at": NOW.isoformat(),
                "reason": "ok",
                "gate": "approval",
                "signature": approve["signature"],
                "signed_at": NOW.isoformat(),
            }
        ],
        "events": [
            {
                "action": "pause",
                "by": "alice",
                "at": NOW.isoformat(),
                "reason": "",
                "signature": pause["signature"],
                "signed_at": NOW.isoformat(),
            }
        ],
    }
    f = tmp_path / "r.json"
    f.write_text(json.dumps(report))
    assert cli(["verify-report", str(f), "--env", str(tmp_path / "inv.yaml")]) == 0
    report["approvals"][0]["gate"] = "bake-25"  # moved to another gate after the fact
    f.write_text(json.dumps(report))
    assert cli(["verify-report", str(f), "--env", str(tmp_path / "inv.yaml")]) == 1


def test_check_start_operators_and_signature(keys):
    from types import SimpleNamespace

    from opsflow.signing import check_start, start_memo

    inv = SimpleNamespace(environment="prod", operators={"failover": [{"name": "bob", "ssh_key": keys["ed25519"][1]}]},
                          approval=SimpleNamespace(approvers=[], require_signed=True))
    signed = Signer(name="bob", key_path=str(keys["ed25519"][0])).sign_start(
        environment="prod", procedure="failover", reason="r", at=NOW
    )
    memo = start_memo(signed)["opsflow-start-signature"]
    record = check_start(inv, procedure="failover", requester="bob", reason="r", memo=memo, now=NOW)
    assert record is not None and record.action == "start" and record.by == "bob"
    with pytest.raises(ValueError, match="'eve' may not start failover"):
        check_start(inv, procedure="failover", requester="eve", reason="r", memo=memo, now=NOW)
    with pytest.raises(ValueError, match="missing signature"):
        check_start(inv, procedure="failover", requester="bob", reason="r", memo=None, now=NOW)
    with pytest.raises(ValueError, match="does not match"):
        check_start(inv, procedure="failover", requester="bob", reason="other", memo=memo, now=NOW)
    with pytest.raises(ValueError, match="stale"):
        check_start(inv, procedure="failover", requester="bob", reason="r", memo=memo, now=NOW + timedelta(minutes=30))
