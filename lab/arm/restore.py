"""Point-in-time restores.

    PUT    .../flexibleServers/{server}              createMode PointInTimeRestore (sourceServerResourceId,
                                                     pointInTimeUTC): REALLY restores a new lab cluster from the
                                                     source's base backup and WAL archive to that time
                                                     (lab.postgres.restore_to_time)

A restore first makes everything committed on a running source primary restorable (lab.postgres.archive_now),
as Azure's continuous WAL archiving does, so any point up to now can be restored. A point in the future or before
earliestRestoreDate is refused at once (400 PointInTimeInFuture / PointInTimeBeforeEarliestRestoreDate); an
unknown source is 404 ResourceNotFound; a restore that fails later fails its operation and leaves the server
in state "Disabled" (a state of the API's enumeration: it will never become usable) until it is deleted.

Restored servers listen on PostgreSQL's port 5432 at a loopback address of their own (127.x.y.z, all of
127.0.0.0/8 is loopback on Linux), which is their fullyQualifiedDomainName: clients reach them the way they reach
Azure's servers, with no lab-only mapping.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone

from lab.arm.common import REPLICA_ROLES, ArmError, bad_request, first_line, iso, parse_time
from lab.arm.lifecycle import ServerLifecycle, cluster_dict, new_server
from lab.arm.operations import Answer
from lab.postgres import Cluster, PostgresLabError, archive_now, base_backup_for, restore_to_time

log = logging.getLogger("opsflow.lab.arm_emulator")


class Restores(ServerLifecycle):
    def create_restore(self, rg: str, name: str, existing: dict | None, live: bool, source: dict, props: dict,
                       location: str, tags: dict, base: str, api_version: str) -> Answer:
        raw = props.get("pointInTimeUTC")
        if raw is None:
            raise bad_request("'properties.pointInTimeUTC' is required with createMode PointInTimeRestore.",
                              "InvalidParameterValue")
        try:
            point = parse_time(raw)
        except ValueError:
            raise bad_request(f"pointInTimeUTC '{raw}' is not a date-time (ISO 8601, e.g. 2024-05-01T03:00:00Z).",
                              "InvalidParameterValue") from None
        request = {"mode": "PointInTimeRestore", "source": source["name"], "point": iso(point)}
        if live:
            assert existing is not None
            if existing["create"] == request:
                return self.repeat_create(existing, base, api_version)
            raise ArmError(409, "ServerNameAlreadyExists",
                           f"Server '{name}' already exists; delete it first or restore into another name.")
        paths = self.backup_paths(source)
        if paths is None:
            why = (f"it is a read replica (of '{source['source']}'); restore its primary"
                   if source["role"] in REPLICA_ROLES else
                   "its lab cluster does not archive WAL (lab.postgres.init_primary(archive_dir=...)) and no "
                   "'backups' are configured for it")
            raise bad_request(f"Server '{source['name']}' has no backups the emulator can restore: {why}.",
                              "SourceServerHasNoBackups")
        now = datetime.now(timezone.utc)
        if point > now:
            raise bad_request(f"The point in time {iso(point)} (pointInTimeUTC) is in the future: it is {iso(now)} "
                              "now. Restore to a point between the earliest restore date and now.",
                              "PointInTimeInFuture")
        earliest = self.earliest_restore(source)
        if earliest is None:
            raise bad_request(f"Server '{source['name']}' has no base backup yet; nothing can be restored.",
                              "NoBackupAvailable")
        if point < earliest:
            raise bad_request(f"The point in time {iso(point)} (pointInTimeUTC) is before the earliest restore date "
                              f"{iso(earliest)} of server '{source['name']}' (properties.backup.earliestRestoreDate; "
                              f"backup retention {paths['retention_days']} days).",
                              "PointInTimeBeforeEarliestRestoreDate")
        root = paths["clusters_root"]
        cluster = cluster_dict(root, name, own_address=True)
        srv = new_server(name, rg, location, source, cluster, tags, request, "Primary")
        source_cluster = source.get("_cluster")

        def prepare() -> None:
            self.claim(name.lower(), existing, srv)
            srv["provisioning"] = True

        def work(op: dict) -> None:
            probe = self.probe(source, max_age=0)
            if source_cluster and probe.get("reachable") and probe.get("in_recovery") is False:
                # Azure archives WAL continuously: everything committed up to now is restorable.
                try:
                    archive_now(Cluster.from_dict(source_cluster))
                except PostgresLabError as e:
                    log.warning("restore %s: could not archive the source's latest WAL: %s", name, first_line(e))
            backup = base_backup_for(paths["base_backup_dir"], point)
            if backup is None:
                raise ArmError(400, "NoBackupAvailable", f"No base backup of '{source['name']}' ends before "
                                                         f"{iso(point)}.")
            op["percentComplete"] = 10
            try:
                restore_to_time(backup, paths["archive_dir"], root, name, point, port=cluster["port"],
                                host=cluster.get("host") or "127.0.0.1")
            except PostgresLabError as e:
                raise ArmError(400, "RestoreFailed", f"The restore of '{source['name']}' as of {iso(point)} into "
                                                     f"'{name}' failed: {first_line(e)}") from None

        def on_done(status: str, error: dict | None) -> None:
            srv["provisioning"] = False
            srv["failed"] = None if status == "Succeeded" else (
                error or {"code": "InternalServerError", "message": "the restore failed"})

        log.info("point-in-time restore of %s as of %s into %s (port %s)", source["name"], iso(point), name,
                 cluster["port"])
        return self.start_operation(srv, "create (point-in-time restore)", work, self.server_id(srv), base,
                                    api_version, on_done=on_done, prepare=prepare)
