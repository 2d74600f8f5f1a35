"""Integrity verification for restore drills: tables exist, row counts (now and at a point in time), the
caller's SQL checks, schema objects.
Run against a restored scratch server (and the source, for the counts to compare with). Provider-neutral:
`db` is any object with .dsn and .password, like everywhere in this module. Names of tables and objects are
written the way SQL reads them: 'orders', 'shop.orders', 'shop."Order Lines"' (unquoted names fold to lower
case; unqualified ones are looked up on the search_path). They are resolved by the server (to_regclass,
to_regproc...) and only the resolved schema and name go into SQL, quoted by psycopg.sql. The only SQL
text taken from the caller is a check's own query, which runs alone (one statement, prepared) in a READ ONLY
transaction with a statement_timeout.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import psycopg
from psycopg import errors as pgerrors
from psycopg import sql
from temporalio.exceptions import ApplicationError

from activities.context import heartbeat as _heartbeat
from activities.postgres.connection import (
    bad_input,
    connect,
    error_line,
    is_name_error,
    redact,
    sql_errors,
    timeout_ms,
    where,
)

CHECK_STATEMENT_TIMEOUT = 60.0
COUNT_STATEMENT_TIMEOUT = 600.0
_COUNTABLE = {"r": "table", "p": "partitioned table", "v": "view", "m": "materialized view", "f": "foreign table"}
_KINDS = {
    **_COUNTABLE,
    "i": "index",
    "I": "partitioned index",
    "S": "sequence",
    "c": "composite type",
    "t": "TOAST table",
}


def _resolve_relation(conn: psycopg.Connection, name: str) -> tuple[str, str, str] | None:
    """(schema, name, relkind) of a relation named as SQL reads it; None when it does not exist.
    Raises BadInput for a name that is not a valid relation name at all."""
    if not isinstance(name, str) or not name.strip():
        raise bad_input(f"not a table name: {name!r}")
    try:
        return conn.execute(
            """
            select n.nspname, c.relname, c.relkind::text
              from pg_class c join pg_namespace n on n.oid = c.relnamespace
             where c.oid = to_regclass(%s)
            """,
            (name,),
        ).fetchone()
    except psycopg.Error as e:
        if is_name_error(e):
            raise bad_input(f"{name!r} is not a valid table name: {redact(e, None)}") from None
        raise


def _countable(db: Any, conn: psycopg.Connection, table: str, *, missing_ok: bool = False) -> tuple[str, str] | None:
    rel = _resolve_relation(conn, table)
    if rel is None:
        if missing_ok:
            return None
        raise bad_input(
            f"unknown table {table!r} on {where(db)}: no such table or view (names are resolved like SQL: "
            f"schema-qualified or on the search_path, unquoted names in lower case)"
        )
    schema, relname, kind = rel
    if kind not in _COUNTABLE:
        what = _KINDS.get(kind, f"relation of kind {kind!r}")
        raise bad_input(
            f"{table!r} on {where(db)} is {'an' if what[0] in 'aeiou' else 'a'} {what}, not a table or view"
        )
    return schema, relname


def table_exists(db: Any, table: str) -> bool:
    """Whether a table or view of that name exists on db (name as SQL reads it). BadInput for a malformed name."""
    with connect(db) as conn, sql_errors(db, "table lookup"):
        rel = _resolve_relation(conn, table)
        return rel is not None and rel[2] in _COUNTABLE


def require_tables(db: Any, tables: list[str], timestamp_columns: dict[str, str] | None = None) -> None:
    """Raise ApplicationError(type="BadInput", non_retryable) naming every table (and timestamp column) that does
    not exist on db; run it against the source before anything is restored. Returns None when all exist."""
    problems = []
    with connect(db) as conn, sql_errors(db, "table validation"):
        for table in [*tables, *(t for t in (timestamp_columns or {}) if t not in tables)]:
            try:
                rel = _countable(db, conn, table)
            except ApplicationError as e:
                problems.append(e.message)
                continue
            column = (timestamp_columns or {}).get(table)
            if column is not None:
                try:
                    _timestamp_column(db, conn, table, rel, column)
                except ApplicationError as e:
                    problems.append(e.message)
    if problems:
        raise bad_input("; ".join(problems))


def _timestamp_column(db: Any, conn: psycopg.Connection, table: str, rel: tuple[str, str], column: str) -> None:
    row = conn.execute(
        """
        select format_type(a.atttypid, a.atttypmod)
          from pg_attribute a
         where a.attrelid = to_regclass(%s) and a.attname = %s and a.attnum > 0 and not a.attisdropped
        """,
        (sql.Identifier(*rel).as_string(conn), column),
    ).fetchone()
    if row is None:
        raise bad_input(f"table {table!r} on {where(db)} has no column {column!r}")
    if row[0] not in ("timestamp with time zone", "timestamp without time zone", "date"):
        raise bad_input(f"column {column!r} of {table!r} is {row[0]}, not a timestamp")


def row_counts(
    db: Any, tables: list[str], *, missing_ok: bool = False, statement_timeout: float = COUNT_STATEMENT_TIMEOUT
) -> dict[str, int | None]:
    """count(*) of each table, keyed by the name as given, all in one REPEATABLE READ READ ONLY transaction
    (one snapshot). An unknown table raises BadInput naming it; with missing_ok (the restored side of a
    comparison, where a missing table is a finding, not bad input) its count is None instead."""
    counts: dict[str, int | None] = {}
    with connect(db, autocommit=False) as conn, sql_errors(db, "row counts"):
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        with conn.transaction():
            conn.execute("select set_config('statement_timeout', %s, true)", (timeout_ms(statement_timeout),))
            resolved = {t: _countable(db, conn, t, missing_ok=missing_ok) for t in tables}
            for table, rel in resolved.items():
                if rel is None:
                    counts[table] = None
                    continue
                _heartbeat(f"counting rows of {table}")
                counts[table] = conn.execute(
                    sql.SQL("select count(*) from {}").format(sql.Identifier(*rel))
                ).fetchone()[0]
    return counts


def row_counts_at(
    db: Any, table: str, timestamp_column: str, at: datetime, *, statement_timeout: float = COUNT_STATEMENT_TIMEOUT
) -> int:
    """Rows of `table` whose `timestamp_column` is strictly before `at`: the source's count at a restore point,
    for a table that records when its rows were written (same strictness as restore_to_time: transactions
    committed before the target). A naive `at`, and a timestamp-without-time-zone column, are taken as UTC.

    The column holds the time a row was written, not when its transaction committed: a transaction that
    straddles `at` is counted here but absent from the restore; compare with a tolerance where that matters.
    Unknown table or column, or a column that is not a timestamp: BadInput."""
    at = at.replace(tzinfo=timezone.utc) if at.tzinfo is None else at
    with connect(db, autocommit=False) as conn, sql_errors(db, "row count at a point in time"):
        conn.read_only = True
        with conn.transaction():
            conn.execute(
                "select set_config('statement_timeout', %s, true), set_config('TimeZone', 'UTC', true)",
                (timeout_ms(statement_timeout),),
            )
            rel = _countable(db, conn, table)
            _timestamp_column(db, conn, table, rel, timestamp_column)
            query = sql.SQL("select count(*) from {} where {} < %s").format(
                sql.Identifier(*rel), sql.Identifier(timestamp_column)
            )
            return conn.execute(query, (at,)).fetchone()[0]


def _check_pairs(checks: Any) -> list[tuple[str, str]]:
    pairs = []
    for i, check in enumerate(checks):
        if isinstance(check, dict):
            name, query = check.get("name"), check.get("sql")
        elif isinstance(check, (tuple, list)) and len(check) == 2:
            name, query = check
        else:
            name, query = getattr(check, "name", None), getattr(check, "sql", None)
        if not isinstance(name, str) or not isinstance(query, str) or not query.strip():
            raise bad_input(f"check #{i + 1}: give a name and an SQL query (name, sql), not {check!r}")
        pairs.append((name, query))
    return pairs


def _check_outcome(rows: list[tuple], columns: int) -> tuple[bool, str]:
    if len(rows) != 1:
        got = "no rows" if not rows else "more than one row"
        return False, f"returned {got}; a check returns exactly one row with one boolean"
    if columns != 1:
        return False, f"returned {columns} columns; a check returns exactly one row with one boolean"
    value = rows[0][0]
    if value is True:
        return True, "true"
    if value is False:
        return False, "returned false"
    if value is None:
        return False, "returned NULL"
    return False, f"returned {value!r} ({type(value).__name__}), not a boolean"


def run_checks(
    db: Any, checks: list[tuple[str, str]], *, statement_timeout: float = CHECK_STATEMENT_TIMEOUT
) -> list[tuple[str, bool, str]]:
    """Run the caller's SQL checks; each must return a single row holding boolean true.

    Each check runs alone: one statement (prepared: 'a; b' is refused), in its own READ ONLY transaction
    (rolled back), with statement_timeout. Returns (name, ok, detail) per check, in order; detail is 'true',
    what it returned instead, or 'error: <the server's message>' — an error is a failed check, not an
    exception. Only failing to reach the server at all raises (retryable DatabaseUnreachable). `checks`:
    (name, sql) pairs, or dicts / objects with name and sql."""
    pairs = _check_pairs(checks)
    results: list[tuple[str, bool, str]] = []
    conn = connect(db, autocommit=True)
    try:
        # A second guard besides BEGIN READ ONLY: a session whose transactions all start read-only.
        conn.execute("set default_transaction_read_only = on")
        for name, query in pairs:
            _heartbeat(f"check {name}")
            if conn.broken or conn.closed:
                conn = connect(db, autocommit=True)
                conn.execute("set default_transaction_read_only = on")
            try:
                conn.execute("begin transaction read only")
                try:
                    conn.execute("select set_config('statement_timeout', %s, true)", (timeout_ms(statement_timeout),))
                    cur = conn.execute(query, prepare=True)
                    if cur.description is None:
                        ok, detail = False, "returned no result; a check is a query returning one boolean"
                    else:
                        ok, detail = _check_outcome(cur.fetchmany(2), len(cur.description))
                finally:
                    if not conn.broken:
                        conn.execute("rollback")
            except pgerrors.QueryCanceled as e:
                ok, detail = False, f"error: {error_line(e)} (statement_timeout {statement_timeout:g}s)"
            except psycopg.Error as e:
                ok, detail = False, f"error: {error_line(e)}"
            results.append((name, ok, detail))
    finally:
        conn.close()
    return results


def missing_objects(db: Any, objects: list[str]) -> list[str]:
    """The names in `objects` that do not exist on db, in the order given. A name is looked up as a relation
    (table, view, materialized view, index, sequence: to_regclass), a function or procedure ('f' or
    'f(int, text)': to_regproc / to_regprocedure; an overloaded name exists when any overload does) or a type
    (to_regtype). A name that cannot be a name at all raises BadInput."""
    missing = []
    with connect(db) as conn, sql_errors(db, "schema objects"):
        for obj in objects:
            if not isinstance(obj, str) or not obj.strip():
                raise bad_input(f"not an object name: {obj!r}")
            try:
                found = conn.execute(
                    """
                    select to_regclass(%(o)s) is not null
                        or (strpos(%(o)s, '(') = 0 and (
                              to_regproc(%(o)s) is not null
                              or exists (select 1 from pg_proc p join pg_namespace n on n.oid = p.pronamespace
                                          where p.proname = (parse_ident(%(o)s))[array_upper(parse_ident(%(o)s), 1)]
                                            and case array_length(parse_ident(%(o)s), 1)
                                                  when 1 then n.nspname = any (current_schemas(true))
                                                  when 2 then n.nspname = (parse_ident(%(o)s))[1]
                                                  else false end)))
                    """,
                    {"o": obj},
                ).fetchone()[0]
                if not found and "(" in obj:
                    found = conn.execute("select to_regprocedure(%s) is not null", (obj,)).fetchone()[0]
                if not found and "(" not in obj:
                    found = conn.execute("select to_regtype(%s) is not null", (obj,)).fetchone()[0]
            except psycopg.Error as e:
                if is_name_error(e):
                    raise bad_input(f"{obj!r} is not a valid object name: {redact(e, None)}") from None
                raise
            if not found:
                missing.append(obj)
    return missing
