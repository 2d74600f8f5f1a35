"""Base backups of a self-managed server: pg_basebackup into a directory on the worker, pg_verifybackup."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from temporalio.exceptions import ApplicationError

from activities.context import heartbeat as _heartbeat
from activities.postgres.connection import dsn_of, where
from activities.secrets import resolve
from opsflow.maintenance_models import BackupResult


def base_backup(db: Any, directory: str, name: str, *, timeout: float = 3600) -> Any:
    """A fresh base backup of `db` with pg_basebackup over the replication protocol (plain format, WAL included,
    fast checkpoint) into directory/name on this worker, verified by pg_verifybackup's manifest check later.
    Needs a role with REPLICATION and a pg_hba entry for replication. A finished backup of that name is reused."""
    dest = Path(directory) / name
    started = datetime.now(timezone.utc)
    if (dest / "backup_manifest").exists():
        return _backup_result(dest, "completed")
    if dest.exists():  # a crashed attempt: start again
        shutil.rmtree(dest)
    Path(directory).mkdir(parents=True, exist_ok=True)
    binary = shutil.which("pg_basebackup") or next(
        (str(p) for p in sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_basebackup"))), None
    )
    if binary is None:
        raise ApplicationError(
            "backup: pg_basebackup is not installed on this worker (postgresql-client)",
            type="BackupConfig",
            non_retryable=True,
        )
    env = {**os.environ}
    if getattr(db, "password", None) is not None:
        env["PGPASSWORD"] = resolve(db.password)
    proc = subprocess.Popen(
        [binary, "-d", dsn_of(db), "-D", str(dest), "-Fp", "-X", "stream", "-c", "fast", "--no-password"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
    )
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        _heartbeat({"backup": name, "bytes": _dir_bytes(dest)})
        if time.monotonic() > deadline:
            proc.kill()
            raise ApplicationError(
                f"backup: pg_basebackup ran over {timeout:.0f}s", type="BackupTimeout", non_retryable=True
            )
        time.sleep(1)
    output = (proc.stdout.read() if proc.stdout else "").strip()
    if proc.returncode != 0:
        shutil.rmtree(dest, ignore_errors=True)
        raise ApplicationError(f"backup: pg_basebackup of {where(db)} failed: {output[-500:]}", type="BackupFailed")
    result = _backup_result(dest, "completed")
    result.started_at = started
    return result


def _dir_bytes(path: Any) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def _backup_result(dest: Any, state: str) -> Any:
    manifest = dest / "backup_manifest"
    done = datetime.fromtimestamp(manifest.stat().st_mtime, timezone.utc) if manifest.exists() else None
    return BackupResult(
        id=dest.name,
        method="pg_basebackup",
        state=state,
        completed_at=done,
        size_bytes=_dir_bytes(dest),
        location=str(dest),
    )


def verify_base_backup(location: str) -> str:
    """pg_verifybackup on a plain-format base backup: every file against its manifest, and the WAL it needs."""
    binary = shutil.which("pg_verifybackup") or next(
        (str(p) for p in sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_verifybackup"))), None
    )
    if binary is None:
        raise ApplicationError(
            "backup: pg_verifybackup is not installed on this worker", type="BackupConfig", non_retryable=True
        )
    proc = subprocess.run([binary, location], capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise ApplicationError(
            f"backup {location} does not verify: {(proc.stderr or proc.stdout).strip()[-500:]}",
            type="BackupInvalid",
            non_retryable=True,
        )
    return (proc.stdout or "backup successfully verified").strip()
