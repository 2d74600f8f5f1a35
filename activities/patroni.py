"""Patroni: the `DatabaseProvider` for provider "patroni", one Patroni cluster per region, driven through Patroni's
REST API (GET /cluster, /patroni, /config; PATCH /config) and never around it; replication state and LSNs over SQL
(activities/postgres/server.py), like the other providers.

Across regions the standby region runs a Patroni *standby cluster*: `standby_cluster: {host, port}` in its dynamic
configuration makes its leader a "standby leader" streaming from the other region. A planned failover is a
switchover in two PATCHes, with a proof in between:

1. demote the old cluster: PATCH its /config with `standby_cluster` pointing at the new region's
   `replication_address`. Patroni 3.0 stops the old primary with an IMMEDIATE shutdown (ha.follow: demote
   "immediate-nolock"), so what it wrote last may not have streamed, and restarts it as a standby leader (its crash
   recovery replays its own WAL to the end first);
2. the proof: the new region must have replayed at least as far as the old server got (its replay position after
   that restart, read over SQL): the fence and the catch-up before leave little or nothing to miss, and what is
   missing must still arrive; else the old cluster is put back and nothing was lost;
3. promote the new cluster: PATCH its /config with `standby_cluster: null`; wait until a probe write commits.

The old primary's last record precedes the new timeline's fork point, so it follows the new timeline without
pg_rewind or a base backup, and failing back is the same move the other way. An emergency promotes only (the old
region may be dead); a failback's rebuild makes the old cluster a standby cluster of the primary (Patroni rewinds
it with pg_rewind when it diverged; `use_pg_rewind` in its configuration).

The write fence is a parameter of the cluster's dynamic configuration (`default_transaction_read_only`), set and
lifted through PATCH /config like any Patroni setting, and the sessions that were open are ended over SQL.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import httpx
import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from temporalio.exceptions import ApplicationError

from activities.context import heartbeat, sleep_or_cancelled, time_limit
from activities.postgres.connection import connect, sql_errors, where
from activities.postgres.server import end_other_sessions, sql_check_writable, sql_status
from opsflow.models import DbStatus, PromoteResult, RebuildResult, RegionTarget, lsn_to_int
from opsflow.sections import PatroniStandbySettings

FENCE_PARAMETER = "default_transaction_read_only"
PATRONI_SESSIONS = ("Patroni",)  # Patroni's own connection (its application_name): a fence leaves it alone
SETTLE_TIMEOUT = 60.0  # a PATCH /config reaching PostgreSQL (a reload; a demotion restarts the server)
PROOF_TIMEOUT = 60.0  # the new region replaying the old primary's last record
POLL = 0.2
LEADER_ROLES = ("leader", "master", "primary", "standby_leader")


# Each state of the fence in two spellings that PostgreSQL reads alike, PATCHed in turn (PatroniCluster._fence_to):
# Patroni 3.0 takes a dynamic-configuration change that arrives while its PostgreSQL (re)starts for applied without
# writing it to postgresql.conf (Config.reload_config compares parameters only in state "running"), so it never
# arrives; a demoted old primary restarting as a standby leader is such a moment. Only a new change is applied then.
FENCE_SPELLINGS = {True: ("on", "true"), False: (None, "off")}
NUDGE_AFTER = 10.0  # without the fence's change in PostgreSQL this long, it is PATCHed again in its other spelling


def _same_source(current: dict | None, want: dict) -> bool:
    """A standby_cluster section that already follows what `want` names (its host and port, as text: lists too)."""
    return bool(current) and (str(current.get("host")), str(current.get("port"))) == (str(want["host"]),
                                                                                      str(want["port"]))


def _fence_patch(on: bool, spelling: int = 0) -> dict:
    return {"postgresql": {"parameters": {FENCE_PARAMETER: FENCE_SPELLINGS[on][spelling]}}}


class PatroniCluster:
    """DatabaseProvider for provider "patroni": the Patroni cluster of one region."""

    DEFAULT_PROMOTE_TIMEOUT = 300.0

    def __init__(self, target: RegionTarget, *, timeout: float = 5.0):
        if target.database.provider != "patroni":
            raise ValueError(f"PatroniCluster serves provider 'patroni', not {target.database.provider!r}")
        self.target = target
        self.region = target.region
        self.db = target.database
        self.timeout = timeout
        self._scope_checked = False
        self._http: httpx.Client | None = None

    @property
    def sql(self) -> Any:
        """Where SQL goes: the inventory's dsn; with `sql_target: leader`, the host and port of the member Patroni says
        leads the cluster now (GET /cluster), with the dsn's user, database and password (a cluster of several
        members, no proxy that follows the leader). The dsn as it is while no leader is known (an election, a region
        that does not answer)."""
        if getattr(self.db, "sql_target", "dsn") != "leader":
            return self.db
        try:
            leader = self.leader()
        except ApplicationError as e:
            if e.non_retryable:
                raise
            return self.db
        if not leader or not leader.get("host") or not leader.get("port"):
            return self.db
        params = {k: v for k, v in conninfo_to_dict(self.db.dsn).items() if k != "hostaddr"}
        params.update(host=str(leader["host"]), port=str(leader["port"]))
        return self.db.model_copy(update={"dsn": make_conninfo("", **params)})

    # -- the REST API -----------------------------------------------------------------------------------------

    def _client(self) -> httpx.Client:
        """One HTTP client per provider object, kept: a new one loads the CA bundle again (~0.2 s each), which
        made a poll of the REST API cost more than the wait it polled."""
        if self._http is None:
            auth = None
            if self.db.rest_password is not None:
                from activities.secrets import resolve

                auth = httpx.BasicAuth(self.db.rest_username or "patroni", resolve(self.db.rest_password))
            self._http = httpx.Client(auth=auth, verify=self.db.ca_bundle or True)
        return self._http

    def __del__(self) -> None:
        if getattr(self, "_http", None) is not None:
            self._http.close()

    def _request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """The first member that answers (any HTTP status): its status and JSON body. No member answering is a
        retryable PatroniUnreachable; 401/403 a non-retryable PermissionDenied."""
        errors = []
        client = self._client()
        for base in self.db.rest_api:
            url = base.rstrip("/") + path
            try:
                r = client.request(method, url, json=body, timeout=self.timeout)
            except httpx.HTTPError as e:
                errors.append(f"{url}: {type(e).__name__}: {e}")
                continue
            if r.status_code in (401, 403):
                raise ApplicationError(
                    f"{self.region}: Patroni {method} {path} refused ({r.status_code}): check rest_username and "
                    "rest_password against restapi.authentication",
                    type="PermissionDenied",
                    non_retryable=True,
                )
            try:
                data = r.json()
            except ValueError:
                data = r.text
            return r.status_code, data
        raise ApplicationError(
            f"{self.region}: no Patroni REST API answers ({'; '.join(errors)})", type="PatroniUnreachable"
        )

    def check_scope(self) -> None:
        """The REST API serves the cluster the inventory names (scope): a wrong URL must not switch another cluster
        over. Once per provider object; no scope in the inventory, no check."""
        if not self.db.scope or self._scope_checked:
            return
        _, me = self._request("GET", "/patroni")
        scope = (me.get("patroni") or {}).get("scope") if isinstance(me, dict) else None
        if scope != self.db.scope:
            raise ApplicationError(
                f"{self.region}: the Patroni REST API at {self.db.rest_api[0]} serves cluster {scope!r}, not "
                f"{self.db.scope!r} (the inventory's scope)",
                type="PatroniScopeMismatch",
                non_retryable=True,
            )
        self._scope_checked = True

    def cluster(self) -> dict:
        self.check_scope()
        status, data = self._request("GET", "/cluster")
        if status != 200 or not isinstance(data, dict):
            raise ApplicationError(f"{self.region}: GET /cluster answered {status}: {data}", type="PatroniError")
        return data

    def leader(self) -> dict | None:
        return next((m for m in self.cluster().get("members", []) if m.get("role") in LEADER_ROLES), None)

    def config(self) -> dict:
        self.check_scope()
        status, data = self._request("GET", "/config")
        if status != 200 or not isinstance(data, dict):
            raise ApplicationError(f"{self.region}: GET /config answered {status}: {data}", type="PatroniError")
        return data

    def patch_config(self, patch: dict) -> dict:
        self.check_scope()
        status, data = self._request("PATCH", "/config", patch)
        if status != 200:
            raise ApplicationError(
                f"{self.region}: PATCH /config {patch} answered {status}: {data}",
                type="PatroniError",
                non_retryable=status in (400, 422),
            )
        return data

    def standby_source(self) -> dict | None:
        return self.config().get("standby_cluster") or None

    def standby_settings(self) -> PatroniStandbySettings:
        """What this region's cluster keeps in its standby_cluster whenever it follows another region."""
        return self.db.standby_cluster or PatroniStandbySettings()

    def check_slot_for(self, follower: "PatroniCluster") -> None:
        """A follower streaming through a slot (its standby_cluster.primary_slot_name) needs that slot here, on
        this region's leader; Patroni creates it from the cluster's permanent `slots`. Without it the follower
        would never stream: refused before anything changes, naming the fix."""
        slot = follower.standby_settings().primary_slot_name
        if slot is None:
            return
        db = self.sql
        with connect(db, connect_timeout=5) as conn, sql_errors(db, "patroni"):
            found = conn.execute("select slot_type from pg_replication_slots where slot_name = %s", (slot,)).fetchone()
        if found is None or found[0] != "physical":
            raise ApplicationError(
                f"{self.region}: no physical replication slot {slot!r} on {where(db)}, which {follower.region}'s "
                f"standby_cluster.primary_slot_name names: add it to the permanent slots of Patroni cluster "
                f"{self.db.scope or self.region} (patronictl edit-config: slots: {{{slot}: {{type: physical}}}}), "
                f"then start again ({follower.region} was not made to follow)",
                type="PatroniSlotMissing",
                non_retryable=True,
            )

    # -- waiting ----------------------------------------------------------------------------------------------

    def _until(self, what: str, check, timeout: float) -> Any:
        """Poll check() (None/False: not yet) with heartbeats until it returns something, at most `timeout`."""
        started = time.monotonic()
        last_error = ""
        while True:
            try:
                found = check()
            except ApplicationError as e:
                if e.non_retryable:
                    raise
                found, last_error = None, e.message
            except psycopg.Error as e:
                found, last_error = None, str(e).strip()
            if found:
                return found
            waited = time.monotonic() - started
            if waited > timeout:
                raise ApplicationError(
                    f"{self.region}: {what}: not after {timeout:.0f}s" + (f" ({last_error})" if last_error else ""),
                    type="PatroniTimeout",
                )
            sleep_or_cancelled(POLL, {"phase": what, "waited_seconds": round(waited, 1)}, what=what)

    def _sql(self, query: str) -> tuple:
        with connect(db := self.sql, connect_timeout=5) as conn, sql_errors(db, "patroni"):
            return conn.execute(query).fetchone()

    def _read_only_is(self, want: bool) -> bool:
        return self._sql(f"select current_setting('{FENCE_PARAMETER}')::bool")[0] == want

    def _standby_leader_running(self) -> bool:
        leader = self.leader()
        return bool(leader and leader.get("role") == "standby_leader" and leader.get("state") == "running")

    def _streaming(self) -> bool:
        in_recovery, status = self._sql(
            "select pg_is_in_recovery(), (select status from pg_stat_wal_receiver limit 1)"
        )
        return bool(in_recovery and status == "streaming")

    # -- DatabaseProvider ----------------------------------------------------------------------------------------

    def _shown(self) -> tuple[dict | None, str]:
        """The member whose state and role this region's status shows (a cluster per region: its leader), and what
        the status says when there is none."""
        return self.leader(), "no leader"

    def status(self) -> DbStatus:
        s = sql_status(self.sql, self.region)
        try:
            member, absent = self._shown()
        except ApplicationError as e:
            if e.non_retryable:
                raise
            return s.model_copy(update={"cloud_state": f"Patroni: {e.message}"})
        if member is None:
            return s.model_copy(update={"cloud_state": absent, "cloud_role": None})
        return s.model_copy(update={"cloud_state": member.get("state"), "cloud_role": member.get("role")})

    def _fence_to(self, on: bool, what: str) -> None:
        """Set (on) or lift the fence in the dynamic configuration and wait until this region's PostgreSQL has it,
        PATCHing it again in its other spelling every NUDGE_AFTER s without it (FENCE_SPELLINGS: a change Patroni
        took while PostgreSQL restarted never arrives otherwise). At most SETTLE_TIMEOUT."""
        started = time.monotonic()
        for patches in itertools.count(1):  # ends by returning, or raising at SETTLE_TIMEOUT
            spelling = (patches - 1) % 2
            self.patch_config(_fence_patch(on, spelling))
            left = SETTLE_TIMEOUT - (time.monotonic() - started)
            try:
                self._until(what, lambda: self._read_only_is(on), min(NUDGE_AFTER, max(left, 0.0)))
                return
            except ApplicationError as e:
                if e.non_retryable:
                    raise
                if left <= NUDGE_AFTER:
                    last = e.message.partition(" (")[2]  # the last error of the wait, if any
                    raise ApplicationError(f"{self.region}: {what}: not after {time.monotonic() - started:.0f}s, "
                                           f"PATCHed {patches} time(s)" + (f" ({last}" if last else ""),
                                           type="PatroniTimeout") from None
            heartbeat({"phase": what, "patched_again": FENCE_SPELLINGS[on][1 - spelling]})

    def fence(self) -> None:
        """Read-only through the dynamic configuration (Patroni reloads PostgreSQL), then end the open sessions."""
        self._fence_to(True, "the fence (default_transaction_read_only=on) to reach PostgreSQL")
        db = self.sql
        with connect(db) as conn, sql_errors(db, "fence"):
            end_other_sessions(conn, db, keep=PATRONI_SESSIONS)

    def unfence(self) -> None:
        """Lift the fence (the parameter removed from the dynamic configuration). On a standby leader (the old
        primary after a switchover) also wait until it streams, so the status that follows says so."""
        self._fence_to(False, "the fence's removal to reach PostgreSQL")
        if self._sql("select pg_is_in_recovery()")[0]:
            try:
                self._until("streaming from the primary", self._streaming, SETTLE_TIMEOUT / 2)
            except ApplicationError as e:
                if e.non_retryable:
                    raise  # else: the status tells the caller it does not stream

    def fence_control_plane(self, budget: float) -> tuple[str, list[str]]:
        """Emergency fence of an old primary: the read-only parameter in its dynamic configuration (Patroni applies
        it when the region comes back), and its sessions ended when it answers now."""
        self.timeout = min(self.timeout, max(budget / 4, 1.0))
        try:
            self.patch_config(_fence_patch(True))
        except ApplicationError as e:
            if e.non_retryable:
                raise
            raise ApplicationError(
                f"{e.message}. Before it comes back, make it a standby cluster of the new primary in its DCS, e.g. "
                f"patronictl -c <its patroni.yml> edit-config -s standby_cluster.host=<new primary> -s "
                f"standby_cluster.port=<port>: else Patroni restarts it as a writable primary on a timeline of its "
                f"own, which it would not rewind later",
                type=e.type,
            ) from None
        actions = [f"set {FENCE_PARAMETER}=on in the dynamic configuration of Patroni cluster "
                   f"{self.db.scope or self.region}"]
        db = self.sql
        try:
            with connect(db, connect_timeout=3) as conn:
                if self._read_only_is(True):
                    end_other_sessions(conn, db, keep=PATRONI_SESSIONS)
                    actions.append(f"ended the sessions on {where(db)}")
        except (ApplicationError, psycopg.Error):
            actions.append(f"{where(db)} does not answer now; Patroni applies the fence when it does")
        return "patroni-read-only", actions

    def check_writable(self) -> None:
        sql_check_writable(self.sql, region=self.region)

    def promote(self, force: bool, demote: RegionTarget | None = None) -> PromoteResult:
        """Promote this region's standby cluster (standby_cluster removed from its dynamic configuration) and wait
        until a write commits. With `demote` (a planned switchover), first make the old region's cluster a standby
        cluster of this one and prove this one has replayed everything the old primary wrote."""
        timeout = time_limit(self.DEFAULT_PROMOTE_TIMEOUT)
        started = time.monotonic()
        old = PatroniCluster(demote) if demote is not None and not force else None
        before = sql_status(self.sql, self.region)
        source = self.standby_source()
        if source is None:
            if before.reachable and before.role == "primary":
                return PromoteResult(
                    already_primary=True, seconds=0.0, timeline=before.timeline, switchover=old is not None,
                    old_primary=old.region if old else None,
                    old_primary_role=(old.status().cloud_role if old else None),
                )
            if before.reachable and not self._promoting():
                raise ApplicationError(
                    f"{self.region}: not a standby cluster, yet {where(self.sql)} is a replica: the dsn must reach the "
                    "cluster's leader (a switchover inside one cluster is Patroni's POST /switchover)",
                    type="PatroniNotStandbyCluster",
                    non_retryable=True,
                )
        token = None
        if old is not None:
            token = self._demote(old)
        received, replayed = before.current_lsn, before.replay_lsn
        heartbeat({"phase": "promoting", "received_lsn": received, "replayed_lsn": replayed, "token": token})
        if source is not None:
            try:
                self.patch_config({"standby_cluster": None})
            except ApplicationError:
                if old is not None:  # never leave two standby clusters following each other: the old one leads
                    old.patch_config({"standby_cluster": None})
                raise
        self._until("the promoted leader to accept writes", self._writable, max(timeout - 5, 10))
        after = sql_status(self.sql, self.region)
        return PromoteResult(
            already_primary=source is None,
            seconds=round(time.monotonic() - started, 3),
            timeline=after.timeline,
            lsn_at_promotion=replayed,
            received_lsn=received,
            switchover=old is not None,
            old_primary=old.region if old else None,
            old_primary_role=(old.status().cloud_role if old else None),
        )

    def _promoting(self) -> bool:
        """The cluster leads (no standby_cluster any more) and its leader is the server the dsn reaches, still
        leaving recovery: a promotion requested by an earlier attempt of this activity."""
        leader = self.leader()
        if not leader or leader.get("role") not in ("leader", "master", "primary"):
            return False
        dsn = conninfo_to_dict(self.sql.dsn)
        return (str(leader.get("host")), int(leader.get("port") or 0)) == (
            str(dsn.get("host") or dsn.get("hostaddr")), int(dsn.get("port") or 5432))

    def _writable(self) -> bool:
        try:
            self.check_writable()
        except ApplicationError as e:
            if e.type == "NotWritable":
                return False
            raise
        return True

    def _replayed_all_of(self, old: "PatroniCluster") -> None:
        """Before the demotion: this region has replayed what the (fenced) old primary has flushed. Patroni stops it
        with an immediate shutdown, and a standby leader streaming through a slot cannot fetch what it missed from
        the old server once that is a standby (it asks for a read-write session): so nothing may be missing now."""
        flushed = old._sql("select case when not pg_is_in_recovery() then pg_current_wal_flush_lsn()::text end")[0]
        if flushed is None:
            return

        def replayed() -> bool:
            return (lsn_to_int(self._sql("select pg_last_wal_replay_lsn()::text")[0]) or 0) >= lsn_to_int(flushed)

        self._until(f"{self.region} to replay {old.region}'s flushed position {flushed} before its demotion",
                    replayed, PROOF_TIMEOUT)

    def _demote(self, old: "PatroniCluster") -> str:
        """Make `old` a standby cluster of this region and return its last replayed position once this region has
        replayed at least that far (the proof that nothing the old primary wrote is missing here). When the proof
        cannot be made, the old cluster is put back as it was and the promotion fails (retryable)."""
        want = old.standby_settings().of(self.db.replication_address)
        current = old.standby_source()
        if not _same_source(current, want):
            self.check_slot_for(old)
            self._replayed_all_of(old)
            heartbeat({"phase": f"demoting {old.region}"})
            old.patch_config({"standby_cluster": want})
        try:
            old._until(f"{old.region} to run as a standby leader", old._standby_leader_running, SETTLE_TIMEOUT)
            token = old._until(f"{old.region}'s last position after its restart",
                               lambda: old._sql("select case when pg_is_in_recovery() then "
                                                "pg_last_wal_replay_lsn()::text end")[0],
                               SETTLE_TIMEOUT)

            def replayed_enough() -> bool:
                replay = self._sql("select pg_last_wal_replay_lsn()::text")[0]
                return (lsn_to_int(replay) or 0) >= (lsn_to_int(token) or 0)

            self._until(f"{self.region} to replay up to {old.region}'s last position {token}", replayed_enough,
                        PROOF_TIMEOUT)
            return token
        except ApplicationError as e:
            # Not proven: put the old cluster back as the primary (it holds everything), nothing was promoted.
            try:
                old.patch_config({"standby_cluster": None})
            except ApplicationError:
                pass
            raise ApplicationError(
                f"{self.region}: the switchover could not be proven safe ({e.message}); {old.region} was put back "
                "as the primary cluster",
                type="SwitchoverNotProven",
            ) from None

    def rebuild_replica(self, primary: RegionTarget) -> RebuildResult:
        """Make this region's cluster a standby cluster of `primary` (a failback after an emergency). Patroni
        demotes the old primary and rewinds it when it diverged (use_pg_rewind). Idempotent."""
        started = time.monotonic()
        other = PatroniCluster(primary)
        mine, theirs = sql_status(self.sql, self.region), sql_status(other.sql, primary.region)
        if mine.reachable and mine.role == "primary" and mine.timeline is not None and mine.timeline == theirs.timeline:
            # Promoted on its own after the split (Patroni restarted it as leader): the same timeline id with another
            # history, which Patroni's rewind check takes for the same timeline. Following would mix two histories.
            raise ApplicationError(
                f"{self.region}: its primary writes on timeline {mine.timeline} like the one in {primary.region}, "
                f"with a history of its own (it was promoted again after the split): it cannot follow "
                f"{primary.region} without a new copy. Keep what it holds (pg_dump), make it a standby cluster "
                f"(PATCH /config standby_cluster) and reinitialise its members (patronictl reinit), then fail back",
                type="RebuildNotSupported",
                non_retryable=True,
            )
        want = self.standby_settings().of(other.db.replication_address)
        current = self.standby_source()
        if _same_source(current, want):
            if self._standby_leader_running() and self._streaming():
                return RebuildResult(method="already-streaming", seconds=0.0,
                                     detail=f"{self.region} already streams from {primary.region}")
        else:
            other.check_slot_for(self)
            self.patch_config({"standby_cluster": want})
        limit = time_limit(600.0)
        self._until(f"{self.region} to run as a standby leader", self._standby_leader_running, limit)
        self._until(f"{self.region} to stream from {primary.region}", self._streaming, limit)
        replayed = lsn_to_int(self._sql("select pg_last_wal_replay_lsn()::text")[0]) or 0
        if replayed > (lsn_to_int(other._sql("select pg_current_wal_lsn()::text")[0]) or 0):
            raise ApplicationError(
                f"{self.region}: replayed past {primary.region}'s current position: its history diverged and Patroni "
                "did not rewind it; reinitialise its members (patronictl reinit)",
                type="RebuildNotSupported",
                non_retryable=True,
            )
        # a fence set by hand or by the emergency would follow it back when it leads again
        self._fence_to(False, "the fence's removal to reach PostgreSQL")
        return RebuildResult(
            method="patroni-standby-cluster",
            seconds=round(time.monotonic() - started, 3),
            detail=f"Patroni cluster {self.db.scope or self.region} is a standby cluster of {primary.region} "
            f"({self.db.replication_address} -> {other.db.replication_address})",
        )


# -- layout "stretched": the regions are members of ONE Patroni cluster ------------------------------------------

SWITCHOVER_TIMEOUT = 45.0  # Patroni answers POST /switchover|/failover once it sees the new leader (it polls ~20 s)
CANDIDATE_LAG_WAIT = 10.0  # the candidate replaying the fenced leader's last position, before anything is asked
REPLICA_ROLES = ("replica", "sync_standby", "quorum_standby")
LEADS = ("leader", "master", "primary")
RUNNING_STATES = ("running", "streaming")


class PatroniMember(PatroniCluster):
    """DatabaseProvider for provider "patroni" with layout "stretched": this region's member (`member`) of the one
    Patroni cluster the regions share (one DCS across regions). A planned failover is Patroni's own switchover
    (POST /switchover {leader, candidate}: Patroni stops the leader cleanly, promotes the candidate, and the old
    leader follows as a replica: no rebuild); an emergency is POST /failover {candidate}. Before asking, the
    candidate must be a member, a running replica that streams, and have replayed the (fenced) leader's last
    position: else a non-retryable error names what is wrong, and nothing was changed.

    The fence is the same dynamic-configuration parameter, which in one cluster reaches every member: the candidate
    is read-only too until the promotion lifts it, once it leads (the old leader follows, read-only anyway)."""

    def member(self, cluster: dict | None = None) -> dict | None:
        cluster = self.cluster() if cluster is None else cluster
        return next((m for m in cluster.get("members", []) if m.get("name") == self.db.member), None)

    def known_member(self, cluster: dict) -> dict:
        m = self.member(cluster)
        if m is None:
            names = ", ".join(str(x.get("name")) for x in cluster.get("members", [])) or "none"
            raise ApplicationError(
                f"{self.region}: {self.db.member!r} is not a member of Patroni cluster {self.db.scope!r} (its "
                f"members: {names}); check database.member in the inventory. Nothing was changed",
                type="PatroniMemberUnknown",
                non_retryable=True,
            )
        return m

    def _leads(self) -> bool:
        m = self.member()
        return bool(m and m.get("role") in LEADS and m.get("state") == "running")

    def _shown(self) -> tuple[dict | None, str]:
        return self.member(), f"not a member of cluster {self.db.scope}"

    def fence_control_plane(self, budget: float) -> tuple[str, list[str]]:
        """After an emergency in one cluster the new leader holds the cluster's leader lock in the DCS: Patroni
        demotes a member that does not hold it, and rejoins it as a replica when its region returns. A fence in the
        dynamic configuration would reach the new leader too: none is set."""
        self.timeout = min(self.timeout, max(budget / 4, 1.0))
        try:
            cluster = self.cluster()
        except ApplicationError as e:
            if e.non_retryable:
                raise
            return "patroni-leader-lock", [f"{self.region}: {e.message}; Patroni's leader lock keeps member "
                                           f"{self.db.member} from leading when it returns (one DCS)"]
        leader = next((m for m in cluster.get("members", []) if m.get("role") in LEADS), None)
        if leader is not None and leader.get("name") == self.db.member:
            raise ApplicationError(
                f"{self.region}: member {self.db.member} still holds the leader lock of cluster {self.db.scope}",
                type="PatroniStillLeader",
            )
        return "patroni-leader-lock", [
            f"member {self.db.member} does not hold the leader lock of cluster {self.db.scope} (leader: "
            f"{leader.get('name') if leader else 'none'}): Patroni keeps it a replica (one DCS)"]

    def _check_candidate(self, me: dict, planned: bool) -> None:
        name, role, state = me.get("name"), me.get("role"), me.get("state")
        if (me.get("tags") or {}).get("nofailover"):
            raise ApplicationError(
                f"{self.region}: member {name} is tagged nofailover: Patroni never promotes it. Nothing was changed",
                type="PatroniCandidateNotEligible", non_retryable=True)
        if role in LEADS:
            return
        if role not in REPLICA_ROLES or state not in RUNNING_STATES:
            raise ApplicationError(
                f"{self.region}: member {name} is {role}, {state}: not a running replica to promote. Nothing was "
                "changed", type="PatroniCandidateNotStreaming", non_retryable=True)
        if planned and not self._streaming():
            raise ApplicationError(
                f"{self.region}: member {name} does not stream from the leader (pg_stat_wal_receiver): a "
                "switchover to it cannot be proven safe. Nothing was changed",
                type="PatroniCandidateNotStreaming", non_retryable=True)

    def _prove_caught_up(self, old: "PatroniMember") -> tuple[str, str]:
        """The candidate has replayed at least as far as the old leader's current position (it is fenced: only
        Patroni writes there), within CANDIDATE_LAG_WAIT; else PatroniCandidateLagging. Returns (leader's position,
        candidate's replay position)."""
        token = old._sql("select pg_current_wal_lsn()::text")[0]
        seen = {"replay": None}

        def caught() -> str | None:
            replay = seen["replay"] = self._sql("select pg_last_wal_replay_lsn()::text")[0]
            return replay if (lsn_to_int(replay) or 0) >= (lsn_to_int(token) or 0) else None

        try:
            replayed = self._until(f"{self.region} to replay up to the leader's {token}", caught, CANDIDATE_LAG_WAIT)
        except ApplicationError as e:
            if e.non_retryable or e.type != "PatroniTimeout":
                raise
            lag = (lsn_to_int(token) or 0) - (lsn_to_int(seen["replay"]) or 0)
            raise ApplicationError(
                f"{self.region}: member {self.db.member} has replayed up to {seen['replay']}, {lag} bytes behind "
                f"the leader's {token} (in {old.region}) after {CANDIDATE_LAG_WAIT:.0f}s: a switchover now would "
                "lose them. Nothing was changed; fence the leader and wait for the catch-up",
                {"lag_bytes": lag}, type="PatroniCandidateLagging", non_retryable=True) from None
        return token, replayed

    def _post(self, action: str, body: dict) -> tuple[int, Any]:
        """POST /switchover or /failover to the first member that accepts a connection. Only a refused connection
        moves on to the next member: a request that may have been received is never sent twice (a timeout is a
        retryable error; the next attempt looks at the cluster first)."""
        errors = []
        client = self._client()
        for base in self.db.rest_api:
            url = base.rstrip("/") + f"/{action}"
            try:
                r = client.post(url, json=body, timeout=SWITCHOVER_TIMEOUT)
            except httpx.ConnectError as e:
                errors.append(f"{url}: {e}")
                continue
            except httpx.HTTPError as e:
                raise ApplicationError(f"{self.region}: POST /{action} {body}: no answer ({type(e).__name__}: {e}); "
                                       "the next attempt looks at the cluster first", type="PatroniTimeout") from None
            if r.status_code in (401, 403):
                raise ApplicationError(
                    f"{self.region}: Patroni POST /{action} refused ({r.status_code}): check rest_username and "
                    "rest_password against restapi.authentication", type="PermissionDenied", non_retryable=True)
            return r.status_code, r.text.strip()
        raise ApplicationError(
            f"{self.region}: no Patroni REST API answers ({'; '.join(errors)})", type="PatroniUnreachable")

    def promote(self, force: bool, demote: RegionTarget | None = None) -> PromoteResult:
        """Make this region's member the cluster's leader: planned (`demote`: the old leader's region), Patroni's
        switchover from it; forced, Patroni's failover. Looks before it acts: a member that leads already (an earlier
        attempt, or Patroni's own failover) is promoted. A planned promotion then lifts the cluster's fence."""
        timeout = time_limit(self.DEFAULT_PROMOTE_TIMEOUT)
        started = time.monotonic()
        old = None
        if demote is not None and not force:
            if demote.database.provider != "patroni" or getattr(demote.database, "layout", None) != "stretched" \
                    or demote.database.scope != self.db.scope:
                raise ApplicationError(
                    f"{self.region}: {demote.region} is not a member of the same stretched Patroni cluster "
                    f"{self.db.scope!r}: check both regions' database.layout and scope", type="PatroniLayoutMismatch",
                    non_retryable=True)
            old = PatroniMember(demote)
        elif not force:
            raise ApplicationError(f"{self.region}: a planned switchover needs the old leader's region",
                                   type="PatroniLayoutMismatch", non_retryable=True)
        cluster = self.cluster()
        me = self.known_member(cluster)
        before = sql_status(self.sql, self.region)
        received = replayed = None
        if me.get("role") not in LEADS:
            self._check_candidate(me, planned=old is not None)
            if old is not None:
                old_m = old.known_member(cluster)
                leader = next((m for m in cluster.get("members", []) if m.get("role") in LEADS), None)
                if leader is None or leader.get("name") != old_m.get("name"):
                    raise ApplicationError(
                        f"{self.region}: the leader of cluster {self.db.scope} is "
                        f"{leader.get('name') if leader else 'nobody'}, not {old.region}'s member {old_m.get('name')}:"
                        " nothing to switch over from. Nothing was changed",
                        type="PatroniLeaderMismatch", non_retryable=True)
                received, replayed = self._prove_caught_up(old)
                body = {"leader": old_m["name"], "candidate": me["name"]}
            else:
                received, replayed = before.current_lsn, before.replay_lsn
                body = {"candidate": me["name"]}
            action = "failover" if old is None else "switchover"
            heartbeat({"phase": f"POST /{action}", "body": body, "leader_lsn": received, "replayed_lsn": replayed})
            status, text = self._post(action, body)
            if status != 200 or "instead of" in text:
                if self._leads():  # a request of an earlier attempt got there first
                    pass
                elif status in (400, 412) or "instead of" in text:
                    raise ApplicationError(f"{self.region}: Patroni refused POST /{action} {body}: {status} {text}",
                                           type="PatroniRefused", non_retryable=True)
                else:
                    raise ApplicationError(f"{self.region}: POST /{action} {body} answered {status} {text}",
                                           type="PatroniError")
            self._until(f"member {me['name']} to lead cluster {self.db.scope}", self._leads, SETTLE_TIMEOUT)
        if old is not None:  # the fence reached every member: lifted, the new leader takes writes
            self._fence_to(False, "the fence's removal to reach the new leader")
        self._until("the new leader to accept writes", self._writable, max(timeout - 5, 10))
        after = sql_status(self.sql, self.region)
        old_role = None
        if old is not None:
            old_m = old.member()
            old_role = old_m.get("role") if old_m else None
        return PromoteResult(
            already_primary=me.get("role") in LEADS,
            seconds=round(time.monotonic() - started, 3),
            timeline=after.timeline,
            lsn_at_promotion=replayed,
            received_lsn=received,
            switchover=old is not None,
            old_primary=old.region if old else None,
            old_primary_role=old_role,
        )

    def rebuild_replica(self, primary: RegionTarget) -> RebuildResult:
        """In one cluster Patroni rejoins a returning old leader as a replica itself (pg_rewind when it diverged,
        use_pg_rewind): wait until this member streams; one that does not is for `patronictl reinit`."""
        started = time.monotonic()
        cluster = self.cluster()
        me = self.known_member(cluster)
        if me.get("role") in LEADS:
            raise ApplicationError(
                f"{self.region}: member {me.get('name')} leads cluster {self.db.scope}: it is no replica to rebuild",
                type="RebuildNotSupported", non_retryable=True)
        if self._streaming():
            return RebuildResult(method="already-streaming", seconds=0.0,
                                 detail=f"member {me.get('name')} already streams from the leader")
        try:
            self._until(f"member {me.get('name')} to stream from the leader", self._streaming,
                        min(time_limit(600.0), 300.0))
        except ApplicationError as e:
            if e.non_retryable:
                raise
            raise ApplicationError(
                f"{self.region}: member {me.get('name')} does not stream ({e.message}): reinitialise it "
                f"(patronictl -c <its patroni.yml> reinit {self.db.scope} {me.get('name')}), then fail back",
                type="RebuildNotSupported", non_retryable=True) from None
        return RebuildResult(method="patroni-rejoined", seconds=round(time.monotonic() - started, 3),
                             detail=f"member {me.get('name')} rejoined cluster {self.db.scope} as a replica")
