"""The restore-drill activities: provider-neutral, each picks the method's provider (activities/providers.py)."""

from __future__ import annotations

import time

from temporalio.exceptions import ApplicationError

from activities.context import Backoff, check_cancelled, heartbeating, sleep_or_cancelled
from activities.postgres.integrity import missing_objects, require_tables, row_counts, row_counts_at, run_checks
from activities.providers import restore_provider
from opsflow.contracts.restore import (
    RESTORE_DELETE,
    RESTORE_LEFTOVERS,
    RESTORE_MYSQL_DUMP,
    RESTORE_START,
    RESTORE_VALIDATE_CHECKS,
    RESTORE_VERIFY,
    RESTORE_WAIT,
    RESTORE_WINDOW,
)
from opsflow.inventory import PostgresDatabase
from opsflow.models import (
    CheckResult,
    MysqlRestoreResult,
    RestoreRequest,
    RestoreWindow,
    ScratchTarget,
    VerifyRequest,
)


@RESTORE_WINDOW.implementation
def restore_window(request: RestoreRequest) -> RestoreWindow:
    return restore_provider(request).window()


@RESTORE_LEFTOVERS.implementation
def restore_leftovers(request: RestoreRequest) -> list[str]:
    """Scratch targets left behind by an earlier run of this environment that crashed: found, deleted, and named
    in the report. Only targets tagged with this environment (providers list nothing else) and made by another
    run (tag/mark opsflow-run) are removed: another environment's drill, even one running now, is never touched."""
    provider = restore_provider(request)
    runs = provider.scratch_runs(request.drill.scratch_prefix)
    found = sorted(n for n, run in runs.items()
                   if n != request.scratch_name and not (request.run_id and run == request.run_id))
    for name in found:
        check_cancelled("removing leftover scratch targets")
        provider.delete(name)
    return found


@RESTORE_START.implementation
def restore_start(request: RestoreRequest) -> ScratchTarget:
    assert request.point_in_time is not None
    return restore_provider(request).start(request.scratch_name, request.point_in_time)


@RESTORE_WAIT.implementation
def restore_wait(request: RestoreRequest) -> ScratchTarget:
    """Wait for the scratch target, heartbeating; restores take tens of minutes in production. After a worker
    crash the next attempt picks up the same target by name: one scratch target per drill. Polls with backoff
    from 1 s up to the control-plane interval (each poll is a control-plane read); stops within a poll when
    cancelled, leaving the scratch target to the drill's owed restore.delete."""
    provider = restore_provider(request)
    started = time.monotonic()
    backoff = Backoff(1.0, max(1.0, request.control_plane_interval))
    while True:
        target = provider.status(request.scratch_name)
        if target.ready:
            return target
        sleep_or_cancelled(backoff.next(), {"ready": target.ready, "detail": target.detail,
                                            "waited_seconds": round(time.monotonic() - started, 1)},
                           what=f"waiting for scratch target {request.scratch_name}")


@RESTORE_DELETE.implementation
def restore_delete(request: RestoreRequest) -> bool:
    # a delete waits for the cloud; the drill's cleanup heartbeats
    with heartbeating(f"deleting {request.scratch_name}"):
        return restore_provider(request).delete(request.scratch_name)


@RESTORE_MYSQL_DUMP.implementation
def restore_mysql_dump(request: RestoreRequest) -> MysqlRestoreResult:
    """s3-mysqldump: the dump at or before the point loaded into a scratch MariaDB/MySQL server started on this
    worker, verified, and the server stopped and removed, whatever happens (activities/mysql.py)."""
    from activities.mysql import MysqlDumpRestore  # PyMySQL loads for the drills that use it

    return MysqlDumpRestore(request).restore_and_verify()


def _scratch_db(request: VerifyRequest) -> PostgresDatabase:
    if not request.scratch.dsn:
        raise ApplicationError(f"scratch target {request.scratch.name} has no DSN", type="BadInput", non_retryable=True)
    # Restores copy the source's roles, so the source's password; a dump restored onto a scratch server
    # is reached with that server's own credentials.
    if request.scratch.method == "s3-dump" and request.drill.scratch_server is not None:
        password = request.drill.scratch_server.password
    else:
        password = getattr(request.source.database, "password", None)
    return PostgresDatabase(provider="postgres", dsn=request.scratch.dsn, password=password)


def _source_db(request) -> PostgresDatabase:
    src = request.source.database
    if not getattr(src, "dsn", None):
        raise ApplicationError(
            f"{request.source.region}: the source database has no DSN to verify against",
            type="BadInput",
            non_retryable=True,
        )
    return PostgresDatabase(provider="postgres", dsn=src.dsn, password=src.password)


@RESTORE_VALIDATE_CHECKS.implementation
def validate_checks(request: RestoreRequest) -> None:
    """Before anything is created: every table named by a row-count check exists on the source."""
    if request.method == "s3-mysqldump":
        from activities.mysql import MysqlDumpRestore

        return MysqlDumpRestore(request).validate()
    tables = [c.table for c in request.drill.row_counts]
    if tables:
        require_tables(_source_db(request), tables)


@RESTORE_VERIFY.implementation
def verify(request: VerifyRequest) -> list[CheckResult]:
    """Row counts against the source at the restore point, SQL checks, schema objects. Results, not exceptions:
    the drill decides, and the report lists every check."""
    with heartbeating(f"verifying {request.scratch.name}"):  # one count(*) of a big table may take minutes
        return _verify(request)


def _verify(request: VerifyRequest) -> list[CheckResult]:
    scratch, source, drill = _scratch_db(request), _source_db(request), request.drill
    results: list[CheckResult] = []
    # A table missing from the restore is a failed check, not an error.
    restored = row_counts(scratch, [c.table for c in drill.row_counts], missing_ok=True) if drill.row_counts else {}
    for c in drill.row_counts:
        if c.timestamp_column:
            expected = row_counts_at(source, c.table, c.timestamp_column, request.restore_point)
        else:
            expected = row_counts(source, [c.table])[c.table]
        actual = restored.get(c.table)
        if actual is None:
            results.append(
                CheckResult(
                    kind="row_count", name=c.table, ok=False, expected=expected, detail="table missing from the restore"
                )
            )
            continue
        ok = abs(expected - actual) <= c.tolerance
        results.append(
            CheckResult(
                kind="row_count",
                name=c.table,
                ok=ok,
                expected=expected,
                actual=actual,
                detail=f"{actual} rows restored, {expected} expected" + (f" (±{c.tolerance})" if c.tolerance else ""),
            )
        )
    for name, ok, detail in run_checks(scratch, [(c.name, c.query) for c in drill.checks]):
        results.append(CheckResult(kind="sql", name=name, ok=ok, detail=detail))
    missing = set(missing_objects(scratch, drill.schema_objects)) if drill.schema_objects else set()
    for obj in drill.schema_objects:
        results.append(
            CheckResult(
                kind="schema", name=obj, ok=obj not in missing, detail="missing" if obj in missing else "present"
            )
        )
    return results
