"""The worker's rules and the digest a requester's copy is compared by (opsflow/rules.py, activities/rules.py)."""

from __future__ import annotations

import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

import yaml

from activities.rules import RULEBOOK, Rulebook, rules_for
from opsflow.inventory import Inventory, load_inventory
from opsflow.rules import differences, digest_of, input_digest
from tests.workflow.conftest import inventory_dict

DATA = Path(__file__).parent / "data"


def write(tmp_path: Path, name: str, **overrides) -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(inventory_dict(environment="prod", **overrides)))
    return p


def test_the_same_file_has_the_same_digest_and_an_edit_is_named(tmp_path):
    worker = load_inventory(write(tmp_path, "worker.yaml"))
    assert digest_of(load_inventory(write(tmp_path, "copy.yaml"))).sha256 == digest_of(worker).sha256
    mallory = load_inventory(write(tmp_path, "mine.yaml", approval={"approvers": ["alice", "bob", "mallory"]},
                                   operators={"failover": ["mallory"]}))
    diffs = differences(digest_of(worker), digest_of(mallory))
    assert diffs == ["approval.approvers", "operators.failover"]  # named, as an honest person needs to update
    dsn = inventory_dict(environment="prod")
    dsn["regions"]["eastus"]["database"]["dsn"] = "host=evil dbname=app user=ops"
    changed = Inventory.model_validate(dsn)
    assert differences(digest_of(worker), digest_of(changed)) == ["regions.eastus.database.dsn"]


def test_an_ics_calendar_is_compared_by_its_file_not_the_day_it_was_expanded(tmp_path):
    shutil.copy(DATA / "freezes.ics", tmp_path / "freezes.ics")
    from tests.workflow.test_canary_workflow import ROLLOUT

    raw = inventory_dict(environment="prod", rollout={**ROLLOUT, "ics": ["freezes.ics"]})
    ctx = {"base_dir": str(tmp_path)}
    monday = Inventory.model_validate(raw, context={**ctx, "now": datetime(2026, 12, 7, tzinfo=timezone.utc)})
    friday = Inventory.model_validate(raw, context={**ctx, "now": datetime(2026, 12, 11, tzinfo=timezone.utc)})
    assert monday.rollout.ics[0].covered_from != friday.rollout.ics[0].covered_from
    assert digest_of(monday).sha256 == digest_of(friday).sha256
    (tmp_path / "freezes.ics").write_text((DATA / "freezes.ics").read_text().replace("SUMMARY:", "SUMMARY:x"))
    edited = Inventory.model_validate(raw, context=ctx)
    assert differences(digest_of(monday), digest_of(edited)) == ["rollout.ics"]


def test_the_worker_refuses_an_environment_it_does_not_hold_and_a_stale_copy(tmp_path):
    book = Rulebook()
    path = write(tmp_path, "prod.yaml")
    (worker,) = book.load([path])
    RULEBOOK.add(worker)
    stale = Inventory.model_validate(inventory_dict(environment="prod", failover={"drain": "1s"}))
    refused = rules_for("prod", digest_of(stale))
    assert (
        refused.inventory is None and "failover.drain" in refused.refusal and "Nothing was changed" in refused.refusal
    )
    assert rules_for("prod", digest_of(worker)).inventory == worker
    assert "holds no inventory for environment 'nowhere'" in rules_for("nowhere", None).refusal


def test_the_worker_reads_its_file_again_when_it_changes(tmp_path):
    book = Rulebook()
    path = write(tmp_path, "prod.yaml")
    book.load([path])
    path.write_text(yaml.safe_dump(inventory_dict(environment="prod", approval={"approvers": ["alice", "carol"]})))
    os.utime(path, (1, 1))  # a new mtime, however fast the test ran
    assert book.get("prod").approval.names() == ["alice", "carol"]
    path.write_text("approval: [")  # a broken edit keeps the last good rules
    os.utime(path, (2, 2))
    assert book.get("prod").approval.names() == ["alice", "carol"]


def test_an_input_digest_binds_every_field_but_what_the_client_adds():
    from workflows.failover import FailoverInput

    inv = Inventory.model_validate(inventory_dict(environment="prod"))
    real = FailoverInput(inventory=inv, to_region="westeurope", requester="alice").without_rules(inv)
    dry = real.model_copy(update={"dry_run": True})
    assert input_digest(real, {"preempted"}) != input_digest(dry, {"preempted"})
    preempted = real.model_copy(update={"preempted": ["opsflow-prod (drill, cancelled)"]})
    assert input_digest(real, {"preempted"}) == input_digest(preempted, {"preempted"})
