"""The lab's AWS: moto in server mode (RDS, Route 53, S3, CloudWatch) with the lab's real PostgreSQL behind RDS.

moto keeps the control plane (instances, replicas, parameter groups, hosted zones, record sets,
health checks, buckets, metrics). A thin WSGI middleware in front of it keeps the data plane real:

* ``PromoteReadReplica`` on an instance mapped to a lab cluster answers like RDS (``DBInstanceStatus``
  ``modifying``), then promotes the cluster for real (``pg_promote()``) in the background. When
  PostgreSQL has left recovery, ``DescribeDBInstances`` shows the instance ``available`` with no
  ``ReadReplicaSourceDBInstanceIdentifier`` and the source no longer lists it as a replica. If the
  promotion fails (cluster down, ...) the instance goes back to being an ``available`` replica and
  the error is in ``GET /_emulator/state``. Unknown instances answer ``DBInstanceNotFound``; a standalone
  instance answers ``InvalidDBInstanceState`` ("not a read replica"), as RDS does.
* ``ModifyDBParameterGroup`` with ``ApplyMethod=immediate`` relays a few dynamic parameters
  (``default_transaction_read_only``, ``statement_timeout``, ``idle_in_transaction_session_timeout``,
  ``log_min_duration_statement``) to every mapped cluster whose instance uses that group
  (``ALTER SYSTEM SET`` + ``pg_reload_conf()``), so fencing through a parameter group really fences.
* CloudWatch ``AWS/RDS`` ``ReplicaLag`` (seconds, dimension ``DBInstanceIdentifier``) is published every
  ``metrics_interval`` seconds for each mapped instance that is a replica, measured on the cluster.
* Route 53 ``ChangeResourceRecordSets`` answers ``PENDING`` and ``GetChange`` turns ``INSYNC`` after
  ``route53.propagation_seconds`` (moto alone is always INSYNC); an unknown change id is ``NoSuchChange``.
* ``GetHealthCheckStatus`` probes for real: TCP health checks connect to ``IPAddress:Port``, HTTP(S)
  ones GET ``ResourcePath`` there; the observation says ``Success: ...`` or ``Failure: ...``.
* Endpoints (lab-only): every RDS answer describing an instance mapped onto a lab cluster gives its
  ``Endpoint`` as ``127.0.0.1`` and the cluster's port (and ``DbInstancePort``), so a client builds its DSN
  from RDS as it would in AWS and reaches the cluster. ``LatestRestorableTime`` is the commit time of the
  newest transaction in the cluster's WAL archive (absent when it does not archive, or nothing since the
  base backup is archived; ``lab.postgres.archive_now()`` ships the WAL, as RDS does every five minutes);
  ``DescribeDBInstanceAutomatedBackups`` gets a ``RestoreWindow`` from the base backup's end to that time.
* ``RestoreDBInstanceToPointInTime`` of a mapped, archiving instance (``RestoreTime`` or
  ``UseLatestRestorableTime``; outside the window: ``InvalidParameterValue``) creates the instance
  ``creating`` with the default parameter group and no replication links, restores a NEW cluster from
  the lab's base backup and WAL archive to that time (``lab.postgres.restore_to_time``, under
  ``<source cluster root>/rds-restores/<identifier>``) in the background, maps the instance onto it and
  shows it ``available``; ``incompatible-restore`` if the restore fails (the error in ``/_emulator/state``).
* ``DeleteDBInstance`` of such a restored instance drops its cluster before answering; deleting any other
  mapped instance stops its cluster (RDS deleted the server) and keeps its data and mapping, so that:
* ``CreateDBInstanceReadReplica`` with the identifier of a deleted mapped instance, from a mapped source,
  rebuilds that cluster as a streaming replica of the source's cluster on its own port
  (``lab.postgres.rebuild_replica``: pg_rewind, else a fresh base backup) in the background: ``creating``
  until it streams, then ``available``; ``failed`` if the rebuild fails. RDS failback in the lab.
  An identifier in use is ``DBInstanceAlreadyExists`` (moto alone would overwrite it); a cross-region
  replica gets the default parameter group unless one is named, as in RDS.
* Faults for the error paths (lab/faults.py, the emulators' one fault API): a request's key is
  ``"<service> <Action>"`` (service: rds, route53, s3, monitoring), so
  ``emu.inject_fault(r"^rds DescribeDBInstances$", status=400, code="Throttling", count=10)`` answers the next
  ten with that AWS error (e.g. 400 ``Throttling``, 503 ``ServiceUnavailable``, 403 ``AccessDenied``). Random
  faults answer Throttling (SlowDown for S3) / ServiceUnavailable, and a 500 ``InternalFailure`` for a
  dropped connection (werkzeug cannot drop one unanswered).

Admin endpoints (JSON, not AWS; lab/emulator.py): ``/_emulator/state``, ``counts``, ``faults``,
``fault_rate``, ... and ``POST /_emulator/instances`` with ``{"db_instance_identifier", "region",
"cluster"|"dsn"}``: maps (or remaps) an RDS instance to a cluster, e.g. a replica created later with
``CreateDBInstanceReadReplica``.

Config (a dict in-process; a YAML or JSON file for the CLI)::

    host: 127.0.0.1              # default
    metrics_interval: 5          # seconds between ReplicaLag datapoints; 0: none
    promote_delay: 0             # extra seconds an RDS promotion takes before pg_promote()
    restore_delay: 0             # extra seconds a point-in-time restore stays `creating`
    rebuild_delay: 0             # extra seconds a replica rebuild stays `creating`
    rds:
      instances:                 # primaries first or not: replicas are created after their source
        - db_instance_identifier: orders-east
          region: us-east-1
          cluster: {...}         # lab.postgres.Cluster.to_dict(); or `dsn: "host=... port=..."`
          parameter_group: orders-east-params   # optional: created (family `parameter_group_family`,
                                                # default postgres15) and attached to this instance only
          engine: postgres        # default; also instance_class (db.t3.micro), engine_version (moto's)
        - db_instance_identifier: orders-west
          region: us-west-2
          replica_of: orders-east   # CreateDBInstanceReadReplica (by ARN when the regions differ)
          cluster: {...}
    route53:
      propagation_seconds: 1     # how long a change stays PENDING; 0: INSYNC at once
      zones:
        - name: lab.opsflow.test.
          records:
            - name: db.lab.opsflow.test.
              type: CNAME           # default CNAME; ttl default 30
              failover:
                - {set_identifier: east, role: PRIMARY, value: orders-east.lab.opsflow.test,
                   health_check: {type: TCP, ip: 127.0.0.1, port: 5433}}
                - {set_identifier: west, role: SECONDARY, value: orders-west.lab.opsflow.test}
    s3:
      buckets: [opsflow-reports]   # or {name, region}

Running::

    python -m lab.aws_emulator --config aws.yaml --port 4566 [--host 127.0.0.1] [--info-file info.json] [-v]

prints one JSON line (url, hosted zone ids, health check ids, instance ARNs, buckets) when it is
ready, writes the same to ``--info-file``, and runs until SIGTERM/SIGINT. In-process::

    emu = start_emulator(config, port=0)   # emu.url, emu.info(), emu.map_instance(...), emu.inject_fault(...)
    emu.stop()

moto's state is per process: one emulator per process at a time (start resets moto, stop resets it).
Stopping the emulator drops the clusters it restored (they exist only for their RDS instances).
Clients need credentials (any, e.g. AWS_ACCESS_KEY_ID=testing); moto's account is 123456789012.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from typing import Any, Callable, Iterable

from lab.emulator import Emulator, is_admin_path
from lab.faults import Fault

log = logging.getLogger("opsflow.lab.aws")

ACCOUNT_ID = "123456789012"  # moto's default account (what credentials like "testing" map to)
_RELAYED_PARAMETERS = {
    "default_transaction_read_only",
    "statement_timeout",
    "idle_in_transaction_session_timeout",
    "log_min_duration_statement",
}
_ARN = re.compile(r"^arn:aws[\w-]*:rds:([\w-]+):(\d+):db:(.+)$")
_SCOPE = re.compile(r"Credential=[^/,]+/\d{8}/([^/]+)/([^/]+)/aws4_request")
_R53_CHANGE_BATCH = re.compile(r"^/2013-04-01/hostedzone/([^/]+)/rrset/?$")
_R53_GET_CHANGE = re.compile(r"^/2013-04-01/change/([^/]+)$")
_R53_HC_STATUS = re.compile(r"^/2013-04-01/healthcheck/([^/]+)/status$")

_running: "AwsEmulator | None" = None
_running_lock = threading.Lock()


# -- small helpers ------------------------------------------------------------------------------------


def _cluster_dsn(spec: dict[str, Any]) -> str:
    if spec.get("dsn"):
        return str(spec["dsn"])
    if spec.get("cluster"):
        from lab.postgres import Cluster

        return Cluster.from_dict(spec["cluster"]).dsn
    raise ValueError(f"instance {spec.get('db_instance_identifier')!r}: give 'cluster' (Cluster.to_dict()) or 'dsn'")


def _cluster_port(spec: dict[str, Any]) -> int | None:
    if spec.get("cluster"):
        port = spec["cluster"].get("port")
        return int(port) if port else None
    m = re.search(r"(?:^|\s)port=(\d+)", spec.get("dsn") or "")
    return int(m.group(1)) if m else None


def _pg(dsn: str):
    import psycopg

    return psycopg.connect(dsn, autocommit=True, connect_timeout=5)


def _rds_backend(region: str):
    from moto.rds.models import rds_backends

    return rds_backends[ACCOUNT_ID][region]


def _rds_db(region: str, ident: str):
    """moto's DBInstance for an identifier or ARN, or None."""
    m = _ARN.match(ident)
    if m:
        region, ident = m.group(1), m.group(3)
    return _rds_backend(region).databases.get(ident)


def _detach_replica(db, region: str) -> None:
    """What moto's PromoteReadReplica leaves out: the instance forgets its source and the source forgets it."""
    source = db.source_db_instance_identifier
    db.is_replica, db.source_db_instance_identifier = False, None
    primary = _rds_db(region, source) if source else None
    if primary is not None:
        for name in (db.db_instance_identifier, db.db_instance_arn):
            if name in primary.replicas:
                primary.replicas.remove(name)


def _route53_backend():
    from moto.route53.models import route53_backends

    return route53_backends[ACCOUNT_ID]["global"]


def _reset_moto() -> None:
    from moto.moto_api._internal.models import moto_api_backend

    moto_api_backend.reset()


def _aws_error_body(service: str, code: str, message: str, status: int) -> tuple[bytes, str]:
    rid = uuid.uuid4().hex
    msg = escape(message)
    if service == "s3":
        xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{msg}</Message>'
               f'<RequestId>{rid}</RequestId></Error>')
    else:
        kind = "Receiver" if status >= 500 else "Sender"
        ns = ' xmlns="https://route53.amazonaws.com/doc/2013-04-01/"' if service == "route53" else ""
        xml = (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<ErrorResponse{ns}><Error><Type>{kind}</Type><Code>{code}</Code>'
            f"<Message>{msg}</Message></Error><RequestId>{rid}</RequestId></ErrorResponse>"
        )
    return xml.encode(), "text/xml"


def _probe(kind: str, ip: str, port: int, path: str | None, timeout: float = 2.0) -> tuple[bool, str]:
    """What a Route 53 health checker would observe."""
    kind = (kind or "").upper()
    try:
        if kind == "TCP":
            with socket.create_connection((ip, port), timeout=timeout):
                return True, "Success: TCP connection established"
        if kind in ("HTTP", "HTTPS", "HTTP_STR_MATCH", "HTTPS_STR_MATCH"):
            scheme = "https" if kind.startswith("HTTPS") else "http"
            with urllib.request.urlopen(f"{scheme}://{ip}:{port}{path or '/'}", timeout=timeout) as r:
                return True, f"Success: HTTP Status Code {r.status}, OK"
    except urllib.error.HTTPError as e:
        return (e.code < 400), f"{'Success' if e.code < 400 else 'Failure'}: HTTP Status Code {e.code}"
    except OSError as e:
        return False, f"Failure: {getattr(e, 'strerror', None) or e}"
    return True, "Success: not probed by the lab"


@dataclass
class _Instance:
    ident: str
    region: str
    dsn: str
    promotion: str | None = None  # None, "running", "done", "failed"
    last_error: str | None = None
    promoted_at: float | None = None
    cluster: dict | None = None  # lab.postgres.Cluster.to_dict() when mapped onto a lab cluster (not a bare dsn)
    scratch: bool = False  # made by RestoreDBInstanceToPointInTime: its cluster is dropped with the instance
    deleted: bool = False  # the RDS instance was deleted; its cluster is stopped and kept for a rebuild
    job: str | None = None  # "restoring" | "rebuilding" while the data plane works in the background
    thread: threading.Thread | None = None
    restore_point: str | None = None
    rebuilt: dict | None = None  # how the last CreateDBInstanceReadReplica rebuilt the cluster

    @property
    def port(self) -> int | None:
        return int(self.cluster["port"]) if self.cluster else None


_PHRASES = {200: "OK", 201: "Created", 400: "Bad Request", 403: "Forbidden", 404: "Not Found", 429: "Too Many Requests",
            500: "Internal Server Error", 503: "Service Unavailable"}
_AWS_CODES = {400: "InvalidParameterValue", 403: "AccessDenied", 404: "NotFound", 429: "Throttling",
              500: "InternalFailure", 503: "ServiceUnavailable"}


# -- the middleware -----------------------------------------------------------------------------------


class _Middleware:
    """Sits in front of moto's WSGI app; everything it does not recognise goes straight through."""

    def __init__(self, app: Callable, emu: "AwsEmulator"):
        self.app = app
        self.emu = emu

    # WSGI plumbing
    def _call(self, environ: dict) -> tuple[str, list[tuple[str, str]], bytes]:
        captured: dict[str, Any] = {}
        chunks: list[bytes] = []

        def start_response(status, headers, exc_info=None):
            captured["status"], captured["headers"] = status, headers
            return chunks.append

        result = self.app(environ, start_response)
        try:
            for chunk in result:
                chunks.append(chunk)
        finally:
            close = getattr(result, "close", None)
            if close:
                close()
        return captured["status"], captured["headers"], b"".join(chunks)

    @staticmethod
    def _respond(start_response, status: str, headers: Iterable[tuple[str, str]], body: bytes) -> list[bytes]:
        hs = [(k, v) for k, v in headers if k.lower() != "content-length"]
        hs.append(("Content-Length", str(len(body))))
        start_response(status, hs)
        return [body]

    def _error(self, start_response, service: str, status: int, code: str, message: str) -> list[bytes]:
        body, ctype = _aws_error_body(service, code, message, status)
        return self._respond(start_response, f"{status} {_PHRASES.get(status, 'Error')}", [("Content-Type", ctype)],
                             body)

    def _json(self, start_response, obj: Any, status: str = "200 OK") -> list[bytes]:
        return self._respond(start_response, status, [("Content-Type", "application/json")],
                             json.dumps(obj, default=str).encode())

    def __call__(self, environ: dict, start_response) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if is_admin_path(path):
            return self._admin(environ, start_response, path)
        m = _SCOPE.search(environ.get("HTTP_AUTHORIZATION", ""))
        region, service = (m.group(1), m.group(2)) if m else (None, None)
        method = environ.get("REQUEST_METHOD", "GET")
        params: dict[str, str] = {}
        action: str | None = None
        if service in ("rds", "monitoring"):
            body = self._read_body(environ)
            params = {k: v[-1] for k, v in urllib.parse.parse_qs(body.decode("utf-8", "replace")).items()}
            params.update({k: v[-1] for k, v in urllib.parse.parse_qs(environ.get("QUERY_STRING", "")).items()})
            action = params.get("Action") or (environ.get("HTTP_X_AMZ_TARGET", "").rsplit(".", 1)[-1] or None)
        elif service == "route53":
            if method == "POST" and _R53_CHANGE_BATCH.match(path):
                action = "ChangeResourceRecordSets"
            elif method == "GET" and _R53_GET_CHANGE.match(path):
                action = "GetChange"
            elif method == "GET" and _R53_HC_STATUS.match(path):
                action = "GetHealthCheckStatus"
            elif method == "GET" and path.rstrip("/").endswith("/rrset"):
                action = "ListResourceRecordSets"
        elif service == "s3":
            parts = [p for p in path.split("/") if p]
            if len(parts) >= 2:
                action = {"PUT": "PutObject", "GET": "GetObject", "HEAD": "HeadObject",
                          "DELETE": "DeleteObject"}.get(method)

        if service:
            key = f"{service} {action or method + ' ' + path}"
            self.emu.count_request(key)
            fault = self.emu.take_fault(key, method)
            if fault is not None:
                return self._fault(start_response, service, fault)

        if service == "rds" and action == "PromoteReadReplica":
            return self._promote(environ, start_response, region or "us-east-1", params)
        if service == "rds" and action == "ModifyDBParameterGroup":
            status, headers, body = self._call(environ)
            if status.startswith("200"):
                self.emu._relay_parameters(region or "us-east-1", params)
            return self._respond(start_response, status, headers, body)
        if service == "rds" and action in ("CreateDBInstance", "CreateDBInstanceReadReplica"):
            return self._create(environ, start_response, region or "us-east-1", params, action)
        if service == "rds" and action == "RestoreDBInstanceToPointInTime":
            return self._restore(environ, start_response, region or "us-east-1", params)
        if service == "rds" and action == "DeleteDBInstance":
            return self._delete(environ, start_response, region or "us-east-1", params)
        if service == "rds":
            status, headers, body = self._call(environ)
            if status.startswith("200"):
                body = self.emu._rewrite_rds(body)
            return self._respond(start_response, status, headers, body)
        if service == "route53" and action == "ChangeResourceRecordSets":
            status, headers, body = self._call(environ)
            if status.startswith("200"):
                body = self.emu._route53_submitted(body)
            return self._respond(start_response, status, headers, body)
        if service == "route53" and action == "GetChange":
            change_id = urllib.parse.unquote(_R53_GET_CHANGE.match(path).group(1))
            submitted = self.emu._changes.get(change_id)
            if submitted is None:
                return self._error(start_response, "route53", 404, "NoSuchChange",
                                   f"A change with the specified change ID does not exist: {change_id}")
            status, headers, body = self._call(environ)
            if time.monotonic() - submitted < self.emu.propagation_seconds:
                body = body.replace(b"<Status>INSYNC</Status>", b"<Status>PENDING</Status>")
            return self._respond(start_response, status, headers, body)
        if service == "route53" and action == "GetHealthCheckStatus":
            status, headers, body = self._call(environ)
            if status.startswith("200"):
                body = self.emu._health_observation(urllib.parse.unquote(_R53_HC_STATUS.match(path).group(1)), body)
            return self._respond(start_response, status, headers, body)
        return self.app(environ, start_response)

    def _fault(self, start_response, service: str, fault: Fault) -> list[bytes]:
        """A fault answered the way AWS answers (werkzeug cannot drop a connection unanswered: a dropped one is
        AWS's other transient answer, a 500)."""
        if fault.delay:
            time.sleep(fault.delay)
        if fault.drop:
            return self._error(start_response, service, 500, "InternalFailure", "random fault (lab): InternalFailure")
        status = fault.status or 500
        if fault.kind == "planned":
            code = fault.code or _AWS_CODES.get(status, "InternalFailure")
            return self._error(start_response, service, status, code, fault.message or f"injected by the lab: {code}")
        if status == 429:
            code = {"rds": "Throttling", "route53": "Throttling", "s3": "SlowDown"}.get(service, "Throttling")
            status = 400 if service in ("rds", "monitoring") else status
        else:
            code = "ServiceUnavailable"
        return self._error(start_response, service, status, code, f"random fault (lab): {code}")

    @staticmethod
    def _read_body(environ: dict) -> bytes:
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        body = environ["wsgi.input"].read(length) if length > 0 else b""
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        return body

    def _promote(self, environ, start_response, region: str, params: dict[str, str]) -> list[bytes]:
        ident = params.get("DBInstanceIdentifier", "")
        emu = self.emu
        with emu.lock:
            db = _rds_db(region, ident)
            if db is None:
                return self._error(start_response, "rds", 404, "DBInstanceNotFound", f"DBInstance {ident} not found.")
            if not db.is_replica:
                return self._error(start_response, "rds", 400, "InvalidDBInstanceState",
                                   f"DB Instance {ident} is not a read replica.")
            mapped = emu.instances.get(ident)
            if mapped is not None:
                db.status = "modifying"  # as RDS answers; available again once PostgreSQL has been promoted
        status, headers, body = self._call(environ)
        if mapped is not None:
            if status.startswith("200"):
                emu._start_promotion(mapped)
            else:
                with emu.lock:
                    db.status = "available"
        elif status.startswith("200"):
            with emu.lock:  # no data plane behind it: only the bookkeeping moto leaves out
                _detach_replica(db, region)
        if status.startswith("200"):
            body = emu._rewrite_rds(body)
        return self._respond(start_response, status, headers, body)

    # -- creating, restoring and deleting instances: the data plane follows ------------------------------
    def _create(self, environ, start_response, region: str, params: dict[str, str], action: str) -> list[bytes]:
        """CreateDBInstance[ReadReplica]: an identifier in use is DBInstanceAlreadyExists (moto would overwrite it).
        A read replica whose identifier was mapped onto a lab cluster before (an instance deleted to be replaced,
        as RDS failback goes) rebuilds that cluster as a streaming replica of the source's cluster, in the
        background (lab.postgres.rebuild_replica: pg_rewind, else a fresh base backup; same port): `creating`
        until it streams, then `available`; `failed` if the rebuild fails (the error in /_emulator/state)."""
        emu = self.emu
        ident = params.get("DBInstanceIdentifier", "")
        with emu.lock:
            if _rds_db(region, ident) is not None:
                return self._error(start_response, "rds", 400, "DBInstanceAlreadyExists", "DB instance already exists")
            old = emu.instances.get(ident)
            primary = src_db = None
            if action == "CreateDBInstanceReadReplica":
                src_db = _rds_db(region, params.get("SourceDBInstanceIdentifier", ""))
                primary = emu.instances.get(src_db.db_instance_identifier) if src_db is not None else None
            rebuild = (old is not None and old.cluster is not None and not old.scratch and old.region == region
                       and primary is not None and primary.cluster is not None and not primary.deleted
                       and old.job is None)
            # RDS gives a cross-region replica the default parameter group unless one is named (moto copies the
            # source's, which does not exist in this region).
            keep_group = None
            if action == "CreateDBInstanceReadReplica" and src_db is not None and src_db.region != region \
                    and not params.get("DBParameterGroupName"):
                keep_group, src_db.db_parameter_group_name = src_db.db_parameter_group_name, None
            if rebuild:  # before moto creates it: no answer may show the new replica `available` before it is
                old.deleted, old.job = False, "rebuilding"
            status = "500 INTERNAL SERVER ERROR"
            try:
                status, headers, body = self._call(environ)
            finally:
                if keep_group is not None:
                    src_db.db_parameter_group_name = keep_group
                if rebuild and not status.startswith("200"):
                    old.deleted, old.job = True, None
            if status.startswith("200") and rebuild:
                db = _rds_db(region, ident)
                db.status, db.port = "creating", old.port
                old.last_error, old.promotion = None, None
                body = _set_status(body, ident, "creating")
                old.thread = threading.Thread(target=emu._rebuild_cluster, args=(old, primary), name=f"rebuild-{ident}",
                                              daemon=True)
                old.thread.start()
            elif status.startswith("200") and old is not None and old.deleted:
                log.warning("lab: %s created again without a data plane (source not mapped onto a lab cluster)", ident)
        if status.startswith("200"):
            body = emu._rewrite_rds(body)
        return self._respond(start_response, status, headers, body)

    def _restore(self, environ, start_response, region: str, params: dict[str, str]) -> list[bytes]:
        """RestoreDBInstanceToPointInTime of an instance mapped onto an archiving lab cluster: a NEW cluster restored
        from the lab's base backup and WAL archive to RestoreTime (lab.postgres.restore_to_time), `creating` until
        it accepts connections, then `available` with its Endpoint at 127.0.0.1:<its port>. The time must lie in
        [earliest, latest] restorable (the base backup's end, the newest archived commit), as RDS checks."""
        emu = self.emu
        target = params.get("TargetDBInstanceIdentifier", "")
        source = params.get("SourceDBInstanceIdentifier", "")
        with emu.lock:
            src_db = _rds_db(region, source)
            src = emu.instances.get(src_db.db_instance_identifier) if src_db is not None else None
            exists = _rds_db(region, target) is not None
        if src is None or src.cluster is None or src.deleted or exists:
            return self._passthrough(environ, start_response)  # moto answers (not found, already exists, no data plane)
        from lab.postgres import Cluster, archive_dir_of

        archive = archive_dir_of(Cluster.from_dict(src.cluster))
        if archive is None:
            return self._error(start_response, "rds", 400, "PointInTimeRestoreNotEnabled",
                               f"DB instance {src.ident}: the lab cluster behind it does not archive WAL "
                               "(init_primary(archive_dir=...))")
        earliest, latest = emu._restorable(src)
        if latest is None:
            return self._error(start_response, "rds", 400, "InvalidRestoreFault",
                               f"DB instance {src.ident} has no restorable time yet (no transaction archived since "
                               "its base backup)")
        if (params.get("UseLatestRestorableTime") or "").lower() == "true":
            point = latest
        elif params.get("RestoreTime"):
            try:
                point = _parse_time(params["RestoreTime"])
            except ValueError:
                return self._error(start_response, "rds", 400, "InvalidParameterValue",
                                   f"RestoreTime {params['RestoreTime']!r} is not a timestamp")
        else:
            return self._error(start_response, "rds", 400, "InvalidParameterCombination",
                               "Specify RestoreTime or UseLatestRestorableTime")
        if point > latest:
            return self._error(start_response, "rds", 400, "InvalidParameterValue",
                               f"The RestoreTime {_iso(point)} is after the latest restorable time {_iso(latest)} "
                               f"of {src.ident}")
        if earliest is not None and point < earliest:
            return self._error(start_response, "rds", 400, "InvalidParameterValue",
                               f"The RestoreTime {_iso(point)} is before the earliest restorable time "
                               f"{_iso(earliest)} of {src.ident}")
        with emu.lock:
            # Registered before moto creates it: no answer may show the instance `available` before it is.
            inst = _Instance(target, region, "", scratch=True, job="restoring", restore_point=_iso(point))
            emu.instances[target] = inst
            status, headers, body = self._call(environ)
            if not status.startswith("200"):
                emu.instances.pop(target, None)
            else:
                db = _rds_db(region, target)
                # What moto copies from the source and RDS does not: replication links, and the parameter group
                # (a restored instance gets the default group unless one is named).
                db.status, db.is_replica, db.source_db_instance_identifier, db.replicas = "creating", False, None, []
                if not params.get("DBParameterGroupName"):
                    db.db_parameter_group_name = None
                body = _set_status(body, target, "creating")
                inst.thread = threading.Thread(target=emu._restore_cluster,
                                               args=(inst, dict(src.cluster), archive, point),
                                               name=f"restore-{target}", daemon=True)
                inst.thread.start()
        if status.startswith("200"):
            body = emu._rewrite_rds(body)
        return self._respond(start_response, status, headers, body)

    def _delete(self, environ, start_response, region: str, params: dict[str, str]) -> list[bytes]:
        """DeleteDBInstance: a restored (scratch) instance's cluster is dropped; a mapped instance's cluster is
        stopped and kept (RDS deletes the server; the lab keeps the data for a later rebuild as a replica).
        A running restore or rebuild finishes first. Cross-region replicas are detached first (moto cannot)."""
        emu = self.emu
        ident = params.get("DBInstanceIdentifier", "")
        with emu.lock:
            db = _rds_db(region, ident)
            inst = emu.instances.get(ident)
            job = inst.thread if inst is not None and inst.job else None
        if db is None or db.deletion_protection:
            return self._passthrough(environ, start_response)
        if job is not None:
            job.join(timeout=600)
        with emu.lock:
            db = _rds_db(region, ident)
            if db is not None and db.is_replica:
                _detach_replica(db, region)
            status, headers, body = self._call(environ)
            gone = None
            if status.startswith("200") and inst is not None:
                if inst.scratch:
                    emu.instances.pop(ident, None)
                else:
                    inst.deleted = True
                gone = inst
        if gone is not None and gone.cluster is not None:
            emu._retire_cluster(gone)
        return self._respond(start_response, status, headers, body)

    def _passthrough(self, environ, start_response) -> list[bytes]:
        status, headers, body = self._call(environ)
        if status.startswith("200"):
            body = self.emu._rewrite_rds(body)
        return self._respond(start_response, status, headers, body)

    def _admin(self, environ, start_response, path: str) -> list[bytes]:
        raw = self._read_body(environ)
        try:
            body = json.loads(raw) if raw.strip() else None
        except ValueError as e:
            return self._json(start_response, {"error": {"code": "BadRequest", "message": str(e)}}, "400 Bad Request")
        status, payload = self.emu.admin(environ.get("REQUEST_METHOD", "GET"), path, body)
        return self._json(start_response, payload, f"{status} {_PHRASES.get(status, 'Error')}")


# -- the emulator -------------------------------------------------------------------------------------


class AwsEmulator(Emulator):
    """A running emulator: ``url``, ``info()``, ``state()``, ``map_instance()``, ``inject_fault()``, ``stop()``."""

    join_timeout = 10.0

    def __init__(self, config: dict[str, Any], port: int = 0, verbose: bool = False):
        super().__init__()
        self.config = config or {}
        self.host = self.config.get("host", "127.0.0.1")
        self.port = port
        self.verbose = verbose
        self.instances: dict[str, _Instance] = {}
        self.propagation_seconds = float((self.config.get("route53") or {}).get("propagation_seconds", 1.0))
        self.metrics_interval = float(self.config.get("metrics_interval", 5))
        self.promote_delay = float(self.config.get("promote_delay", 0))
        self.restore_delay = float(self.config.get("restore_delay", 0))  # extra seconds a restore stays `creating`
        # extra seconds a replica rebuild stays `creating`
        self.rebuild_delay = float(self.config.get("rebuild_delay", 0))
        self._restorable_lock = threading.Lock()
        self._restorable_cache: dict[str, tuple] = {}
        self._changes: dict[str, float] = {}
        self._info: dict[str, Any] = {}

    # lifecycle
    def start(self) -> "AwsEmulator":
        global _running
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        with _running_lock:
            if _running is not None:
                raise RuntimeError(f"an AWS emulator already runs in this process ({_running.url}); moto's state "
                                   "is per process")
            _running = self
        try:
            _reset_moto()
            verbose = self.verbose

            class Handler(MotoRequestHandler):
                def log_request(self, *args, **kwargs):  # the dev server logs every request otherwise
                    if verbose:
                        super().log_request(*args, **kwargs)

            app = _Middleware(DomainDispatcherApplication(create_backend_app), self)
            server = make_server(self.host, self.port, app, threaded=True, request_handler=Handler)
            self.port = server.server_port
            self.url = f"http://{self.host}:{self.port}"
            self.serve(server, "aws-emulator")
            self._seed()
            if self.metrics_interval > 0:
                self.run(self._metrics_loop, "aws-emulator-metrics")
        except BaseException:
            self.stop()
            raise
        return self

    def after_stop(self) -> None:
        global _running
        self._drop_scratch_clusters()
        with _running_lock:
            if _running is self:
                _reset_moto()
                _running = None

    def _drop_scratch_clusters(self) -> None:
        """Restored (scratch) clusters exist only for their RDS instances: they go with the emulator."""
        with self.lock:
            jobs = [i.thread for i in self.instances.values() if i.thread is not None]
        for t in jobs:
            t.join(timeout=120)
        with self.lock:
            scratch = [i for i in self.instances.values() if i.scratch and i.cluster]
            for i in scratch:
                self.instances.pop(i.ident, None)
        for inst in scratch:
            self._retire_cluster(inst)

    # clients for seeding and metrics (over HTTP, like any client)
    def client(self, service: str, region: str = "us-east-1"):
        import boto3

        return boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing").client(
            service, region_name=region, endpoint_url=self.url
        )

    # seeding
    def _seed(self) -> None:
        cfg = self.config
        info: dict[str, Any] = {"url": self.url, "hosted_zones": {}, "health_checks": {}, "instances": {},
                                "buckets": []}

        for b in (cfg.get("s3") or {}).get("buckets", []):
            spec = {"name": b} if isinstance(b, str) else dict(b)
            region = spec.get("region", "us-east-1")
            kwargs: dict[str, Any] = {"Bucket": spec["name"]}
            if region != "us-east-1":
                kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
            self.client("s3", region).create_bucket(**kwargs)
            info["buckets"].append(spec["name"])

        specs = {s["db_instance_identifier"]: s for s in (cfg.get("rds") or {}).get("instances", [])}
        created: dict[str, str] = {}  # id -> ARN

        def create(ident: str, chain: tuple[str, ...] = ()) -> str:
            if ident in created:
                return created[ident]
            if ident in chain:
                raise ValueError(f"rds.instances: replica_of loops through {ident!r}")
            spec = specs[ident]
            region = spec.get("region", "us-east-1")
            rds = self.client("rds", region)
            kwargs: dict[str, Any] = {
                "DBInstanceIdentifier": ident,
                "DBInstanceClass": spec.get("instance_class", "db.t3.micro"),
                "Tags": [{"Key": "opsflow-lab", "Value": "true"}],
            }
            if spec.get("parameter_group"):
                rds.create_db_parameter_group(
                    DBParameterGroupName=spec["parameter_group"],
                    DBParameterGroupFamily=spec.get("parameter_group_family", "postgres15"),
                    Description=f"opsflow lab: {ident}",
                )
                kwargs["DBParameterGroupName"] = spec["parameter_group"]
            port = _cluster_port(spec)
            if port:
                kwargs["Port"] = port
            source = spec.get("replica_of")
            if source:
                if source not in specs:
                    raise ValueError(f"rds.instances.{ident}.replica_of: {source!r} is not an instance of the config")
                source_arn = create(source, chain + (ident,))
                src_region = specs[source].get("region", "us-east-1")
                kwargs["SourceDBInstanceIdentifier"] = source if src_region == region else source_arn
                resp = rds.create_db_instance_read_replica(**kwargs)
            else:
                kwargs.update(
                    Engine=spec.get("engine", "postgres"),
                    MasterUsername=spec.get("master_username", "postgres"),
                    MasterUserPassword="lab-not-a-secret",
                    AllocatedStorage=int(spec.get("allocated_storage", 20)),
                )
                if spec.get("engine_version"):
                    kwargs["EngineVersion"] = str(spec["engine_version"])
                resp = rds.create_db_instance(**kwargs)
            arn = resp["DBInstance"]["DBInstanceArn"]
            created[ident] = arn
            info["instances"][ident] = {"region": region, "arn": arn, "replica_of": source}
            if spec.get("cluster") or spec.get("dsn"):
                self.map_instance(ident, region, cluster=spec.get("cluster"), dsn=spec.get("dsn"))
            return arn

        for ident in specs:
            create(ident)

        r53cfg = cfg.get("route53") or {}
        if r53cfg.get("zones"):
            r53 = self.client("route53")
            for zone in r53cfg["zones"]:
                created = r53.create_hosted_zone(Name=zone["name"], CallerReference=uuid.uuid4().hex)
                zone_id = created["HostedZone"]["Id"]
                zone_id = zone_id.rsplit("/", 1)[-1]
                info["hosted_zones"][zone["name"]] = zone_id
                changes = []
                for rec in zone.get("records", []):
                    for fo in rec.get("failover", []):
                        rrset: dict[str, Any] = {
                            "Name": rec["name"],
                            "Type": rec.get("type", "CNAME"),
                            "TTL": int(rec.get("ttl", 30)),
                            "SetIdentifier": fo["set_identifier"],
                            "Failover": fo["role"].upper(),
                            "ResourceRecords": [{"Value": fo["value"]}],
                        }
                        hc = fo.get("health_check")
                        if hc:
                            hc_cfg = {
                                "Type": hc.get("type", "TCP").upper(),
                                "IPAddress": hc.get("ip", "127.0.0.1"),
                                "Port": int(hc["port"]),
                                "RequestInterval": 10,
                                "FailureThreshold": int(hc.get("failure_threshold", 1)),
                            }
                            if hc.get("path"):
                                hc_cfg["ResourcePath"] = hc["path"]
                            made = r53.create_health_check(CallerReference=uuid.uuid4().hex, HealthCheckConfig=hc_cfg)
                            hc_id = made["HealthCheck"]["Id"]
                            rrset["HealthCheckId"] = hc_id
                            info["health_checks"][fo["set_identifier"]] = hc_id
                        changes.append({"Action": "CREATE", "ResourceRecordSet": rrset})
                if changes:
                    r53.change_resource_record_sets(HostedZoneId=zone_id,
                                                    ChangeBatch={"Comment": "opsflow lab seed", "Changes": changes})
        self._info = info
        if self.metrics_interval > 0:
            self._publish_metrics()

    # mapping, faults, state
    def map_instance(self, ident: str, region: str, cluster: dict | None = None, dsn: str | None = None) -> None:
        spec = {"db_instance_identifier": ident, "cluster": cluster, "dsn": dsn}
        with self.lock:
            if _rds_db(region, ident) is None:
                raise ValueError(f"no RDS instance {ident!r} in {region}")
            self.instances[ident] = _Instance(ident, region, _cluster_dsn(spec),
                                              cluster=dict(cluster) if cluster else None)

    def info(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._info))

    def admin_route(self, method: str, segs: list[str], body: Any) -> tuple[int, Any] | None:
        if segs == ["instances"] and method == "POST":
            self.map_instance(body["db_instance_identifier"], body["region"], cluster=body.get("cluster"),
                              dsn=body.get("dsn"))
            return 200, self.state()["instances"]
        return None

    def describe(self) -> dict[str, Any]:
        with self.lock:
            instances = {}
            for i in self.instances.values():
                db = _rds_db(i.region, i.ident)
                instances[i.ident] = {
                    "region": i.region,
                    "dsn": i.dsn,
                    "rds_status": getattr(db, "status", None),
                    "replica_of": getattr(db, "source_db_instance_identifier", None),
                    "promotion": i.promotion,
                    "last_error": i.last_error,
                    "port": i.port,
                    "scratch": i.scratch,
                    "deleted": i.deleted,
                    "job": i.job,
                    "restore_point": i.restore_point,
                    "rebuilt": i.rebuilt,
                }
        return {**self.info(), "instances": instances}

    # the data plane behind RDS
    def _start_promotion(self, inst: _Instance) -> None:
        with self.lock:
            inst.promotion, inst.last_error = "running", None
        t = threading.Thread(target=self._promote_cluster, args=(inst,), name=f"promote-{inst.ident}", daemon=True)
        t.start()

    def _promote_cluster(self, inst: _Instance) -> None:
        error = None
        try:
            if self.promote_delay:
                time.sleep(self.promote_delay)
            with _pg(inst.dsn) as conn:
                if conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                    if not conn.execute("SELECT pg_promote(true, 60)").fetchone()[0]:
                        raise RuntimeError("pg_promote() did not finish within 60 s")
        except Exception as e:  # noqa: BLE001 - reported through the control plane, like RDS would
            error = f"{type(e).__name__}: {e}".strip()
        with self.lock:
            db = _rds_db(inst.region, inst.ident)
            if db is None:
                return
            if error:
                log.error("lab: promotion of %s failed: %s", inst.ident, error)
                db.is_replica, db.status = True, "available"
                inst.promotion, inst.last_error = "failed", error
                return
            source = db.source_db_instance_identifier
            db.status = "available"
            _detach_replica(db, inst.region)
            inst.promotion, inst.promoted_at = "done", time.time()
            log.info("lab: promoted %s (was a replica of %s)", inst.ident, source)

    def _rebuild_cluster(self, old: _Instance, primary: _Instance) -> None:
        """Background part of CreateDBInstanceReadReplica over a known cluster: rebuild it as a replica."""
        error, rebuilt = None, None
        try:
            from lab.postgres import Cluster, cluster_root, rebuild_replica

            if self.rebuild_delay:
                time.sleep(self.rebuild_delay)
            target = Cluster.from_dict(old.cluster)
            rebuilt = rebuild_replica(Cluster.from_dict(primary.cluster), target, cluster_root(target))
        except Exception as e:  # noqa: BLE001 - reported through the control plane, like RDS would
            error = f"{type(e).__name__}: {e}".strip()
        with self.lock:
            old.job, old.thread = None, None
            db = _rds_db(old.region, old.ident)
            if error:
                log.error("lab: rebuilding %s as a replica of %s failed: %s", old.ident, primary.ident, error)
                old.last_error = error
                if db is not None:
                    db.status = "failed"
                return
            info = rebuilt.rebuild
            old.dsn = rebuilt.dsn
            old.rebuilt = {"source": primary.ident, "method": info.method if info else None,
                           "seconds": info.seconds if info else None,
                           "fallback_reason": info.fallback_reason if info else None,
                           "moved_aside": str(info.moved_aside) if info and info.moved_aside else None}
            if db is not None:
                db.status = "available"
            log.info("lab: %s rebuilt as a replica of %s (%s)", old.ident, primary.ident, old.rebuilt["method"])

    def _restore_cluster(self, inst: _Instance, source: dict, archive: Path, point) -> None:
        """Background part of RestoreDBInstanceToPointInTime: a new cluster restored to `point`."""
        from lab.postgres import Cluster, base_backup_for, cluster_root, drop_cluster, restore_to_time

        error, restored = None, None
        try:
            base_root = cluster_root(Cluster.from_dict(source))
            backup = base_backup_for(base_root, point)
            if backup is None:
                raise RuntimeError(f"no base backup under {base_root} ends before {_iso(point)}")
            root = base_root / RESTORES_DIR
            home = root / inst.ident
            if home.exists():  # left by an earlier emulator (its moto state is gone): ours to remove
                drop_cluster(Cluster(name=inst.ident, datadir=home / "data", port=0, logfile=home / "postgres.log"))
            if self.restore_delay:
                time.sleep(self.restore_delay)
            restored = restore_to_time(backup, archive, root, inst.ident, point)
        except Exception as e:  # noqa: BLE001 - reported through the control plane, like RDS would
            error = f"{type(e).__name__}: {e}".strip()
        orphan = None
        with self.lock:
            inst.job, inst.thread = None, None
            db = _rds_db(inst.region, inst.ident)
            if error:
                log.error("lab: restore of %s failed: %s", inst.ident, error)
                inst.last_error = error
                if db is not None:
                    db.status = "incompatible-restore"
            elif db is None or self.instances.get(inst.ident) is not inst:
                orphan = restored  # deleted while it was restored
            else:
                inst.cluster, inst.dsn = restored.to_dict(), restored.dsn
                db.port, db.status = restored.port, "available"
                log.info("lab: restored %s to %s on port %s", inst.ident, inst.restore_point, restored.port)
        if orphan is not None:
            drop_cluster(orphan)

    def _retire_cluster(self, inst: _Instance) -> None:
        """The data plane of a deleted instance: a scratch cluster is dropped, any other one stopped (kept)."""
        from lab.postgres import Cluster, drop_cluster

        cluster = Cluster.from_dict(inst.cluster)
        try:
            if inst.scratch:
                drop_cluster(cluster)
                log.info("lab: dropped the cluster of %s", inst.ident)
            else:
                try:
                    cluster.stop("fast")
                except Exception:  # noqa: BLE001 - a server that will not stop cleanly is killed, as a deleted host
                    cluster.kill()
                log.info("lab: stopped the cluster of deleted instance %s (kept for a rebuild)", inst.ident)
        except Exception as e:  # noqa: BLE001 - the control plane already answered; note it
            log.warning("lab: could not retire the cluster of %s: %s", inst.ident, e)
            with self.lock:
                inst.last_error = f"retire: {e}"

    def _restorable(self, inst: _Instance) -> tuple:
        """(earliest, latest) restorable time of a mapped instance's cluster: the end of its oldest base backup,
        and the commit time of the newest archived transaction (cached per state of the archive). (None, None)
        without a WAL archive; latest None when nothing after the base backup is archived yet."""
        if not inst.cluster:
            return None, None
        from lab.postgres import (
            Cluster,
            archive_dir_of,
            cluster_root,
            earliest_restorable_time,
            last_archived_commit_time,
        )

        cluster = Cluster.from_dict(inst.cluster)
        archive = archive_dir_of(cluster)
        if archive is None:
            return None, None
        try:
            entries = [e for e in os.scandir(archive) if re.fullmatch(r"[0-9A-F]{24}", e.name)]
            newest = max(entries, key=lambda e: e.name) if entries else None
            key = (len(entries), newest.name if newest else None, newest.stat().st_mtime if newest else None)
            with self._restorable_lock:
                cached = self._restorable_cache.get(str(archive))
            if cached and cached[0] == key:
                latest = cached[1]
            else:
                latest = last_archived_commit_time(archive) if entries else None
                with self._restorable_lock:
                    self._restorable_cache[str(archive)] = (key, latest)
            earliest = earliest_restorable_time(cluster_root(cluster))
        except Exception as e:  # noqa: BLE001 - no restore window rather than a failed describe
            log.warning("lab: restorable window of %s: %s", inst.ident, e)
            return None, None
        if latest is not None and earliest is not None and latest < earliest:
            latest = None
        return earliest, latest

    def _rewrite_rds(self, body: bytes) -> bytes:
        """What RDS answers about instances mapped onto lab clusters (lab-only): Endpoint Address/Port are
        127.0.0.1 and the cluster's port (a client reaches the cluster where RDS says the instance is), and
        LatestRestorableTime is the newest archived commit of the cluster's WAL archive (absent without one);
        DescribeDBInstanceAutomatedBackups gets the RestoreWindow (earliest: the base backup's end)."""
        if b"<DBInstance>" not in body and b"<DBInstanceAutomatedBackup>" not in body:
            return body
        with self.lock:
            mapped = {i.ident: i for i in self.instances.values() if not i.deleted}

        def instance_of(block: bytes) -> _Instance | None:
            m = _DBI_IDENT.search(block)
            return mapped.get(m.group(1).decode()) if m else None

        def fix(m: re.Match) -> bytes:
            block = m.group(0)
            inst = instance_of(block)
            if inst is not None and inst.job:  # the data plane is still being built
                block = re.sub(rb"<DBInstanceStatus>[^<]*</DBInstanceStatus>",
                               b"<DBInstanceStatus>creating</DBInstanceStatus>", block, count=1)
            if inst is None or inst.cluster is None:
                return block
            if not inst.job:
                endpoint = f"<Endpoint><Address>127.0.0.1</Address><Port>{inst.port}</Port></Endpoint>".encode()
                block = re.sub(rb"<Endpoint>.*?</Endpoint>", endpoint, block, count=1, flags=re.S)
                block = re.sub(rb"<DbInstancePort>\d*</DbInstancePort>",
                               f"<DbInstancePort>{inst.port}</DbInstancePort>".encode(), block, count=1)
            _, latest = self._restorable(inst)
            block = re.sub(rb"<LatestRestorableTime>[^<]*</LatestRestorableTime>", b"", block)
            if latest is not None:
                tail = f"<LatestRestorableTime>{_iso(latest)}</LatestRestorableTime></DBInstance>"
                block = block.replace(b"</DBInstance>", tail.encode())
            return block

        def fix_backup(m: re.Match) -> bytes:
            block = m.group(0)
            inst = instance_of(block)
            if inst is None or inst.cluster is None:
                return block
            earliest, latest = self._restorable(inst)
            if earliest is None or latest is None:
                return block
            window = (f"<RestoreWindow><EarliestTime>{_iso(earliest)}</EarliestTime>"
                      f"<LatestTime>{_iso(latest)}</LatestTime></RestoreWindow>")
            block = re.sub(rb"<RestoreWindow>.*?</RestoreWindow>", b"", block, flags=re.S)
            return block.replace(b"</DBInstanceAutomatedBackup>", window.encode() + b"</DBInstanceAutomatedBackup>")

        body = _DBI_BLOCK.sub(fix, body)
        return _DBI_BACKUP_BLOCK.sub(fix_backup, body)

    def _relay_parameters(self, region: str, params: dict[str, str]) -> None:
        group = (params.get("DBParameterGroupName") or "").lower()
        entries: dict[str, dict[str, str]] = {}
        for key, value in params.items():
            m = re.match(r"^Parameters\.(?:Parameter|member)\.(\d+)\.(\w+)$", key)
            if m:
                entries.setdefault(m.group(1), {})[m.group(2)] = value
        relayed = [
            e for e in entries.values()
            if e.get("ParameterName") in _RELAYED_PARAMETERS and e.get("ApplyMethod", "immediate") == "immediate"
        ]
        if not relayed:
            return
        with self.lock:
            targets = []
            for inst in self.instances.values():
                db = _rds_db(inst.region, inst.ident)
                if inst.region == region and db is not None and (db.db_parameter_group_name or "").lower() == group:
                    targets.append(inst)
        for inst in targets:
            try:
                with _pg(inst.dsn) as conn:
                    for e in relayed:
                        name, value = e["ParameterName"], e.get("ParameterValue")
                        if name == "default_transaction_read_only" and value is not None:
                            value = "on" if value.strip().lower() in ("1", "on", "true") else "off"
                        if value is None or value == "":
                            conn.execute(f"ALTER SYSTEM RESET {name}")
                        else:
                            conn.execute(f"ALTER SYSTEM SET {name} = {_literal(value)}")
                    conn.execute("SELECT pg_reload_conf()")
                log.info("lab: parameter group %s -> %s: %s", group, inst.ident, relayed)
            except Exception as e:  # noqa: BLE001 - RDS would apply it when the instance is back
                log.warning("lab: could not apply parameter group %s to %s: %s", group, inst.ident, e)
                with self.lock:
                    inst.last_error = f"parameter group {group}: {e}"

    def _route53_submitted(self, body: bytes) -> bytes:
        m = re.search(rb"<Id>(?:/change/)?([^<]+)</Id>", body)
        if m:
            self._changes[m.group(1).decode()] = time.monotonic()
            if self.propagation_seconds > 0:
                body = body.replace(b"<Status>INSYNC</Status>", b"<Status>PENDING</Status>")
        return body

    def _health_observation(self, hc_id: str, body: bytes) -> bytes:
        try:
            hc = _route53_backend().get_health_check(hc_id)
        except Exception:  # noqa: BLE001 - moto answered already; keep its answer
            return body
        if not hc.ip_address:
            return body
        ok, text = _probe(hc.type_, hc.ip_address, int(hc.port), hc.resource_path)
        if hc.inverted:
            ok = not ok
        body = re.sub(rb"<Status>.*?</Status>", b"<Status>" + escape(text).encode() + b"</Status>", body, count=1,
                      flags=re.S)
        return re.sub(rb"<IPAddress>.*?</IPAddress>", b"<IPAddress>" + hc.ip_address.encode() + b"</IPAddress>", body,
                      count=1)

    def _metrics_loop(self) -> None:
        while not self.stop_event.wait(self.metrics_interval):
            self._publish_metrics()

    def _publish_metrics(self) -> None:
        with self.lock:
            targets = [(i, _rds_db(i.region, i.ident)) for i in self.instances.values()]
        for inst, db in targets:
            if db is None or not db.is_replica:
                continue
            try:
                with _pg(inst.dsn) as conn:
                    lag = conn.execute(
                        "SELECT CASE WHEN NOT pg_is_in_recovery() THEN NULL"
                        " WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0"
                        " ELSE COALESCE(EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()), 0) END"
                    ).fetchone()[0]
                if lag is None:
                    continue
                self.client("cloudwatch", inst.region).put_metric_data(
                    Namespace="AWS/RDS",
                    MetricData=[{
                        "MetricName": "ReplicaLag",
                        "Dimensions": [{"Name": "DBInstanceIdentifier", "Value": inst.ident}],
                        "Value": float(lag),
                        "Unit": "Seconds",
                    }],
                )
            except Exception as e:  # noqa: BLE001 - no datapoint, as CloudWatch would have none
                log.debug("lab: no ReplicaLag for %s: %s", inst.ident, e)


_DBI_BLOCK = re.compile(rb"<DBInstance>.*?</DBInstance>", re.S)
_DBI_BACKUP_BLOCK = re.compile(rb"<DBInstanceAutomatedBackup>.*?</DBInstanceAutomatedBackup>", re.S)
_DBI_IDENT = re.compile(rb"<DBInstanceIdentifier>([^<]*)</DBInstanceIdentifier>")
RESTORES_DIR = "rds-restores"  # restored clusters live under <source cluster root>/rds-restores/<identifier>


def _parse_time(text: str) -> datetime:
    t = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


def _iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _set_status(body: bytes, ident: str, status: str) -> bytes:
    """DBInstanceStatus of instance `ident` in an RDS XML answer."""
    def fix(m: re.Match) -> bytes:
        block = m.group(0)
        im = _DBI_IDENT.search(block)
        if not im or im.group(1).decode() != ident:
            return block
        return re.sub(rb"<DBInstanceStatus>[^<]*</DBInstanceStatus>",
                      b"<DBInstanceStatus>" + status.encode() + b"</DBInstanceStatus>", block, count=1)

    return _DBI_BLOCK.sub(fix, body)


def _literal(value: str) -> str:
    if re.fullmatch(r"-?\d+(\.\d+)?", value):
        return value
    return "'" + value.replace("'", "''") + "'"


def start_emulator(config: dict[str, Any], port: int = 0, verbose: bool = False) -> AwsEmulator:
    """Start moto + the lab middleware on loopback, seed it from ``config``; returns the running emulator."""
    return AwsEmulator(config, port, verbose).start()


def _load_config(path: str) -> dict[str, Any]:
    text = Path(path).read_text()
    if path.endswith(".json"):
        return json.loads(text)
    import yaml

    return yaml.safe_load(text) or {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m lab.aws_emulator",
        description="moto (RDS, Route 53, S3, CloudWatch) with the lab's PostgreSQL behind RDS")
    ap.add_argument("--config", required=True, help="YAML or JSON file (see the module docstring)")
    ap.add_argument("--port", type=int, default=0, help="0: any free port (the info line says which)")
    ap.add_argument("--host", default=None, help="default: the config's host, else 127.0.0.1")
    ap.add_argument("--info-file", help="write the info JSON here once ready")
    ap.add_argument("-v", "--verbose", action="store_true", help="log every request")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = _load_config(args.config)
    if args.host:
        config["host"] = args.host
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    emu = start_emulator(config, args.port, verbose=args.verbose)
    try:
        line = json.dumps(emu.info())
        if args.info_file:
            tmp = Path(args.info_file + ".tmp")
            tmp.write_text(line + "\n")
            tmp.replace(args.info_file)
        print(line, flush=True)
        done.wait()
    finally:
        emu.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
