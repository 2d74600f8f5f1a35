"""The lab's MySQL for the restore test of method s3-mysqldump (the Maintenance API guide's monthly recovery test):
a MariaDB server standing in for the application's production MySQL, and its `mysqldump` in the lab's S3."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import tempfile
from pathlib import Path

from activities.aws.dump_restore import upload_dump
from activities.mysql import ScratchServer, program
from opsflow.inventory import AwsConnection

MYSQL_PREFIX = "mysql/"


def start_source(root: Path, name: str = "mysql-source") -> ScratchServer:
    """A MariaDB server of its own under `root` (root without a password, loopback only). stop() removes it."""
    server = ScratchServer(Path(root), name)
    server.start({"environment": None, "lab": "the MySQL source"})
    return server


def seed_mysqldump(endpoint_url: str, server: ScratchServer, database: str, *, bucket: str,
                   prefix: str = MYSQL_PREFIX, key: str | None = None) -> dict:
    """`mysqldump --single-transaction --databases DATABASE | gzip` of the server, uploaded to S3 with its dump time
    (the server's clock just before the dump took its snapshot) as metadata. Returns {"url", "key", "dump_time"}.
    Needs AWS credentials in the environment (worker_env())."""
    from datetime import timezone

    with server.connect() as conn, conn.cursor() as cur:
        cur.execute("select utc_timestamp(6)")
        dump_time = cur.fetchone()[0].replace(tzinfo=timezone.utc)
    key = key or f"{prefix.rstrip('/')}/{database}-{dump_time.strftime('%Y%m%dT%H%M%S%fZ')}.sql.gz"
    dump = program("mariadb-dump", "OPSFLOW_MARIADB_DUMP", "/usr/bin/mariadb-dump", "/usr/bin/mysqldump")
    tmp = Path(tempfile.mkdtemp(prefix="opsflow-mysqldump-"))
    try:
        path = tmp / f"{database}.sql.gz"
        with gzip.open(path, "wb") as out:
            proc = subprocess.run([dump, "--no-defaults", "--protocol=tcp", "-h", "127.0.0.1", "-P", str(server.port),
                                   "-u", "root", "--single-transaction", "--routines", "--triggers", "--databases",
                                   database], capture_output=True, timeout=300)
            if proc.returncode != 0:
                raise RuntimeError(f"mariadb-dump exited with {proc.returncode}: {proc.stderr.decode()[-500:]}")
            out.write(proc.stdout)
        url = upload_dump(AwsConnection(endpoint_url=endpoint_url), bucket, key, path, dump_time=dump_time)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"url": url, "key": key, "dump_time": dump_time}
