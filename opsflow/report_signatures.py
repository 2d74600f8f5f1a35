"""Checking a report's signatures offline against an inventory's public keys: the start (or the Schedule that
launched it), every decision at a gate, every control event, and those of child procedures (a failback's failover).
`opsflow verify-report` prints the result; `opsflow report ID --html` shows it beside each approval and event."""

from __future__ import annotations

from dataclasses import dataclass, field

from opsflow.signing import Keyring, SignedAction, verify_records


def report_records(report: dict) -> tuple[list[SignedAction], list[str]]:
    """The signed requests a report recorded (start, decisions at gates, control events), and the people's
    actions recorded without a signature. Reports of child procedures (a failback's failover) are included."""
    records: list[SignedAction] = [SignedAction.model_validate(r) for r in report.get("signatures") or []]
    unsigned: list[str] = []
    wid, run_id = report.get("workflow_id", ""), report.get("run_id", "")
    if report.get("start_signature") and report.get("schedule_id"):  # launched by a Schedule its creator signed
        records.append(SignedAction(action="schedule", by=report.get("scheduled_by") or "",
                                    signed_at=report.get("start_signed_at"), signature=report["start_signature"],
                                    environment=report.get("environment", ""), procedure=report.get("procedure", ""),
                                    input_sha256=report.get("start_input_sha256"), nonce=report["schedule_id"]))
    elif report.get("start_signature"):
        records.append(SignedAction(action="start", by=report.get("requester", ""), reason=report.get("reason", ""),
                                    signed_at=report.get("start_signed_at"), signature=report["start_signature"],
                                    environment=report.get("environment", ""), procedure=report.get("procedure", ""),
                                    input_sha256=report.get("start_input_sha256"), nonce=report.get("start_nonce")))
    for d in report.get("approvals") or []:
        action = "approve" if d.get("approved") else "reject"
        if d.get("signature"):
            records.append(SignedAction(action=action, by=d["by"], reason=d.get("reason", ""),
                                        signed_at=d.get("signed_at"), signature=d["signature"], workflow_id=wid,
                                        run_id=run_id, gate=d.get("gate"), full=d.get("full", False)))
        else:
            unsigned.append(f"{action} by {d.get('by')} at gate {d.get('gate')}")
    for e in report.get("events") or []:
        if e.get("signature"):
            records.append(SignedAction(action=e["action"], by=e["by"], reason=e.get("reason", ""),
                                        signed_at=e.get("signed_at"), signature=e["signature"], workflow_id=wid,
                                        run_id=run_id, gate=e.get("gate"), full=e.get("full", False)))
        elif e.get("by") not in (None, "opsflow", "system"):
            unsigned.append(f"{e.get('action')} by {e.get('by')}")
    for value in report.values():
        if isinstance(value, dict) and "approvals" in value and "workflow_id" in value:
            child_records, child_unsigned = report_records(value)
            records += child_records
            unsigned += child_unsigned
    return records, unsigned


@dataclass
class ReportCheck:
    """What checking a report's signatures found: each signed record with None (good) or why it is not;
    people's actions without a signature; what a doctored report would leave out (`problems`)."""

    results: list[tuple[SignedAction, str | None]] = field(default_factory=list)
    unsigned: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    require_signed: bool = False

    @property
    def bad(self) -> list[tuple[SignedAction, str | None]]:
        return [(r, why) for r, why in self.results if why]

    @property
    def ok(self) -> bool:
        """No bad signature, nothing left out, and no unsigned action where signatures are required."""
        return not self.bad and not self.problems and not (self.unsigned and self.require_signed)

    def status_of(self, signature: str | None) -> tuple[bool, str] | None:
        """A recorded signature's verdict: (True, '') verified, (False, why) not; None: not among those checked."""
        for record, why in self.results:
            if signature and record.signature == signature:
                return (why is None, why or "")
        return None


def check_report(report: dict, keyring: Keyring) -> ReportCheck:
    """Re-check every signature a report (its JSON form) recorded against `keyring`. Raises ValueError/KeyError/
    TypeError/AttributeError (pydantic's ValidationError is a ValueError) when a signature record is malformed."""
    records, unsigned = report_records(report)
    problems = []
    if keyring.require_signed and not report.get("start_signature"):
        problems.append("the start is not signed (this environment requires it)")
    decided = report.get("approval")
    if decided and decided not in (report.get("approvals") or []):
        problems.append(f"the approval by {decided.get('by')} is not among the recorded approvals")
    return ReportCheck(verify_records(records, keyring), unsigned, problems, keyring.require_signed)
