"""Keeping reports: the local reports directory, and S3 when the inventory names a bucket."""

from __future__ import annotations

from pathlib import Path

from opsflow.contracts.notify import REPORT_STORE
from opsflow.inventory import AwsConnection
from opsflow.models import StoreReportRequest


@REPORT_STORE.implementation
def store_report(request: StoreReportRequest) -> list[str]:
    """Write <reports_dir>/<environment>/<workflow id>.{json,md}, and the same keys under the S3 prefix. Idempotent."""
    stem = request.workflow_id.replace("/", "_")
    folder = Path(request.reports_dir) / request.environment
    folder.mkdir(parents=True, exist_ok=True)
    places = []
    for ext, body in (("json", request.json_text), ("md", request.markdown)):
        path = folder / f"{stem}.{ext}"
        path.write_text(body)
        places.append(str(path))
    if request.store.s3 is not None:
        from activities.aws.reports import store_report_s3  # boto3 loads on first use (~0.5 s of start-up)

        s3 = request.store.s3
        prefix = f"{s3.prefix.rstrip('/')}/" if s3.prefix else ""
        for ext, body, ctype in (
            ("json", request.json_text, "application/json"),
            ("md", request.markdown, "text/markdown"),
        ):
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
