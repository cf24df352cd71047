"""One schema, two databases: a fresh SQLite store and a fresh PostgreSQL store have the same tables,
columns, keys, references, checks, indexes and transition trigger."""

from __future__ import annotations

import sqlite3

import pytest

from contentdownload.store import open_store
from contentdownload.store.schema import TABLES
from contentdownload.testing.pg import fresh_postgres_dsn, postgres_dsn  # noqa: F401  (fixtures)

# the databases' spellings of one abstract type
SAME_TYPE = {"text": "text", "integer": "int", "bigint": "int", "real": "real", "double precision": "real",
             "jsonb": "text"}


def _sqlite_shape(path) -> dict:
    conn = sqlite3.connect(path)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        shape: dict = {"columns": {}, "foreign_keys": set(), "indexes": set(), "checks": set(), "triggers": set()}
        for table in tables:
            for _cid, name, kind, notnull, default, pk in conn.execute(f"PRAGMA table_info({table})"):
                shape["columns"][(table, name)] = (SAME_TYPE[kind.lower()], bool(notnull or pk), pk > 0,
                                                   None if default is None else str(default).strip("'"))
            for row in conn.execute(f"PRAGMA foreign_key_list({table})"):
                shape["foreign_keys"].add((table, row[3], row[2], row[4]))
            for _seq, name, _unique, origin, _partial in conn.execute(f"PRAGMA index_list({table})"):
                if origin == "c":
                    cols = tuple(r[2] for r in conn.execute(f"PRAGMA index_info({name})"))
                    shape["indexes"].add((name, table, cols))
        sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'operations'").fetchone()[0]
        shape["checks"] = {("operations", "status")} if "CHECK (status IN ('pending', 'done', 'failed'))" in sql else set()
        shape["triggers"] = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")}
        return shape
    finally:
        conn.close()


def _pg_default(default: str | None) -> str | None:
    if default is None:
        return None
    return default.split("::", 1)[0].strip("'")


def _pg_shape(url: str) -> dict:
    import psycopg

    shape: dict = {"columns": {}, "foreign_keys": set(), "indexes": set(), "checks": set(), "triggers": set()}
    with psycopg.connect(url) as conn:
        pks = {(t, c) for t, c in conn.execute(
            "SELECT tc.table_name, k.column_name FROM information_schema.table_constraints tc "
            "JOIN information_schema.key_column_usage k USING (constraint_schema, constraint_name) "
            "WHERE tc.constraint_type = 'PRIMARY KEY' AND tc.table_schema = 'public'")}
        for table, name, kind, nullable, default in conn.execute(
                "SELECT table_name, column_name, data_type, is_nullable, column_default FROM information_schema.columns "
                "WHERE table_schema = 'public'"):
            shape["columns"][(table, name)] = (SAME_TYPE[kind], nullable == "NO", (table, name) in pks, _pg_default(default))
        for table, col, ref_table, ref_col in conn.execute(
                "SELECT k.table_name, k.column_name, u.table_name, u.column_name "
                "FROM information_schema.referential_constraints r "
                "JOIN information_schema.key_column_usage k ON k.constraint_name = r.constraint_name "
                "JOIN information_schema.constraint_column_usage u ON u.constraint_name = r.unique_constraint_name "
                "WHERE k.table_schema = 'public'"):
            shape["foreign_keys"].add((table, col, ref_table, ref_col))
        for name, table, cols in conn.execute(
                "SELECT i.relname, t.relname, array(SELECT a.attname FROM unnest(x.indkey) WITH ORDINALITY k(n, o) "
                "JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.n ORDER BY k.o) "
                "FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid "
                "JOIN pg_namespace s ON s.oid = t.relnamespace WHERE s.nspname = 'public' AND NOT x.indisprimary"):
            shape["indexes"].add((name, table, tuple(cols)))
        for table, definition in conn.execute(
                "SELECT conrelid::regclass::text, pg_get_constraintdef(oid) FROM pg_constraint WHERE contype = 'c'"):
            if all(f"'{s}'" in definition for s in ("pending", "done", "failed")):
                shape["checks"].add((table, "status"))
        shape["triggers"] = {r[0] for r in conn.execute(
            "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal")}
    return shape


@pytest.mark.postgres
def test_sqlite_and_postgresql_stores_have_one_schema(tmp_path, fresh_postgres_dsn):  # noqa: F811
    for url in (f"sqlite:///{tmp_path / 'jobs.db'}", fresh_postgres_dsn):
        open_store(url).close()
    lite, pg = _sqlite_shape(tmp_path / "jobs.db"), _pg_shape(fresh_postgres_dsn)
    assert lite["columns"] == pg["columns"]
    assert {t for t, _ in lite["columns"]} == set(TABLES) | {"schema_version"}
    assert lite["columns"][("jobs", "state")] == ("text", True, False, "planned")
    assert lite["foreign_keys"] == pg["foreign_keys"] and len(lite["foreign_keys"]) == 4
    assert lite["indexes"] == pg["indexes"] == {("jobs_claim", "jobs", ("state", "lease_expires_at")),
                                                ("operations_job", "operations", ("job_key",)),
                                                ("jobs_identity", "jobs", ("identity",)),
                                                ("jobs_name", "jobs", ("name_fold",))}
    assert lite["checks"] == pg["checks"] == {("operations", "status")}
    assert lite["triggers"] == pg["triggers"] == {"jobs_state_transition"}


def test_a_version_1_store_is_migrated_keeping_its_jobs(tmp_path):
    from contentdownload.store.schema import SCHEMA_VERSION, SQLITE, MIGRATIONS, version_table

    path = tmp_path / "jobs.db"
    conn = sqlite3.connect(path)
    conn.execute(version_table(SQLITE))
    for statement in dict(MIGRATIONS)[1](SQLITE):
        conn.execute(statement)
    conn.execute("INSERT INTO schema_version (version, applied_at) VALUES (1, 0)")
    conn.execute("INSERT INTO jobs (key, scheme, state, payload, created_at, updated_at) VALUES ('k', 's', 'planned', '{}', 0, 0)")
    conn.commit()
    conn.close()
    store = open_store(f"sqlite:///{path}")
    try:
        assert store.schema_version() == SCHEMA_VERSION >= 2 and not store.created
        rec = store.get("k")
        assert rec.state.value == "planned" and rec.location is None
    finally:
        store.close()
