"""Signed requests: who approved is proven by an SSH signature, not claimed by `--as NAME`.

People already sign git commits with their SSH keys; opsflow uses the same format (SSHSIG, what
`ssh-keygen -Y sign -n opsflow` makes) over a small canonical payload that binds a request to one run
and one gate: workflow id, run id, gate id, action, reason, signer and time. The inventory lists each
approver's (and operator's) public key; a workflow Update validator checks the signature with
`verify_request` before anything reaches history.

Verification is pure and deterministic (no I/O, no clock: the caller passes `workflow.now()`), so it runs
inside a workflow validator. Workflows MUST import this module through `workflow.unsafe.imports_passed_through()`:
cryptography is a native (Rust) extension that cannot be re-imported inside the sandbox ("SystemError: bad
argument to internal function"). It also imports modules lazily (ec.ECDSA() imports the OpenSSL backend),
so every cryptography call below runs inside `imports_passed_through()` too (a no-op outside a workflow).

Signing happens in the CLI: through ssh-agent (SSH_AUTH_SOCK) by default, or a private key file
(`--key PATH`, OpenSSH or PEM format, unencrypted; an encrypted key belongs in the agent).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import struct
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterable, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from temporalio import workflow

NAMESPACE = "opsflow"
# How far a signature's time may be from the workflow's clock (either way: clocks drift).
FRESHNESS = timedelta(minutes=5)
_HASH = "sha512"  # the message hash inside SSHSIG; ssh-keygen uses sha512 by default
_ARMOR_BEGIN = "-----BEGIN SSH SIGNATURE-----"
_ARMOR_END = "-----END SSH SIGNATURE-----"
_ECDSA = {
    "ecdsa-sha2-nistp256": (ec.SECP256R1, hashes.SHA256),
    "ecdsa-sha2-nistp384": (ec.SECP384R1, hashes.SHA384),
    "ecdsa-sha2-nistp521": (ec.SECP521R1, hashes.SHA512),
}


class SigningError(Exception):
    """The CLI could not sign (no agent, no key for the name, unreadable key file)."""


# -- the SSH wire format -------------------------------------------------------------------------------


def _string(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def _mpint(n: int) -> bytes:
    if n == 0:
        return _string(b"")
    raw = n.to_bytes((n.bit_length() + 8) // 8, "big")  # one spare bit keeps it positive
    return _string(raw)


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("truncated")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def uint32(self) -> int:
        return struct.unpack(">I", self.take(4))[0]

    def string(self) -> bytes:
        return self.take(self.uint32())

    def mpint(self) -> int:
        return int.from_bytes(self.string(), "big", signed=True)

    def done(self) -> bool:
        return self.pos == len(self.data)


def public_key_blob(line: str) -> bytes:
    """'ssh-ed25519 AAAA... comment' -> the key's wire blob (what signatures embed)."""
    parts = line.split()
    if len(parts) < 2:
        raise ValueError("not an SSH public key (expected 'TYPE BASE64 [comment]')")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except ValueError:
        raise ValueError("not an SSH public key (the key part is not base64)") from None
    try:
        kind = _Reader(blob).string().decode(errors="replace")
    except ValueError:
        raise ValueError(
            "not an SSH public key (the key data is truncated: copy the whole line of the .pub file)"
        ) from None
    if kind != parts[0]:
        raise ValueError(f"not an SSH public key (the key is not of type {parts[0]})")
    return blob


def _load_public(blob: bytes) -> Any:
    kind = _Reader(blob).string().decode()
    line = f"{kind} {base64.b64encode(blob).decode()}".encode()
    try:
        return serialization.load_ssh_public_key(line)
    except (ValueError, TypeError) as e:
        raise ValueError(f"unsupported or malformed SSH public key ({kind}): {e}") from None


def check_public_key(line: str) -> str:
    """For the inventory's validators: a usable ed25519/ecdsa/rsa public key line, else ValueError."""
    with workflow.unsafe.imports_passed_through():  # the inventory is decoded inside workflows too
        _load_public(public_key_blob(line))
    return line.strip()


def fingerprint(blob_or_line: bytes | str) -> str:
    blob = public_key_blob(blob_or_line) if isinstance(blob_or_line, str) else blob_or_line
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _signed_data(message: bytes, namespace: str) -> bytes:
    """What the key actually signs (PROTOCOL.sshsig): the magic, namespace, reserved, hash name, H(message)."""
    digest = hashlib.new(_HASH, message).digest()
    return b"SSHSIG" + _string(namespace.encode()) + _string(b"") + _string(_HASH.encode()) + _string(digest)


def _armor(blob: bytes) -> str:
    b64 = base64.b64encode(blob).decode()
    return "\n".join([_ARMOR_BEGIN, *(b64[i:i + 70] for i in range(0, len(b64), 70)), _ARMOR_END]) + "\n"


def _dearmor(text: str) -> bytes:
    lines = [ln.strip() for ln in text.strip().splitlines()]
    if len(lines) < 3 or lines[0] != _ARMOR_BEGIN or lines[-1] != _ARMOR_END:
        raise ValueError("not an SSH signature (expected -----BEGIN SSH SIGNATURE----- armor)")
    try:
        return base64.b64decode("".join(lines[1:-1]), validate=True)
    except ValueError:
        raise ValueError("not an SSH signature (bad base64)") from None


@dataclass(frozen=True)
class ParsedSignature:
    public_key: bytes  # wire blob of the signer's key
    namespace: str
    hash_alg: str
    algorithm: str  # e.g. ssh-ed25519, rsa-sha2-512
    raw: bytes  # the algorithm's signature bytes


def parse_signature(armored: str) -> ParsedSignature:
    r = _Reader(_dearmor(armored))
    try:
        if r.take(6) != b"SSHSIG" or r.uint32() != 1:
            raise ValueError("not an SSHSIG version 1 signature")
        pub, ns, _reserved, hash_alg, sig = r.string(), r.string(), r.string(), r.string(), r.string()
        inner = _Reader(sig)
        algorithm, raw = inner.string().decode(), inner.string()
        if not (r.done() and inner.done()):  # a blob is consumed whole: nothing may ride after the signature
            raise ValueError("trailing data after the signature")
    except (ValueError, UnicodeDecodeError, struct.error) as e:
        raise ValueError(f"malformed SSH signature: {e}") from None
    return ParsedSignature(pub, ns.decode(errors="replace"), hash_alg.decode(errors="replace"), algorithm, raw)


def _verify_raw(key: Any, key_type: str, algorithm: str, raw: bytes, data: bytes) -> None:
    """Raises InvalidSignature/ValueError when `raw` is not `key`'s signature of `data`."""
    if isinstance(key, ed25519.Ed25519PublicKey):
        if algorithm != "ssh-ed25519":
            raise ValueError(f"signature algorithm {algorithm} does not match key type {key_type}")
        key.verify(raw, data)
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if algorithm != key_type or algorithm not in _ECDSA:
            raise ValueError(f"signature algorithm {algorithm} does not match key type {key_type}")
        rr = _Reader(raw)
        r, s = rr.mpint(), rr.mpint()
        key.verify(encode_dss_signature(r, s), data, ec.ECDSA(_ECDSA[algorithm][1]()))
    elif isinstance(key, rsa.RSAPublicKey):
        algs = {"rsa-sha2-512": hashes.SHA512, "rsa-sha2-256": hashes.SHA256}  # never SHA-1 ssh-rsa
        if algorithm not in algs:
            raise ValueError(f"RSA signature algorithm {algorithm} is not accepted (use rsa-sha2-512)")
        key.verify(raw, data, padding.PKCS1v15(), algs[algorithm]())
    else:
        raise ValueError(f"unsupported key type {key_type}")


def verify_signature(message: bytes, armored: str, public_key: str, namespace: str = NAMESPACE) -> None:
    """Pure SSHSIG check, like `ssh-keygen -Y verify` with one allowed signer. Raises ValueError."""
    sig = parse_signature(armored)
    expected = public_key_blob(public_key)
    if sig.public_key != expected:
        raise ValueError(f"signed by another key ({fingerprint(sig.public_key)}, expected {fingerprint(expected)})")
    if sig.namespace != namespace:
        raise ValueError(f"signature is for namespace {sig.namespace!r}, not {namespace!r}")
    if sig.hash_alg not in ("sha512", "sha256"):
        raise ValueError(f"signature hash {sig.hash_alg!r} is not accepted")
    digest = hashlib.new(sig.hash_alg, message).digest()
    data = b"SSHSIG" + _string(namespace.encode()) + _string(b"") + _string(sig.hash_alg.encode()) + _string(digest)
    try:
        with workflow.unsafe.imports_passed_through():  # cryptography's lazy imports must not enter the sandbox
            _verify_raw(_load_public(expected), _Reader(expected).string().decode(), sig.algorithm, sig.raw, data)
    except InvalidSignature:
        raise ValueError(
            "signature does not match what was signed (signed for another run/gate/action, or altered)"
        ) from None


# -- what is signed ------------------------------------------------------------------------------------


def _utc(at: datetime) -> str:
    if at.tzinfo is None:
        at = at.replace(tzinfo=timezone.utc)
    return at.astimezone(timezone.utc).isoformat(timespec="microseconds")


def _canonical(fields: dict[str, Any]) -> bytes:
    # Sorted keys, no spaces, ASCII: both ends produce the same bytes from the same fields.
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def request_payload(*, workflow_id: str, run_id: str, gate_id: str | None, action: str, by: str, reason: str,
                    at: datetime, full: bool = False) -> bytes:
    """The bytes a person signs to act on one run (and gate): approve, reject, pause, abort, promote..."""
    return _canonical({"opsflow": 1, "workflow_id": workflow_id, "run_id": run_id, "gate": gate_id or "",
                       "action": action, "by": by, "reason": reason, "full": bool(full), "at": _utc(at)})


def start_payload(*, environment: str, procedure: str, requester: str, reason: str, at: datetime,
                  input_sha256: str | None = None, nonce: str | None = None) -> bytes:
    """The bytes a requester signs to start a procedure (the run does not exist yet). Version 2 binds the whole
    input (its canonical sha256: region, dry run, image, everything) and a single-use nonce; version 1 (without
    them) is only accepted from histories recorded before the worker held the rules."""
    fields = {"opsflow": 1, "action": "start", "environment": environment, "procedure": procedure,
              "by": requester, "reason": reason, "at": _utc(at)}
    if input_sha256 is not None or nonce is not None:
        fields.update({"opsflow": 2, "input": input_sha256 or "", "nonce": nonce or ""})
    return _canonical(fields)


def schedule_payload(*, schedule_id: str, procedure: str, environment: str, input_sha256: str, by: str,
                     at: datetime) -> bytes:
    """The bytes an operator signs to create a Schedule: every run it launches is bound to that schedule's id,
    the procedure, the environment and the very input (no freshness: a schedule fires for months)."""
    return _canonical({"opsflow": 2, "action": "schedule", "schedule_id": schedule_id, "procedure": procedure,
                       "environment": environment, "input": input_sha256, "by": by, "at": _utc(at)})


# The launcher hands a scheduled procedure the schedule's signed creation in the child's memo.
SCHEDULE_MEMO = "opsflow-schedule"


def check_schedule(inventory: Any, *, procedure: str, record: dict[str, Any], parent_workflow_id: str,
                   input_sha256: str, dry_run: bool, schedulable: frozenset[str]) -> SignedAction | None:
    """A procedure launched by a Schedule (workflows/scheduled.py): only a schedulable kind (or a dry run), from
    the schedule it names, created by an operator of the procedure, signed over this input where signatures are
    required. Raises ValueError naming what is wrong."""
    if procedure not in schedulable and not dry_run:
        raise ValueError(f"a Schedule may run {', '.join(sorted(schedulable))} or dry runs, not a {procedure}")
    schedule_id, by = str(record.get("schedule_id") or ""), str(record.get("by") or "")
    if not schedule_id or not parent_workflow_id.startswith(f"{schedule_id}-"):
        raise ValueError(f"launched by {parent_workflow_id}, which no Schedule {schedule_id or '(none named)'} started")
    check_operator(getattr(inventory, "operators", None) or {}, procedure, by)
    keyring = Keyring.of(inventory)
    signature, signed_at = record.get("signature"), record.get("signed_at")
    if not signature:
        if keyring.require_signed:
            raise ValueError(f"the Schedule {schedule_id} was not signed by its creator; this environment requires it "
                             "(opsflow schedule create ... --as NAME signs)")
        return None
    key = keyring.key_of(by)
    if not key:
        raise ValueError(f"no SSH public key for {by!r}, who created the Schedule {schedule_id}")
    try:
        at = (
            signed_at
            if isinstance(signed_at, datetime)
            else datetime.fromisoformat(str(signed_at).replace("Z", "+00:00"))
        )
    except ValueError:
        raise ValueError(f"the Schedule {schedule_id}'s signed_at {signed_at!r} is not an ISO time") from None
    message = schedule_payload(schedule_id=schedule_id, procedure=procedure, environment=inventory.environment,
                               input_sha256=input_sha256, by=by, at=at)
    try:
        verify_signature(message, signature, key)
    except ValueError as e:
        raise ValueError(f"the Schedule {schedule_id}'s signature by {by!r} does not hold for this run: {e}") from None
    return SignedAction(action="schedule", by=by, signed_at=at, signature=signature, environment=inventory.environment,
                        procedure=procedure, input_sha256=input_sha256, nonce=schedule_id)


# -- verification in a workflow validator --------------------------------------------------------------


class KeyPolicy(Protocol):
    """What verify_request needs from the inventory: ApprovalPolicy has both."""

    require_signed: bool

    def key_of(self, name: str) -> str | None: ...


def _check_fresh(signed_at: datetime | str | None, now: datetime) -> datetime:
    if signed_at is None:
        raise ValueError("missing signature time (signed_at)")
    if isinstance(signed_at, str):
        try:
            signed_at = datetime.fromisoformat(signed_at.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"signed_at {signed_at!r} is not an ISO time") from None
    if signed_at.tzinfo is None:
        signed_at = signed_at.replace(tzinfo=timezone.utc)
    if abs(now - signed_at) > FRESHNESS:
        raise ValueError(f"stale signature: signed at {_utc(signed_at)}, the workflow's time is {_utc(now)} "
                         f"(a signature is good for {FRESHNESS.total_seconds() / 60:.0f} minutes)")
    return signed_at


def request_key(req: Any, *, workflow_id: str, run_id: str, gate_id: str | None, action: str) -> str | None:
    """What a replay is recognised by: the hash of what was signed, not of the signature's text (another armor
    of the same blob, or an ECDSA signature re-made as (r, n-s), signs the same request)."""
    signed_at = getattr(req, "signed_at", None)
    if not getattr(req, "signature", None) or signed_at is None:
        return None
    message = request_payload(workflow_id=workflow_id, run_id=run_id, gate_id=gate_id, action=action, by=req.by,
                              reason=getattr(req, "reason", ""), at=signed_at, full=getattr(req, "full", False))
    return "sha256:" + hashlib.sha256(message).hexdigest()


def verify_request(policy: KeyPolicy, req: Any, *, workflow_id: str, run_id: str, gate_id: str | None, action: str,
                   now: datetime, used: Iterable[str] = ()) -> None:
    """Raise ValueError unless `req` (a kernel Request) is signed by the inventory's key for `req.by`, for
    this workflow run, gate and action, recently. With signatures not required, an unsigned request passes
    (and a signed one is still checked: a wrong signature is never accepted). `used`: signatures already
    accepted by this run, so the same one cannot be sent twice."""
    signature = getattr(req, "signature", None)
    if not signature:
        if getattr(policy, "require_signed", False):
            raise ValueError(f"missing signature: this environment requires signed requests; sign with "
                             f"ssh-agent or --key PATH as {req.by!r}")
        return
    key = policy.key_of(req.by)
    if not key:
        raise ValueError(f"no SSH public key for {req.by!r} in the inventory: the signature cannot be checked")
    signed_at = _check_fresh(getattr(req, "signed_at", None), now)
    used = set(used)
    replay_key = request_key(req, workflow_id=workflow_id, run_id=run_id, gate_id=gate_id, action=action)
    if signature in used or replay_key in used:
        raise ValueError("replayed signature: this signed request was already accepted")
    message = request_payload(workflow_id=workflow_id, run_id=run_id, gate_id=gate_id, action=action, by=req.by,
                              reason=getattr(req, "reason", ""), at=signed_at, full=getattr(req, "full", False))
    try:
        verify_signature(message, signature, key)
    except ValueError as e:
        if "does not match" in str(e):
            raise ValueError(
                f"signature of {req.by!r} does not match this request: signed for another run/gate/action, "
                f"or the reason was altered (workflow {workflow_id}, run {run_id}, gate {gate_id or '-'}, "
                f"action {action})"
            ) from None
        raise ValueError(f"{e} (request by {req.by!r})") from None


def verify_start(policy: KeyPolicy, *, environment: str, procedure: str, requester: str, reason: str,
                 signature: str | None, signed_at: datetime | str | None, now: datetime,
                 input_sha256: str | None = None, nonce: str | None = None) -> None:
    """The start-time twin of verify_request (the workflow calls it first thing; a failure refuses the start)."""
    if not signature:
        if policy.require_signed:
            raise ValueError(
                f"missing signature: this environment requires the requester ({requester!r}) to sign the start"
            )
        return
    key = policy.key_of(requester)
    if not key:
        raise ValueError(f"no SSH public key for requester {requester!r} in the inventory")
    at = _check_fresh(signed_at, now)
    message = start_payload(environment=environment, procedure=procedure, requester=requester, reason=reason, at=at,
                            input_sha256=input_sha256, nonce=nonce)
    try:
        verify_signature(message, signature, key)
    except ValueError as e:
        if "does not match" in str(e):
            raise ValueError(f"the start signature of {requester!r} does not match this start "
                             f"({procedure} in {environment}, reason {reason!r}"
                             + (", this very input: a signature made for another input or a dry run starts nothing"
                                if input_sha256 else "") + ")") from None
        raise ValueError(f"{e} (requester {requester!r})") from None


def check_operator(operators: dict[str, list[Any]], procedure: str, requester: str) -> None:
    """`operators:` in the inventory: procedure -> who may start it (no entry: anyone)."""
    allowed = operators.get(procedure)
    if not allowed:
        return
    names = [
        a if isinstance(a, str) else a.get("name", "?") if isinstance(a, dict) else getattr(a, "name", str(a))
        for a in allowed
    ]
    if requester not in names:
        raise ValueError(f"{requester!r} may not start {procedure}; operators for {procedure}: {', '.join(names)}")


# -- signing (CLI side) --------------------------------------------------------------------------------


def _sign_with_private_key(key: Any, data: bytes) -> tuple[bytes, bytes]:
    """-> (public key blob, SSH signature blob) for `data`."""
    pub_line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    blob = base64.b64decode(pub_line.split()[1])
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return blob, _string(b"ssh-ed25519") + _string(key.sign(data))
    if isinstance(key, ec.EllipticCurvePrivateKey):
        kind = pub_line.split()[0].decode()
        if kind not in _ECDSA:
            raise SigningError(f"unsupported ECDSA curve {kind}")
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(_ECDSA[kind][1]())))
        return blob, _string(kind.encode()) + _string(_mpint(r) + _mpint(s))
    if isinstance(key, rsa.RSAPrivateKey):
        return blob, _string(b"rsa-sha2-512") + _string(key.sign(data, padding.PKCS1v15(), hashes.SHA512()))
    raise SigningError(f"unsupported private key type {type(key).__name__}")


def load_private_key(path: str | Path) -> Any:
    p = Path(path).expanduser()
    try:
        data = p.read_bytes()
    except OSError as e:
        raise SigningError(f"--key {p}: cannot read ({e.strerror})") from None
    for loader in (serialization.load_ssh_private_key, serialization.load_pem_private_key):
        try:
            return loader(data, password=None)
        except TypeError:
            raise SigningError(
                f"--key {p} is encrypted: add it to ssh-agent (ssh-add {p}) and sign through the agent"
            ) from None
        except ValueError:
            continue
    raise SigningError(f"--key {p} is not an OpenSSH or PEM private key")


class _Agent:
    """The few ssh-agent protocol messages signing needs (draft-miller-ssh-agent)."""

    REQUEST_IDENTITIES, IDENTITIES_ANSWER, SIGN_REQUEST, SIGN_RESPONSE = 11, 12, 13, 14
    RSA_SHA2_512 = 4

    def __init__(self, sock_path: str | None = None):
        self.path = sock_path or os.environ.get("SSH_AUTH_SOCK")
        if not self.path:
            raise SigningError(
                "no ssh-agent (SSH_AUTH_SOCK is not set): start one and ssh-add your key, or pass --key PATH"
            )

    def _call(self, message: bytes) -> _Reader:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(30)  # a hardware key may wait for a touch
                s.connect(self.path)
                s.sendall(_string(message))
                head = self._recv(s, 4)
                return _Reader(self._recv(s, struct.unpack(">I", head)[0]))
        except OSError as e:
            raise SigningError(f"ssh-agent at {self.path}: {e}") from None

    @staticmethod
    def _recv(s: socket.socket, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = s.recv(n - len(buf))
            if not chunk:
                raise SigningError("ssh-agent closed the connection")
            buf += chunk
        return buf

    def identities(self) -> list[tuple[bytes, str]]:
        r = self._call(bytes([self.REQUEST_IDENTITIES]))
        if r.take(1)[0] != self.IDENTITIES_ANSWER:
            raise SigningError("ssh-agent refused to list keys")
        return [(r.string(), r.string().decode(errors="replace")) for _ in range(r.uint32())]

    def sign(self, blob: bytes, data: bytes) -> bytes:
        flags = self.RSA_SHA2_512 if _Reader(blob).string() == b"ssh-rsa" else 0
        r = self._call(bytes([self.SIGN_REQUEST]) + _string(blob) + _string(data) + struct.pack(">I", flags))
        if r.take(1)[0] != self.SIGN_RESPONSE:
            raise SigningError(
                f"ssh-agent refused to sign with {fingerprint(blob)} (key not loaded, or confirmation denied)"
            )
        return r.string()


def sign(message: bytes, *, key_path: str | Path | None = None, public_key: str | None = None,
         agent_socket: str | None = None, namespace: str = NAMESPACE) -> str:
    """SSHSIG-sign `message` (armored, like `ssh-keygen -Y sign`). With `key_path`: that private key file.
    Without: ssh-agent, using the agent key matching `public_key` (the inventory's key for the signer), or
    the agent's only key."""
    data = _signed_data(message, namespace)
    if key_path is not None:
        pub, sig = _sign_with_private_key(load_private_key(key_path), data)
        if public_key and pub != public_key_blob(public_key):
            raise SigningError(f"--key {key_path} is not the inventory's key for this person "
                               f"({fingerprint(pub)}, inventory has {fingerprint(public_key)})")
    else:
        agent = _Agent(agent_socket)
        keys = agent.identities()
        if public_key:
            wanted = public_key_blob(public_key)
            if wanted not in [b for b, _ in keys]:
                raise SigningError(
                    f"ssh-agent does not hold the inventory's key {fingerprint(wanted)}: ssh-add it, or pass --key PATH"
                )
            pub = wanted
        elif len(keys) == 1:
            pub = keys[0][0]
        else:
            raise SigningError(
                f"ssh-agent holds {len(keys)} keys and the inventory names none for this person: pass --key PATH"
            )
        sig = agent.sign(pub, data)
    blob = (
        b"SSHSIG"
        + struct.pack(">I", 1)
        + _string(pub)
        + _string(namespace.encode())
        + _string(b"")
        + _string(_HASH.encode())
        + _string(sig)
    )
    return _armor(blob)


@dataclass
class Signer:
    """The CLI's signing glue: who signs, with what. `Signer.for_cli(...)` returns None when no signature is
    wanted (signatures not required by the inventory and no --key given)."""

    name: str
    key_path: str | None = None
    public_key: str | None = None
    agent_socket: str | None = None

    @classmethod
    def for_cli(cls, policy: Any, name: str, key_path: str | None) -> "Signer | None":
        if key_path is None and not getattr(policy, "require_signed", False):
            return None
        public_key = policy.key_of(name) if hasattr(policy, "key_of") else None
        return cls(name=name, key_path=key_path, public_key=public_key)

    def _sign(self, message: bytes) -> str:
        return sign(message, key_path=self.key_path, public_key=self.public_key, agent_socket=self.agent_socket)

    def sign_request(self, *, workflow_id: str, run_id: str, gate_id: str | None, action: str, reason: str = "",
                     full: bool = False, at: datetime | None = None) -> dict[str, Any]:
        """-> the fields to put into the Request: {'signature': ..., 'signed_at': ...}."""
        at = at or datetime.now(timezone.utc)
        message = request_payload(workflow_id=workflow_id, run_id=run_id, gate_id=gate_id, action=action,
                                  by=self.name, reason=reason, at=at, full=full)
        return {"signature": self._sign(message), "signed_at": at}

    def sign_schedule(self, *, schedule_id: str, procedure: str, environment: str, input_sha256: str,
                      at: datetime | None = None) -> dict[str, Any]:
        at = at or datetime.now(timezone.utc)
        message = schedule_payload(schedule_id=schedule_id, procedure=procedure, environment=environment,
                                   input_sha256=input_sha256, by=self.name, at=at)
        return {"signature": self._sign(message), "signed_at": _utc(at)}

    def sign_start(self, *, environment: str, procedure: str, reason: str = "", at: datetime | None = None,
                   input_sha256: str | None = None, nonce: str | None = None) -> dict[str, Any]:
        at = at or datetime.now(timezone.utc)
        message = start_payload(environment=environment, procedure=procedure, requester=self.name, reason=reason, at=at,
                                input_sha256=input_sha256, nonce=nonce)
        signed: dict[str, Any] = {"signature": self._sign(message), "signed_at": at}
        if input_sha256 is not None or nonce is not None:
            signed.update({"input_sha256": input_sha256 or "", "nonce": nonce or ""})
        return signed


# -- records in the report, and the inventory's keys ---------------------------------------------------

from pydantic import BaseModel  # noqa: E402 - kept next to the records that use it


class SignedAction(BaseModel):
    """One accepted signed request, as the report keeps it: enough to re-check it offline with the public keys."""

    action: str
    by: str
    reason: str = ""
    signed_at: datetime
    signature: str
    workflow_id: str = ""
    run_id: str = ""
    gate: str | None = None
    full: bool = False
    # start only:
    environment: str = ""
    procedure: str = ""
    input_sha256: str | None = None  # version 2 starts: the input's digest and the nonce
    nonce: str | None = None

    def payload(self) -> bytes:
        if self.action == "schedule":  # nonce: the schedule id
            return schedule_payload(
                schedule_id=self.nonce or "",
                procedure=self.procedure,
                environment=self.environment,
                input_sha256=self.input_sha256 or "",
                by=self.by,
                at=self.signed_at,
            )
        if self.action == "start":
            return start_payload(
                environment=self.environment,
                procedure=self.procedure,
                requester=self.by,
                reason=self.reason,
                at=self.signed_at,
                input_sha256=self.input_sha256,
                nonce=self.nonce,
            )
        return request_payload(workflow_id=self.workflow_id, run_id=self.run_id, gate_id=self.gate, action=self.action,
                               by=self.by, reason=self.reason, at=self.signed_at, full=self.full)


def _entries(group: Any) -> list[Any]:
    if isinstance(group, dict):
        return [e for members in group.values() for e in (members or [])]
    return list(group or [])


def inventory_keys(inventory: Any) -> dict[str, str]:
    """name -> SSH public key, from the approvers (plain list or role groups) and the operators."""
    keys: dict[str, str] = {}
    approval = getattr(inventory, "approval", None)
    sources = _entries(getattr(approval, "approvers", []))
    for members in (getattr(inventory, "operators", None) or {}).values():
        sources += list(members or [])
    for e in sources:
        name = e.get("name") if isinstance(e, dict) else getattr(e, "name", None)
        key = e.get("ssh_key") if isinstance(e, dict) else getattr(e, "ssh_key", None)
        if name and key:
            keys.setdefault(name, key)
    return keys


@dataclass
class Keyring:
    """A KeyPolicy over the whole inventory (approvers and operators), for verify_request/verify_start."""

    keys: dict[str, str]
    require_signed: bool = False

    @classmethod
    def of(cls, inventory: Any, policy: Any = None) -> "Keyring":
        """The inventory's keys (approvers, operators) plus a gate's own policy (e.g. a canary's promote gate);
        signatures are required when the inventory's approval policy or that gate's policy says so."""
        keys = inventory_keys(inventory)
        required = bool(getattr(getattr(inventory, "approval", None), "require_signed", False))
        if policy is not None:
            for name, key in inventory_keys(type("_", (), {"approval": policy})()).items():
                keys.setdefault(name, key)
            required = required or bool(getattr(policy, "require_signed", False))
        return cls(keys, required)

    def key_of(self, name: str) -> str | None:
        return self.keys.get(name)


def verify_records(records: Iterable[SignedAction | dict], keyring: KeyPolicy) -> list[tuple[SignedAction, str | None]]:
    """Re-check recorded signatures offline (no freshness: the time is part of what was signed).
    -> [(record, None if good else why not)]."""
    out = []
    for r in records:
        rec = r if isinstance(r, SignedAction) else SignedAction.model_validate(r)
        key = keyring.key_of(rec.by)
        if not key:
            out.append((rec, f"no public key for {rec.by!r} in the inventory"))
            continue
        try:
            verify_signature(rec.payload(), rec.signature, key)
            out.append((rec, None))
        except ValueError as e:
            out.append((rec, str(e)))
    return out


# -- the start of a procedure --------------------------------------------------------------------------

# The requester's start signature travels in the workflow's memo (not its input), so every procedure gets it
# the same way without a field in each input model. A memo is in the history like the input: no secret.
START_MEMO = "opsflow-start-signature"


def start_memo(signed: dict[str, Any]) -> dict[str, Any]:
    """Signer.sign_start(...) -> the memo to start the workflow with ({} when nothing was signed)."""
    if not signed:
        return {}
    memo = {"signature": signed["signature"], "signed_at": _utc(signed["signed_at"])}
    if "nonce" in signed:
        memo.update({"input_sha256": signed["input_sha256"], "nonce": signed["nonce"]})
    return {START_MEMO: memo}


def check_start(inventory: Any, *, procedure: str, requester: str, reason: str, memo: dict[str, Any] | None,
                now: datetime, input_sha256: str | None = None) -> SignedAction | None:
    """What the workflow checks first (a ValueError refuses the start): the requester is an operator for this
    procedure, and when signatures are required, signed the start. `input_sha256`: the digest of the input the
    workflow received; given, a signature must bind it (version 2). -> the record for the report, if signed."""
    check_operator(getattr(inventory, "operators", None) or {}, procedure, requester)
    memo = memo or {}
    signature, signed_at = memo.get("signature"), memo.get("signed_at")
    nonce = memo.get("nonce") if input_sha256 is not None else None
    if signature and input_sha256 is not None and not nonce:
        raise ValueError("the start signature binds no input (an older CLI?): sign the start again with this opsflow")
    verify_start(Keyring.of(inventory), environment=inventory.environment, procedure=procedure, requester=requester,
                 reason=reason, signature=signature, signed_at=signed_at, now=now,
                 input_sha256=input_sha256 if signature else None, nonce=nonce)
    if not signature:
        return None
    return SignedAction(action="start", by=requester, reason=reason, signed_at=signed_at, signature=signature,
                        environment=inventory.environment, procedure=procedure,
                        input_sha256=input_sha256 if nonce else None, nonce=nonce)
