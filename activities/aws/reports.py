"""Reports into S3 (report.store with an s3:// destination)."""

from __future__ import annotations

from activities.aws.session import aws_errors, client
from opsflow.inventory import AwsConnection


def store_report_s3(conn: AwsConnection, bucket: str, key: str, body: str, content_type: str) -> str:
    """Put a report into s3://bucket/key (UTF-8); returns that URL. Overwrites: same key, same report."""
    key = key.lstrip("/")
    with aws_errors(f"S3 object s3://{bucket}/{key}"):
        client(conn, "s3").put_object(Bucket=bucket, Key=key, Body=body.encode("utf-8"), ContentType=content_type)
    return f"s3://{bucket}/{key}"
