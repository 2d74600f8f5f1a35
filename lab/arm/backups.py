"""Backups of flexible servers: what can be restored (earliestRestoreDate, the latest restore point) and
on-demand backups (Backups - Create / Get / List By Server).

A server whose lab cluster archives WAL (init_primary(archive_dir=...)) has backups (a read replica has none
until it is promoted); nothing needs configuring, everything is derived from the cluster
(lab.postgres.archive_dir_of, cluster_root). An optional per-server "backups" object in the config overrides
the derivation ("backups": false: none):

    "backups": {"archive_dir": "<labdir>/wal-archive",      # where the cluster archives WAL
                "base_backup_dir": "<labdir>/pg",           # holds base-backups/ (lab.postgres.ensure_base_backup)
                "clusters_root": "<labdir>/pg",             # where restored / new replica clusters are created
                "retention_days": 7}                        # backup.backupRetentionDays

earliestRestoreDate is the end of the oldest base backup (not older than the retention).

    GET    .../flexibleServers/{server}/backups[/{name}]
    PUT    .../flexibleServers/{server}/backups/{name}   202 long-running operation: REALLY keeps the server's data
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lab.arm.common import PG_TYPE, REPLICA_ROLES, ArmError, first_line, iso, now_iso
from lab.arm.operations import Answer, Operations
from lab.postgres import (
    Cluster,
    PostgresLabError,
    archive_dir_of,
    cluster_root,
    earliest_restorable_time,
    last_archived_commit_time,
    take_base_backup,
)

log = logging.getLogger("opsflow.lab.arm_emulator")

BACKUP_KEYS = ("archive_dir", "base_backup_dir", "clusters_root", "retention_days")


def backups_config(name: str, b: Any) -> dict | None | bool:
    """The optional "backups" object of a server: None = derive from its cluster, False = no backups."""
    if b is None or b is True:
        return None
    if b is False:
        return False
    if not isinstance(b, dict):
        raise ValueError(f"flexible server {name}: 'backups' must be an object ({', '.join(BACKUP_KEYS)}) or false")
    unknown = set(b) - set(BACKUP_KEYS)
    if unknown:
        raise ValueError(f"flexible server {name}: unknown backups keys {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(BACKUP_KEYS)})")
    out: dict[str, Any] = {k: (str(b[k]) if b.get(k) is not None else None)
                           for k in BACKUP_KEYS if k != "retention_days"}
    out["retention_days"] = int(b.get("retention_days", 7))
    return out


class Backups(Operations):
    def backup_paths(self, srv: dict) -> dict | None:
        """{archive_dir, base_backup_dir, clusters_root (Paths), retention_days} of a server with backups, else
        None."""
        cfg = srv.get("backups")
        if cfg is False or srv["role"] in REPLICA_ROLES:
            # A read replica offers no restore of its own here (once promoted it does): the emulator's choice,
            # which also keeps the replica's frequent status reads free of archive scans.
            return None
        cfg = cfg or {}
        cluster = srv.get("_cluster")
        archive, base, root = cfg.get("archive_dir"), cfg.get("base_backup_dir"), cfg.get("clusters_root")
        if cluster and not (archive and base and root):
            c = Cluster.from_dict(cluster)
            archive = archive or archive_dir_of(c)
            base = base or cluster_root(c)
            root = root or cluster_root(c)
        if not archive or not base:
            return None
        return {"archive_dir": Path(archive), "base_backup_dir": Path(base), "clusters_root": Path(root or base),
                "retention_days": int(cfg.get("retention_days") or 7)}

    def earliest_restore(self, srv: dict) -> datetime | None:
        paths = self.backup_paths(srv)
        if paths is None:
            return None
        try:
            earliest = earliest_restorable_time(paths["base_backup_dir"])
        except (PostgresLabError, OSError) as e:
            log.warning("server %s: cannot read its base backups: %s", srv["name"], first_line(e))
            return None
        if earliest is None:
            return None
        retention = datetime.now(timezone.utc).timestamp() - paths["retention_days"] * 86400
        return max(earliest, datetime.fromtimestamp(retention, timezone.utc))

    def latest_restore(self, srv: dict, probe: dict | None = None) -> datetime | None:
        """Now for a running source primary (a restore archives its WAL first); else the newest archived commit."""
        paths = self.backup_paths(srv)
        if paths is None:
            return None
        probe = probe if probe is not None else self.probe(srv)
        if probe.get("reachable") and probe.get("in_recovery") is False:
            return datetime.now(timezone.utc)
        key = f"latest:{paths['archive_dir']}"
        cached = self.probe_cache.get(key)
        if cached and time.monotonic() - cached[0] < 10:
            return cached[1]
        try:
            latest = last_archived_commit_time(paths["archive_dir"])
        except (PostgresLabError, OSError, subprocess.SubprocessError):
            latest = None
        self.probe_cache[key] = (time.monotonic(), latest)
        return latest

    def backup_body(self, srv: dict, settled: bool) -> dict:
        """properties.backup of a server."""
        paths = self.backup_paths(srv) if settled else None
        body: dict[str, Any] = {"backupRetentionDays": paths["retention_days"] if paths else 7,
                                "geoRedundantBackup": "Disabled"}
        earliest = self.earliest_restore(srv) if paths else None
        if earliest is not None:
            body["earliestRestoreDate"] = iso(earliest)
        return body

    # -- on-demand backups (Backups - Create / Get / List By Server) -----------------------------------------
    def backup_resource(self, srv: dict, b: dict) -> dict:
        return {"id": f"{self.server_id(srv)}/backups/{b['name']}", "name": b["name"], "type": f"{PG_TYPE}/backups",
                "properties": {"backupType": "Customer On-Demand", "completedTime": b["completedTime"],
                               "source": "Automatic"}}

    def handle_backups(self, srv: dict, method: str, tail: list[str], base: str, api_version: str) -> Answer:
        """An on-demand backup REALLY keeps the server's data: a base backup of its running cluster (pg_basebackup),
        or a copy of the data directory of a stopped one, under <cluster root>/on-demand-backups/<server>-<name>."""
        with self.lock:
            backups = srv.setdefault("on_demand_backups", {})
        if len(tail) == 2 and method == "GET":
            return 200, {"value": [self.backup_resource(srv, b) for b in backups.values()]}, {}
        if len(tail) != 3:
            raise ArmError(404, "NotFound", "The emulator serves backups/{name} only.")
        name = tail[2]
        if method == "GET":
            if name not in backups:
                raise ArmError(404, "ResourceNotFound", f"The backup '{name}' of server '{srv['name']}' was not found.")
            return 200, self.backup_resource(srv, backups[name]), {}
        if method != "PUT":
            raise ArmError(405, "MethodNotAllowed",
                           f"The method {method} is not supported on a backup by the emulator.")
        if name in backups:
            return 200, self.backup_resource(srv, backups[name]), {}
        cluster = srv.get("_cluster")
        if not cluster:
            raise ArmError(400, "OperationNotSupported", f"Server '{srv['name']}' has no lab cluster to back up.")

        def work(op: dict) -> None:
            c = Cluster.from_dict(cluster)
            dest = cluster_root(c) / "on-demand-backups" / f"{srv['name']}-{name}"
            if dest.exists():
                shutil.rmtree(dest)  # a half-made one from an emulator that died
            dest.parent.mkdir(parents=True, exist_ok=True)
            if c.is_running():
                take_base_backup(c, dest)
            else:
                shutil.copytree(c.datadir, dest / "data", symlinks=True)
            with self.lock:
                backups[name] = {"name": name, "completedTime": now_iso(), "path": str(dest)}

        return self.start_operation(srv, "backup", work, f"{self.server_id(srv)}/backups/{name}", base, api_version)
