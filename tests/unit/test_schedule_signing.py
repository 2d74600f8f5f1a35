"""A Schedule's signed creation (opsflow/signing.py check_schedule): what the launcher's runs are checked against."""

from __future__ import annotations

import pytest

from opsflow.inventory import Inventory
from opsflow.procedures import SCHEDULABLE
from opsflow.signing import Signer, check_schedule
from tests.helpers import ssh_key_pair
from tests.workflow.conftest import inventory_dict


@pytest.fixture
def signed(tmp_path):
    path, pub = ssh_key_pair(tmp_path, "alice")
    inv = Inventory.model_validate(
        inventory_dict(
            environment="prod",
            approval={"approvers": [{"name": "alice", "ssh_key": pub}], "require_signed": True},
            operators={"drill": [{"name": "alice", "ssh_key": pub}]},
        )
    )
    sig = Signer(name="alice", key_path=path).sign_schedule(
        schedule_id="opsflow-prod-monthly", procedure="drill", environment="prod", input_sha256="ab" * 32)
    return inv, {"schedule_id": "opsflow-prod-monthly", "by": "alice", **sig}


def check(inv, record, **kw):
    args = dict(procedure="drill", record=record, parent_workflow_id="opsflow-prod-monthly-2026-12-01T03:00:00Z",
                input_sha256="ab" * 32, dry_run=False, schedulable=SCHEDULABLE)
    return check_schedule(inv, **{**args, **kw})


def test_a_signed_schedule_launches_what_it_was_signed_for(signed):
    inv, record = signed
    assert check(inv, record).by == "alice"


@pytest.mark.parametrize("change, error", [
    (dict(input_sha256="cd" * 32), "does not hold for this run"),  # another input under the same schedule
    (dict(parent_workflow_id="evil-1"), "which no Schedule opsflow-prod-monthly started"),
    (dict(procedure="failover"), "not a failover"),
])
def test_anything_else_is_refused(signed, change, error):
    inv, record = signed
    with pytest.raises(ValueError, match=error):
        check(inv, record, **change)


def test_an_unsigned_or_foreign_schedule_is_refused(signed):
    inv, record = signed
    with pytest.raises(ValueError, match="was not signed"):
        check(inv, {**record, "signature": None})
    with pytest.raises(ValueError, match="'mallory' may not start drill"):
        check(inv, {**record, "by": "mallory"})
    with pytest.raises(ValueError, match="does not hold"):
        check(inv, {**record, "schedule_id": "opsflow-prod-m"}, parent_workflow_id="opsflow-prod-m-1")
