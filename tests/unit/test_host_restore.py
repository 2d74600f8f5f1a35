"""The host-pitr drill method's bookkeeping on a real (local) host: the base backups and the archive found or a clear
refusal, nothing passed that a remote shell would split, scratch directories listed and removed by environment only.
The restore itself runs on the lab (tests/integration/test_host_drill_lab.py)."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone

import pytest
from temporalio.exceptions import ApplicationError

from activities.postgres.host_restore import MARK, HostPointInTimeRestore
from opsflow.inventory import Inventory
from opsflow.models import RegionTarget, RestoreRequest
from tests.workflow.conftest import inventory_dict


def provider(tmp_path, environment: str = "prod", run_id: str = "run-1") -> HostPointInTimeRestore:
    for d in ("backups", "wal", "scratch"):
        (tmp_path / d).mkdir(exist_ok=True)
    inv = Inventory.model_validate(inventory_dict(environment=environment, drill={"method": "host-pitr", "host": {
        "base_backups": str(tmp_path / "backups"), "wal_archive": str(tmp_path / "wal"),
        "scratch_dir": str(tmp_path / "scratch"), "command_timeout": "10s"}}))
    return HostPointInTimeRestore(RestoreRequest(source=RegionTarget.of(inv, "eastus"), drill=inv.drill,
                                                 method="host-pitr", scratch_name="opsflow-drill-aaaa0001",
                                                 environment=environment, run_id=run_id))


def test_no_base_backup_is_a_clear_refusal(tmp_path):
    p = provider(tmp_path)
    (tmp_path / "backups" / "not-a-backup").mkdir()  # no backup_manifest: not a (complete) base backup
    with pytest.raises(ApplicationError) as e:
        p.window()
    assert e.value.type == "NoBaseBackup" and e.value.non_retryable
    assert f"no base backup under {tmp_path / 'backups'}" in e.value.message
    assert list((tmp_path / "scratch").iterdir()) == []


def test_backups_are_the_directories_with_a_manifest_and_end_when_it_was_written(tmp_path):
    p = provider(tmp_path)
    for name, mtime in (("20251201T000000Z", 1_764_547_200), ("20251202T000000Z", 1_764_633_600)):
        (tmp_path / "backups" / name).mkdir()
        (tmp_path / "backups" / name / "backup_manifest").write_text("{}")
        os.utime(tmp_path / "backups" / name / "backup_manifest", (mtime, mtime))
    (tmp_path / "backups" / ".20251203T000000Z.partial-1").mkdir()  # being written: never a candidate
    found = p.backups()
    assert found == {"20251201T000000Z": datetime.fromtimestamp(1_764_547_200, timezone.utc),
                     "20251202T000000Z": datetime.fromtimestamp(1_764_633_600, timezone.utc)}
    with pytest.raises(ApplicationError) as e:  # an archive without a commit: no restorable window
        p.window()
    assert e.value.type == "NoArchivedCommit" and "is archive_command archiving there?" in e.value.message
    with pytest.raises(ApplicationError) as e:  # a point before every backup ended
        p.start("opsflow-drill-aaaa0001", datetime(2025, 11, 30, tzinfo=timezone.utc))
    assert e.value.type == "NoBaseBackup" and "ended by 2025-11-30" in e.value.message
    assert list((tmp_path / "scratch").iterdir()) == []


def test_nothing_a_remote_shell_would_split_is_passed(tmp_path):
    p = provider(tmp_path)
    victim = tmp_path / "victim"
    victim.mkdir()
    with pytest.raises(ApplicationError) as e:
        p._run(["rm", "-rf", f"{tmp_path}/x {victim}"], "remove")
    assert e.value.type == "BadInput" and "a remote shell would split or expand it" in e.value.message
    assert victim.is_dir()


def test_scratch_directories_are_listed_and_removed_by_environment_only(tmp_path):
    p = provider(tmp_path)
    marks = {"opsflow-drill-aaaa0001": ("prod", "run-1"), "opsflow-drill-bbbb0002": ("prod", "run-0"),
             "opsflow-drill-cccc0003": ("staging", "run-9")}
    for name, (env, run) in marks.items():
        (tmp_path / "scratch" / name).mkdir()
        (tmp_path / "scratch" / name / MARK).write_text(json.dumps({"environment": env, "run": run}))
    (tmp_path / "scratch" / "opsflow-drill-dddd0004").mkdir()  # unmarked: nobody's to remove
    assert p.scratch_runs("opsflow-drill") == {"opsflow-drill-aaaa0001": "run-1", "opsflow-drill-bbbb0002": "run-0"}
    with pytest.raises(ApplicationError) as e:
        p.delete("opsflow-drill-cccc0003")
    assert e.value.type == "Refused" and (tmp_path / "scratch" / "opsflow-drill-cccc0003").is_dir()
    assert p.delete("opsflow-drill-bbbb0002") is True and not (tmp_path / "scratch" / "opsflow-drill-bbbb0002").exists()
    assert p.delete("opsflow-drill-bbbb0002") is False  # idempotent
    with pytest.raises(ApplicationError, match="lowercase letters, digits and hyphens"):
        p.delete("../backups")
