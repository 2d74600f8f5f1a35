"""The lab's demo data: what the inventory's drill verifies (lab_orders) and what its maintenance window cleans
(a bloated table)."""

from __future__ import annotations

import psycopg

from lab.postgres import Cluster, archive_now

BLOAT_TABLE = "lab_events"


def seed_demo_data(primary: Cluster, archive: bool = True) -> None:
    """A small table the drills verify (restore point counts, checks), and WAL archived so a drill can restore
    to now: recovery can only replay archived WAL (archive=False: a primary that does not archive, Patroni's)."""
    with psycopg.connect(primary.dsn, autocommit=True) as c:
        c.execute("CREATE TABLE IF NOT EXISTS lab_orders (id serial PRIMARY KEY, total numeric NOT NULL, "
                  "created_at timestamptz NOT NULL DEFAULT clock_timestamp())")
        c.execute("INSERT INTO lab_orders (total) SELECT (random() * 100)::numeric(10,2) FROM generate_series(1, 200)")
        # pg_repack (Debian postgresql-15-repack) for the window's online rebuild, where the server has it
        if c.execute("select 1 from pg_available_extensions where name = 'pg_repack'").fetchone():
            c.execute("CREATE EXTENSION IF NOT EXISTS pg_repack")
    seed_bloat(primary.dsn)
    if archive:
        archive_now(primary)


def seed_bloat(dsn: str, rows: int = 40_000, deleted: int = 30_000) -> None:
    """A table with real bloat for the maintenance window: autovacuum off for it, most rows deleted (dead tuples
    VACUUM will remove), and an index for REINDEX."""
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(f"CREATE TABLE IF NOT EXISTS {BLOAT_TABLE} (id bigint PRIMARY KEY, kind text NOT NULL, "
                  "payload text NOT NULL) WITH (autovacuum_enabled = false)")
        c.execute(f"CREATE INDEX IF NOT EXISTS {BLOAT_TABLE}_kind ON {BLOAT_TABLE} (kind)")
        c.execute(f"INSERT INTO {BLOAT_TABLE} SELECT g, 'k' || (g %% 17), repeat(md5(g::text), 4) "
                  "FROM generate_series(1, %s) g ON CONFLICT DO NOTHING", (rows,))
        c.execute(f"DELETE FROM {BLOAT_TABLE} WHERE id <= %s", (deleted,))
