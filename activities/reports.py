"""Keeping reports: the local reports directory, and S3 when the inventory names a bucket."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path

from activities.context import heartbeating
from activities.rules import RULEBOOK
from opsflow.contracts.notify import REPORT_STORE
from opsflow.contracts.restore import RESTORE_HISTORY
from opsflow.html_report import to_html
from opsflow.inventory import AwsConnection
from opsflow.models import DrillHistoryRequest, DrillReport, DrillRun, ProcedureReport, StoreReportRequest
from opsflow.procedures import REPORT_TYPES
from opsflow.report_signatures import check_report
from opsflow.signing import Keyring

log = logging.getLogger(__name__)


def html_page(request: StoreReportRequest) -> str | None:
    """The report as the one-page HTML `opsflow report --html` writes, its signatures checked against the worker's
    own inventory; None (and a log line) when it cannot be rendered: the JSON and Markdown are kept regardless."""
    try:
        data = json.loads(request.json_text)
        report = REPORT_TYPES.get(data.get("procedure", ""), ProcedureReport).model_validate(data)
        inventory = RULEBOOK.get(request.environment)
        check = check_report(data, Keyring.of(inventory)) if inventory is not None else None
        keys_from = "the worker's inventory" if inventory is not None else "no inventory held by the worker"
        return to_html(report, check, keys_from=keys_from, generated_at=datetime.now(timezone.utc))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("the HTML report of %s was not rendered: %s", request.workflow_id, e)
        return None


@REPORT_STORE.implementation
def store_report(request: StoreReportRequest) -> list[str]:
    """Write <reports_dir>/<environment>/<workflow id>.{json,md,html}, and the same keys under the S3 prefix.
    Idempotent. Heartbeats while it writes (a worker lost mid-write is noticed within the heartbeat timeout)."""
    with heartbeating("storing the report"):
        return _store_report(request)


def _store_report(request: StoreReportRequest) -> list[str]:
    stem = request.workflow_id.replace("/", "_")
    folder = Path(request.reports_dir) / request.environment
    folder.mkdir(parents=True, exist_ok=True)
    places = []
    page = html_page(request)
    kept = [("json", request.json_text, "application/json"), ("md", request.markdown, "text/markdown")]
    if page is not None:
        kept.append(("html", page, "text/html; charset=utf-8"))
    for ext, body, _ in kept:
        path = folder / f"{stem}.{ext}"
        path.write_text(body, encoding="utf-8")
        places.append(str(path))
    if request.store.s3 is not None:
        from activities.aws.reports import store_report_s3  # boto3 loads on first use (~0.5 s of start-up)

        s3 = request.store.s3
        prefix = f"{s3.prefix.rstrip('/')}/" if s3.prefix else ""
        for ext, body, ctype in kept:
            places.append(
                store_report_s3(
                    request.aws or AwsConnection(),
                    s3.bucket,
                    f"{prefix}{request.environment}/{stem}.{ext}",
                    body,
                    ctype,
                )
            )
    return places


# How many stored reports a history reads at most (the procedures of an environment share its reports folder).
HISTORY_SCAN = 500


@RESTORE_HISTORY.implementation
def drill_history(request: DrillHistoryRequest) -> list[DrillRun]:
    """The drills before this one (see `_drill_history`), heartbeating while it reads."""
    with heartbeating("reading the drills' reports"):
        return _drill_history(request)


def _drill_history(request: DrillHistoryRequest) -> list[DrillRun]:
    """The last `limit` drills of the environment, oldest first, read back from their stored reports: from S3 when
    the inventory names a bucket (every worker writes there), else the local reports directory. A report that
    cannot be read is skipped (and logged); dry runs are never stored."""

    def wanted(text: str, where: str) -> DrillRun | None:
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("procedure") != "drill":
                return None
            report = DrillReport.model_validate(data)
        except ValueError as e:  # pydantic's ValidationError is a ValueError
            log.warning("drill history: %s is not a readable report: %s", where, str(e)[:200])
            return None
        if report.dry_run or (request.exclude_run and report.run_id == request.exclude_run):
            return None
        return DrillRun.of(report, where)

    if request.limit <= 0:
        return []
    if request.store.s3 is not None:
        from activities.aws.reports import read_reports_s3  # boto3 loads on first use

        s3 = request.store.s3
        prefix = f"{s3.prefix.rstrip('/')}/" if s3.prefix else ""
        runs = read_reports_s3(request.aws or AwsConnection(), s3.bucket, f"{prefix}{request.environment}/", wanted,
                               request.limit, HISTORY_SCAN)
    else:
        folder = Path(request.reports_dir) / request.environment
        files = sorted(folder.glob("*.json"), key=lambda p: (p.stat().st_mtime, p.name), reverse=True) \
            if folder.is_dir() else []
        runs = []
        for path in files[:HISTORY_SCAN]:
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as e:
                log.warning("drill history: %s: %s", path, e)
                continue
            run = wanted(text, str(path))
            if run is not None:
                runs.append(run)
                if len(runs) >= request.limit:
                    break
    epoch = datetime.min.replace(tzinfo=timezone.utc)
    return sorted(runs, key=lambda r: r.started_at or epoch)
