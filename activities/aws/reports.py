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


def read_reports_s3(conn: AwsConnection, bucket: str, prefix: str, wanted, limit: int, scan: int) -> list:
    """Stored JSON reports under s3://bucket/prefix, newest first (LastModified): each body is given to `wanted`
    (returns a value or None); stops after `limit` values or `scan` objects read. Returns the values."""
    s3 = client(conn, "s3")
    objs: list[dict] = []
    with aws_errors(f"S3 reports under s3://{bucket}/{prefix}"):
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            objs += [o for o in page.get("Contents", []) if o["Key"].endswith(".json")]
    found = []
    for obj in sorted(objs, key=lambda o: (o["LastModified"], o["Key"]), reverse=True)[:scan]:
        with aws_errors(f"S3 object s3://{bucket}/{obj['Key']}"):
            body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read().decode("utf-8", errors="replace")
        value = wanted(body, f"s3://{bucket}/{obj['Key']}")
        if value is not None:
            found.append(value)
            if len(found) >= limit:
                break
    return found
