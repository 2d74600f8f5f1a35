"""Bloat, measured: how much of a table and of its btree indexes is empty or dead space.

Where the `pgstattuple` extension is installed (contrib; `CREATE EXTENSION pgstattuple`), it is measured:
`pgstatindex` (a btree's average leaf density against its fillfactor) and `pgstattuple_approx` (dead and free
space of the table, reading only the pages the visibility map does not vouch for). Elsewhere it is the catalogue
estimate (as check_postgres and the well-known btree bloat queries do): the size the rows and index entries
would take at their average width (pg_stats) and the fillfactor, against the size on disk. Both read; neither
takes more than an ACCESS SHARE lock. Each figure says which method gave it.
"""

from __future__ import annotations

from typing import Any

import psycopg

from opsflow.maintenance_models import IndexBloat

BTREE_FILLFACTOR = 90  # a btree's default leaf fillfactor
TABLE_FILLFACTOR = 100


def has_pgstattuple(conn: psycopg.Connection) -> bool:
    return conn.execute("select exists (select 1 from pg_extension where extname = 'pgstattuple')").fetchone()[0]


def _fillfactor(reloptions: list[str] | None, default: int) -> int:
    for option in reloptions or []:
        key, _, value = option.partition("=")
        if key == "fillfactor" and value.isdigit():
            return int(value)
    return default


# Estimated leaf pages of a btree: entries (reltuples) of (8-byte header + the indexed columns' average widths,
# MAXALIGNed) plus a 4-byte line pointer, on pages of block_size less the page header (24) and btree special
# space (16), filled to the fillfactor; plus the metapage.
_INDEX_ESTIMATE = """
select ic.oid, ic.relname, pg_relation_size(ic.oid), ic.reloptions, ic.relpages, ic.reltuples,
       coalesce((select sum(s.avg_width) from pg_attribute a
                  join pg_stats s on s.schemaname = n.nspname and s.tablename = c.relname and s.attname = a.attname
                 where a.attrelid = c.oid and a.attnum = any(i.indkey::int2[])), 8),
       current_setting('block_size')::int
  from pg_index i join pg_class ic on ic.oid = i.indexrelid join pg_am am on am.oid = ic.relam
  join pg_class c on c.oid = i.indrelid join pg_namespace n on n.oid = c.relnamespace
 where n.nspname = %s and c.relname = %s and am.amname = 'btree' and i.indisvalid
 order by ic.relname
"""


def index_bloat(conn: psycopg.Connection, schema: str, table: str, measured: bool | None = None) -> list[IndexBloat]:
    """Each valid btree index of the table: its size and the share of it that is bloat (0..1)."""
    measured = has_pgstattuple(conn) if measured is None else measured
    out = []
    rows = conn.execute(_INDEX_ESTIMATE, (schema, table)).fetchall()
    for oid, name, size, reloptions, relpages, reltuples, width, block in rows:
        fill = _fillfactor(reloptions, BTREE_FILLFACTOR)
        if measured:
            density, fragmentation = conn.execute(
                "select avg_leaf_density, leaf_fragmentation from pgstatindex(%s::oid::regclass)", (oid,)
            ).fetchone()
            density = 0.0 if density != density else float(density)  # NaN: no leaf page yet
            ratio = max(0.0, 1 - density / fill) if density else 0.0
            detail = f"pgstattuple: average leaf density {density:.0f}% (fillfactor {fill})"
        elif reltuples < 0:  # never vacuumed nor analyzed: nothing to estimate from
            out.append(IndexBloat(name=f"{schema}.{name}", bytes=size, bloat=None, method="estimate",
                                  detail="unknown: no statistics yet (never analyzed)"))
            continue
        else:
            entry = 8 + ((int(width) + 7) // 8) * 8 + 4
            per_page = max(1, int((block - 24 - 16) * fill / 100) // entry)
            ideal = 1 + -(-max(reltuples, 0) // per_page)
            ratio = max(0.0, 1 - ideal / relpages) if relpages > 1 else 0.0
            detail = f"estimate: {int(ideal)} of {relpages} pages needed at fillfactor {fill}"
        out.append(IndexBloat(name=f"{schema}.{name}", bytes=size, bloat=round(ratio, 3),
                              method="pgstattuple" if measured else "estimate", detail=detail))
    return out


def table_bloat(
    conn: psycopg.Connection, schema: str, table: str, measured: bool | None = None
) -> tuple[float | None, str]:
    """(the share of the table's heap that is dead or free space, 0..1, None when it cannot be told; how it was
    found)."""
    measured = has_pgstattuple(conn) if measured is None else measured
    if measured:
        dead, free = conn.execute(
            "select dead_tuple_percent, approx_free_percent from pgstattuple_approx((select c.oid from pg_class c "
            "join pg_namespace n on n.oid = c.relnamespace where n.nspname = %s and c.relname = %s))",
            (schema, table),
        ).fetchone()
        return round((dead + free) / 100, 3), "pgstattuple"
    row = conn.execute(
        """
        select c.relpages, c.reltuples, c.reloptions, current_setting('block_size')::int,
               coalesce((select sum(s.avg_width) from pg_stats s where s.schemaname = n.nspname
                          and s.tablename = c.relname), 0)
          from pg_class c join pg_namespace n on n.oid = c.relnamespace where n.nspname = %s and c.relname = %s
        """,
        (schema, table),
    ).fetchone()
    relpages, reltuples, reloptions, block, width = row
    if reltuples < 0 or not width:  # never analyzed: the estimate has nothing to go on
        return None, "estimate"
    if relpages <= 1 or reltuples == 0:
        return 0.0, "estimate"
    fill = _fillfactor(reloptions, TABLE_FILLFACTOR)
    row_bytes = 24 + ((int(width) + 7) // 8) * 8 + 4  # heap tuple header, data, line pointer
    per_page = max(1, int((block - 24) * fill / 100) // row_bytes)
    ideal = -(-reltuples // per_page)
    return round(max(0.0, 1 - ideal / relpages), 3), "estimate"


def bloated_index_candidates(conn: Any, min_bloat: float, min_bytes: int, limit: int) -> list[tuple[str, str]]:
    """(schema.table, why) of the tables with a btree index of at least `min_bytes` that is at least `min_bloat`
    bloat, the most bloated bytes first."""
    measured = has_pgstattuple(conn)
    tables = conn.execute(
        """
        select distinct n.nspname, c.relname
          from pg_index i join pg_class ic on ic.oid = i.indexrelid join pg_class c on c.oid = i.indrelid
          join pg_namespace n on n.oid = c.relnamespace join pg_am am on am.oid = ic.relam
         where am.amname = 'btree' and c.relkind in ('r', 'm') and pg_relation_size(ic.oid) >= %s
           and n.nspname not in ('pg_catalog', 'information_schema') and n.nspname !~ '^pg_(toast|temp_)'
        """,
        (min_bytes,),
    ).fetchall()
    found = []
    for schema, table in tables:
        worst = [b for b in index_bloat(conn, schema, table, measured)
                 if b.bytes >= min_bytes and b.bloat is not None and b.bloat >= min_bloat]
        if worst:
            wasted = sum(b.bytes * b.bloat for b in worst)
            why = "; ".join(f"index {b.name} {b.bloat:.0%} bloat of {b.bytes} bytes ({b.detail})" for b in worst)
            found.append((wasted, f"{schema}.{table}", f"{why}; threshold {min_bloat:.0%}"))
    found.sort(key=lambda f: (-f[0], f[1]))
    return [(t, why) for _, t, why in found[:limit]]


def bloated_table_candidates(conn: Any, min_bloat: float, min_bytes: int, limit: int) -> list[tuple[str, str]]:
    """(schema.table, why) of the tables of at least `min_bytes` whose heap is at least `min_bloat` dead or free
    space, the most wasted bytes first: what an online rebuild (pg_repack) gives back."""
    measured = has_pgstattuple(conn)
    tables = conn.execute(
        """
        select n.nspname, c.relname, pg_relation_size(c.oid)
          from pg_class c join pg_namespace n on n.oid = c.relnamespace
         where c.relkind = 'r' and pg_relation_size(c.oid) >= %s
           and n.nspname not in ('pg_catalog', 'information_schema', 'repack') and n.nspname !~ '^pg_(toast|temp_)'
        """,
        (min_bytes,),
    ).fetchall()
    found = []
    for schema, table, size in tables:
        ratio, method = table_bloat(conn, schema, table, measured)
        if ratio is not None and ratio >= min_bloat:
            found.append((size * ratio, f"{schema}.{table}",
                          f"table bloat {ratio:.0%} of {size} bytes ({method}); threshold {min_bloat:.0%}"))
    found.sort(key=lambda f: (-f[0], f[1]))
    return [(t, why) for _, t, why in found[:limit]]
