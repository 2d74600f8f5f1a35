"""Read replicas: promotion and Replica creates.

    PATCH  .../flexibleServers/{server}              202 long-running operation (tags); with
                                                     properties.replica {promoteMode Standalone|Switchover,
                                                     promoteOption Planned|Forced} it REALLY promotes the lab
                                                     cluster mapped to the server (pg_promote over SQL); a
                                                     Switchover also makes the old primary its standby
    PUT    .../flexibleServers/{server}              createMode Replica (sourceServerResourceId): makes the
                                                     server a streaming replica of the source: a server that maps
                                                     to a lab cluster, even one just deleted (the old, diverged
                                                     primary of a failback), is rebuilt on its own port
                                                     (lab.postgres.rebuild_replica: pg_rewind, else a fresh base
                                                     backup); otherwise a new replica cluster is created.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from lab.arm.common import (
    INVALID_BODY,
    REPLICA_ROLES,
    ArmError,
    bad_request,
    check_tags,
    first_line,
    lsn_int,
    pg_connect,
    user_tags,
)
from lab.arm.lifecycle import ServerLifecycle, cluster_dict, new_server
from lab.arm.operations import Answer
from lab.arm.virtual_endpoints import VirtualEndpoints
from lab.postgres import (
    Cluster,
    PostgresLabError,
    cluster_root,
    create_replica,
    follow_as_standby,
    rebuild_replica,
    shutdown_checkpoint_lsn,
)

log = logging.getLogger("opsflow.lab.arm_emulator")


class Replicas(ServerLifecycle, VirtualEndpoints):
    # -- promotion -----------------------------------------------------------------------------------------------
    def patch_server(self, srv: dict, body: Any, base: str, api_version: str) -> Answer:
        if not isinstance(body, dict):
            raise bad_request(INVALID_BODY, "InvalidRequestContent")
        props = body.get("properties", {})
        if props is None:
            props = {}
        if not isinstance(props, dict):
            raise bad_request("'properties' must be an object.", "InvalidRequestContent")
        tags = body.get("tags")
        check_tags(tags)
        mode, option = self._promotion(props.get("replica"))
        with self.lock:
            if mode is not None and srv["role"] not in REPLICA_ROLES:
                raise bad_request(f"Server '{srv['name']}' is not a read replica (replication role {srv['role']}); "
                                  "only a read replica can be promoted.", "ReplicaPromotionNotAllowed")
            source = self.servers.get((srv["source"] or "").lower()) if mode is not None else None

        def work(op: dict) -> None:
            if tags is not None:
                with self.lock:
                    srv["tags"] = user_tags(tags)
            if mode is not None:
                self.promote(srv, source, mode, option or "planned", op)

        kind = f"promote {mode}/{option}" if mode else "update"
        return self.start_operation(srv, kind, work, self.server_id(srv), base, api_version)

    @staticmethod
    def _promotion(replica: Any) -> tuple[str | None, str | None]:
        """(promoteMode, promoteOption), lower case, of properties.replica; (None, None): no promotion."""
        if replica is None:
            return None, None
        if not isinstance(replica, dict):
            raise bad_request("'properties.replica' must be an object.", "InvalidRequestContent")
        if replica.get("promoteMode") is None and replica.get("promoteOption") is None:
            return None, None
        mode = str(replica.get("promoteMode") or "").lower()
        option = str(replica.get("promoteOption") or "planned").lower()
        if mode not in ("standalone", "switchover"):
            raise bad_request(f"The value '{replica.get('promoteMode')}' of promoteMode is invalid; use Standalone "
                              "or Switchover.", "InvalidParameterValue")
        if option not in ("planned", "forced"):
            raise bad_request(f"The value '{replica.get('promoteOption')}' of promoteOption is invalid; use Planned "
                              "or Forced.", "InvalidParameterValue")
        return mode, option

    def promote(self, srv: dict, source: dict | None, mode: str, option: str, op: dict) -> None:
        if option == "planned" or mode == "switchover":
            if source is None:
                raise ArmError(400, "PlannedPromotionNotPossible", f"Server '{srv['name']}' has no source server to "
                                                                   "synchronize with; use promoteOption Forced.")
        if mode == "switchover":
            assert source is not None
            self.require_virtual_endpoint(srv, source)
        if option == "planned":
            assert source is not None
            self._wait_synchronized(srv, source, op)
        if mode == "switchover":
            assert source is not None
            self._switchover(srv, source, option, op)
            return
        self._pg_promote(srv)
        with self.lock:
            srv["role"] = "Primary"
            srv["source"] = None
            self.leave_virtual_endpoint(srv, source)
            self.probe_cache.clear()

    def _pg_promote(self, srv: dict) -> None:
        timeout = int(self.settings["promote_timeout"])
        try:
            with pg_connect(srv["dsn"]) as conn:
                in_recovery = conn.execute("select pg_is_in_recovery()").fetchone()[0]
                if in_recovery:
                    ok = conn.execute("select pg_promote(true, %s)", (timeout,)).fetchone()[0]
                    if not ok:
                        raise ArmError(500, "InternalServerError",
                                       f"Server '{srv['name']}': the promotion did not finish within "
                                       f"{self.settings['promote_timeout']}s.")
        except ArmError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ArmError(500, "InternalServerError",
                           f"Server '{srv['name']}': promotion failed: {str(e).strip()}") from None

    def _wait_synchronized(self, srv: dict, source: dict, op: dict) -> None:
        """Planned: wait until the replica has replayed everything its source has written."""
        deadline = time.monotonic() + float(self.settings["planned_sync_timeout"])
        last = ""
        while True:
            try:
                with pg_connect(source["dsn"]) as conn:
                    src_lsn = lsn_int(conn.execute("select pg_current_wal_lsn()::text").fetchone()[0])
            except Exception as e:  # noqa: BLE001
                raise ArmError(
                    400,
                    "PlannedPromotionNotPossible",
                    f"Planned promotion of '{srv['name']}' needs its source server '{source['name']}' to be reachable "
                    f"({str(e).strip().splitlines()[0] if str(e).strip() else e}); use promoteOption Forced.",
                ) from None
            try:
                with pg_connect(srv["dsn"]) as conn:
                    replay = lsn_int(conn.execute("select pg_last_wal_replay_lsn()::text").fetchone()[0])
            except Exception as e:  # noqa: BLE001
                raise ArmError(500, "InternalServerError",
                               f"Server '{srv['name']}' is not reachable: {str(e).strip()}") from None
            if replay >= src_lsn:
                return
            last = f"{src_lsn - replay} bytes behind"
            op["percentComplete"] = 10
            if time.monotonic() > deadline:
                raise ArmError(
                    400,
                    "PlannedPromotionTimedOut",
                    f"Read replica '{srv['name']}' did not synchronize with '{source['name']}' within "
                    f"{self.settings['planned_sync_timeout']}s ({last}).",
                )
            time.sleep(0.1)

    def _switchover(self, srv: dict, source: dict, option: str, op: dict) -> None:
        """Swap roles for real. Planned: stop the source cleanly, wait until the replica has replayed its shutdown
        checkpoint (then it holds every byte), promote it, start the old source as its standby (no rewind). Forced:
        promote at once; the old source is then made a standby of the new primary with pg_rewind (else a fresh
        base backup), best effort: if that fails it stays a standalone server (role None). Lab clusters only."""
        cfg_src, cfg_dst = source.get("_cluster"), srv.get("_cluster")
        if not cfg_src or not cfg_dst:
            raise ArmError(400, "SwitchoverNotSupported",
                           "The emulator can switch over lab clusters only (servers configured with 'cluster').")
        old, new = Cluster.from_dict(cfg_src), Cluster.from_dict(cfg_dst)
        if option == "planned":
            with pg_connect(source["dsn"]) as conn:
                conn.execute("checkpoint")
            old.stop("fast")
            try:
                self._wait_replayed(srv, source, shutdown_checkpoint_lsn(old), op)
            except (ArmError, PostgresLabError) as e:
                old.start(wait=True)  # nothing changed: the source is the primary again
                if isinstance(e, ArmError):
                    raise
                raise ArmError(400, "PlannedSwitchoverNotPossible", f"{first_line(e)}; use promoteOption Forced.") \
                    from None
            self._pg_promote(srv)
            try:
                follow_as_standby(old, new)
            except PostgresLabError as e:
                raise ArmError(500, "InternalServerError", f"Server '{srv['name']}' is the primary now, but "
                                                           f"'{source['name']}' did not follow it: {first_line(e)}") \
                    from None
            demoted = "AsyncReplica"
        else:
            self._pg_promote(srv)
            demoted = "AsyncReplica"
            try:
                rebuild_replica(new, old, cluster_root(old))
            except (PostgresLabError, ValueError) as e:
                log.warning("forced switchover: %s did not become a replica of %s: %s", source["name"], srv["name"],
                            first_line(e))
                demoted = "None"
        with self.lock:
            srv["role"], srv["source"] = "Primary", None
            source["role"], source["source"] = demoted, srv["name"] if demoted != "None" else None
            if demoted == "None":
                self.leave_virtual_endpoint(source, srv)
            else:
                self.switch_virtual_endpoint(srv, source)
            self.probe_cache.clear()

    def _wait_replayed(self, srv: dict, source: dict, checkpoint: str, op: dict) -> None:
        """Planned switchover: the replica must replay past the stopped source's shutdown checkpoint."""
        deadline = time.monotonic() + float(self.settings["planned_sync_timeout"])
        want = lsn_int(checkpoint)
        replay = 0
        while True:
            try:
                with pg_connect(srv["dsn"]) as conn:
                    replay = lsn_int(conn.execute("select pg_last_wal_replay_lsn()::text").fetchone()[0])
            except Exception as e:  # noqa: BLE001
                raise ArmError(500, "InternalServerError",
                               f"Server '{srv['name']}' is not reachable: {first_line(e)}") from None
            if replay > want:
                return
            op["percentComplete"] = 50
            if time.monotonic() > deadline:
                raise ArmError(400, "PlannedPromotionTimedOut",
                               f"Read replica '{srv['name']}' did not replay the shutdown checkpoint {checkpoint} of "
                               f"'{source['name']}' within {self.settings['planned_sync_timeout']}s.")
            time.sleep(0.05)

    # -- createMode Replica ----------------------------------------------------------------------------------------
    def create_replica(self, rg: str, name: str, existing: dict | None, live: bool, source: dict, location: str,
                       tags: dict, base: str, api_version: str) -> Answer:
        request = {"mode": "Replica", "source": source["name"], "point": None}
        if source["role"] in REPLICA_ROLES:
            raise bad_request(f"Server '{source['name']}' is a read replica (of '{source['source']}'); create a "
                              "replica of a primary.", "InvalidSourceServer")
        source_cluster = source.get("_cluster")
        if not source_cluster:
            raise bad_request(f"The emulator builds replicas of lab clusters only; server '{source['name']}' is "
                              "configured with a dsn.", "OperationNotSupported")
        if live:
            assert existing is not None
            with self.lock:
                already = existing["role"] in REPLICA_ROLES and not existing["failed"] \
                    and (existing["source"] or "").lower() == source["name"].lower()
            if already:
                return self.repeat_create(existing, base, api_version)
        if existing is not None and existing.get("_cluster"):
            # The old, diverged primary (deleted or not): rebuilt on its own cluster, port and data directory.
            srv, rebuild = existing, True
            root = cluster_root(Cluster.from_dict(existing["_cluster"]))
        elif existing is not None and live:
            raise bad_request(f"Server '{name}' is configured with a dsn, not a lab cluster: the emulator cannot make "
                              "it a replica.", "OperationNotSupported")
        else:
            paths = self.backup_paths(source)
            root = paths["clusters_root"] if paths is not None else cluster_root(Cluster.from_dict(source_cluster))
            srv = new_server(name, rg, location, source, cluster_dict(root, name), tags, request, "AsyncReplica")
            rebuild = False

        def prepare() -> None:
            self.claim(name.lower(), existing, srv)
            if rebuild:
                # A new server in Azure's eyes: its old settings, tags and configuration overrides are gone.
                srv.update(deleted=False, failed=None, rebuild=None, create=request, role="AsyncReplica",
                           source=source["name"], resource_group=rg, location=location, tags=tags, configurations={},
                           state_override=None)
            srv["provisioning"] = True

        def work(op: dict) -> None:
            primary = Cluster.from_dict(source_cluster)
            t0 = time.monotonic()
            try:
                if rebuild:
                    info = rebuild_replica(primary, Cluster.from_dict(srv["_cluster"]), root).rebuild
                    reason = first_line(info.fallback_reason, 200) if info.fallback_reason else None
                    result = {"method": info.method, "seconds": info.seconds, "fallback_reason": reason}
                else:
                    create_replica(primary, root, name, port=srv["_cluster"]["port"])
                    result = {"method": "new", "seconds": round(time.monotonic() - t0, 3), "fallback_reason": None}
            except PostgresLabError as e:
                raise ArmError(400, "ReplicaCreationFailed", f"Server '{name}' could not be made a replica of "
                                                             f"'{source['name']}': {first_line(e)}") from None
            with self.lock:
                srv["rebuild"] = result

        def on_done(status: str, error: dict | None) -> None:
            srv["provisioning"] = False
            srv["failed"] = None if status == "Succeeded" else (
                error or {"code": "InternalServerError", "message": "the replica creation failed"})

        log.info("replica %s of %s (%s)", name, source["name"], "rebuild of its cluster" if rebuild else "new cluster")
        return self.start_operation(srv, "create (replica)", work, self.server_id(srv), base, api_version,
                                    on_done=on_done, prepare=prepare)
