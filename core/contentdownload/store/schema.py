"""The job store's schema, described once and rendered for SQLite and PostgreSQL.

Tables are lists of columns in abstract types (``text``, ``json``, ``int``, ``bigint``,
``real``); a :class:`Dialect` maps them to the database's types and supplies the few
statements that differ (the ``cd_now()`` clock function and the transition trigger).
Migrations are ``(version, render(dialect) -> statements)``: never edit a released one,
add the next.
"""

from __future__ import annotations

from typing import Callable

import attrs

from contentdownload.errors import StoreError
from contentdownload.store import transitions
from contentdownload.store.transitions import JobState

TRANSITION_ERROR = "illegal job transition"
#: the SQLSTATE PostgreSQL's transition trigger raises
TRANSITION_SQLSTATE = "CDX01"


class SchemaVersionError(StoreError):
    """The store was written by a newer version of contentdownload (its schema version is unknown here)."""


@attrs.frozen(kw_only=True)
class Dialect:
    """How one database spells the schema."""

    name: str
    types: dict[str, str]
    #: appended to ``CREATE TABLE (...)`` of a table with a text primary key
    keyed_suffix: str
    #: statements run before the tables (functions the tables' defaults or triggers use)
    prelude: tuple[str, ...]
    #: the trigger that refuses a state change the transition table forbids
    trigger: tuple[str, ...]


# (name, abstract type, constraints)
Column = tuple[str, str, str]

STATE_REF = "REFERENCES job_states (state)"

TABLES: dict[str, tuple[Column, ...]] = {
    "job_states": (("state", "text", "PRIMARY KEY"),),
    "job_transitions": (
        ("from_state", "text", f"NOT NULL {STATE_REF}"),
        ("to_state", "text", f"NOT NULL {STATE_REF}"),
    ),
    "jobs": (
        ("key", "text", "PRIMARY KEY"),
        ("scheme", "text", "NOT NULL"),
        ("state", "text", f"NOT NULL DEFAULT 'planned' {STATE_REF}"),
        ("payload", "json", "NOT NULL DEFAULT '{}'"),
        ("attempts", "int", "NOT NULL DEFAULT 0"),
        ("claims", "int", "NOT NULL DEFAULT 0"),
        ("epoch", "bigint", "NOT NULL DEFAULT 0"),
        ("lease_owner", "text", ""),
        ("lease_expires_at", "real", ""),
        ("leased_at", "real", ""),
        ("etag", "text", ""),
        ("last_modified", "text", ""),
        ("size", "bigint", ""),
        ("sha256", "text", ""),
        ("path", "text", ""),
        ("final_url", "text", ""),
        ("content_type", "text", ""),
        ("mtime_ns", "bigint", ""),
        ("last_error", "text", ""),
        ("created_at", "real", "NOT NULL"),
        ("updated_at", "real", "NOT NULL"),
    ),
    "operations": (
        ("op_key", "text", "PRIMARY KEY"),
        ("job_key", "text", "NOT NULL REFERENCES jobs (key)"),
        ("kind", "text", "NOT NULL"),
        ("status", "text", "NOT NULL CHECK (status IN ('pending', 'done', 'failed'))"),
        ("epoch", "bigint", "NOT NULL DEFAULT 0"),
        ("result", "json", ""),
        ("error", "text", ""),
        ("created_at", "real", "NOT NULL"),
        ("updated_at", "real", "NOT NULL"),
    ),
}
#: columns later migrations add: version -> (table, column). ``TABLES`` stays the shape of version 1.
ADDED_COLUMNS: dict[int, tuple[tuple[str, Column], ...]] = {
    # the output folder a job's file is in (or is going to), as ``host:/absolute/folder``
    2: (("jobs", ("location", "text", "")),),
    # a lease on the steady clock of one boot (:mod:`contentdownload.clock`): the boot's identity and the
    # reading at which the lease ends. SQLite measures leases with them; PostgreSQL leaves them NULL
    # (its own clock, ``cd_now()``, is the authority for every machine).
    3: (("jobs", ("lease_boot_id", "text", "")), ("jobs", ("lease_boot_deadline", "real", ""))),
    # a job's content identity and its output name folded for a case-insensitive comparison
    # (``str.casefold``), copied from the payload (indexed: see LOOKUP_INDEXES)
    4: (("jobs", ("identity", "text", "")), ("jobs", ("name_fold", "text", ""))),
}
#: table constraints after the columns
TABLE_CONSTRAINTS = {"job_transitions": ("PRIMARY KEY (from_state, to_state)",)}
INDEXES = (("jobs_claim", "jobs", "state, lease_expires_at"), ("operations_job", "operations", "job_key"))
#: tables without an integer row id (SQLite's ``WITHOUT ROWID``)
KEYED = ("job_states", "job_transitions")

SQLITE = Dialect(
    name="sqlite",
    types={"text": "TEXT", "json": "TEXT", "int": "INTEGER", "bigint": "INTEGER", "real": "REAL"},
    keyed_suffix=" WITHOUT ROWID",
    prelude=(),  # cd_now() is a Python function registered on each connection
    trigger=(
        "CREATE TRIGGER jobs_state_transition BEFORE UPDATE OF state ON jobs FOR EACH ROW "
        "WHEN NOT EXISTS (SELECT 1 FROM job_transitions t WHERE t.from_state = OLD.state AND t.to_state = NEW.state) "
        f"BEGIN SELECT RAISE(ABORT, '{TRANSITION_ERROR}'); END",
    ),
)

POSTGRES = Dialect(
    name="postgresql",
    types={"text": "text", "json": "jsonb", "int": "integer", "bigint": "bigint", "real": "double precision"},
    keyed_suffix="",
    prelude=(
        "CREATE OR REPLACE FUNCTION cd_now() RETURNS double precision LANGUAGE sql STABLE "
        "AS $$ SELECT extract(epoch FROM now())::double precision $$",
    ),
    trigger=(
        "CREATE OR REPLACE FUNCTION jobs_check_transition() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF NOT EXISTS (SELECT 1 FROM job_transitions t WHERE t.from_state = OLD.state AND t.to_state = NEW.state) THEN "
        f"RAISE EXCEPTION '{TRANSITION_ERROR}: % -> % (job %)', OLD.state, NEW.state, OLD.key "
        f"USING ERRCODE = '{TRANSITION_SQLSTATE}'; END IF; RETURN NEW; END $$",
        "CREATE TRIGGER jobs_state_transition BEFORE UPDATE OF state ON jobs "
        "FOR EACH ROW EXECUTE FUNCTION jobs_check_transition()",
    ),
)


def create_table(dialect: Dialect, name: str) -> str:
    parts = [" ".join(p for p in (col, dialect.types[kind], extra) if p) for col, kind, extra in TABLES[name]]
    parts += TABLE_CONSTRAINTS.get(name, ())
    suffix = dialect.keyed_suffix if name in KEYED else ""
    return f"CREATE TABLE {name} ({', '.join(parts)}){suffix}"


def _rows(values: list[tuple[str, ...]]) -> str:
    return ", ".join("(" + ", ".join(f"'{v}'" for v in row) + ")" for row in values)


def _migration_1(dialect: Dialect) -> list[str]:
    statements = [*dialect.prelude]
    statements += [create_table(dialect, "job_states"),
                   f"INSERT INTO job_states (state) VALUES {_rows([(s.value,) for s in JobState])}",
                   create_table(dialect, "job_transitions"),
                   f"INSERT INTO job_transitions (from_state, to_state) VALUES {_rows(list(transitions.pairs()))}"]
    statements += [create_table(dialect, name) for name in ("jobs", "operations")]
    statements += [f"CREATE INDEX {name} ON {table} ({cols})" for name, table, cols in INDEXES]
    return statements + list(dialect.trigger)


def columns(table: str) -> tuple[Column, ...]:
    """Every column of ``table`` at the current schema version."""
    added = tuple(col for version in sorted(ADDED_COLUMNS) for name, col in ADDED_COLUMNS[version] if name == table)
    return TABLES[table] + added


def _added(version: int) -> Callable[[Dialect], list[str]]:
    def render(dialect: Dialect) -> list[str]:
        return [" ".join(p for p in (f"ALTER TABLE {table} ADD COLUMN {col}", dialect.types[kind], extra) if p)
                for table, (col, kind, extra) in ADDED_COLUMNS[version]]

    return render


#: Indexes of migration 4 on its lookup columns: planning finds a page of jobs' records
#: through them instead of reading every record.
LOOKUP_INDEXES = (("jobs_identity", "jobs", "identity"), ("jobs_name", "jobs", "name_fold"))
#: the migration after whose statements the store fills the lookup columns of existing rows
LOOKUP_VERSION = 4


def _migration_4(dialect: Dialect) -> list[str]:
    return _added(4)(dialect) + [f"CREATE INDEX {name} ON {table} ({cols})" for name, table, cols in LOOKUP_INDEXES]


MIGRATIONS: list[tuple[int, Callable[[Dialect], list[str]]]] = [(1, _migration_1), (2, _added(2)), (3, _added(3)), (4, _migration_4)]
SCHEMA_VERSION = MIGRATIONS[-1][0]


def version_table(dialect: Dialect) -> str:
    return (f"CREATE TABLE IF NOT EXISTS schema_version (version {dialect.types['int']} PRIMARY KEY, "
            f"applied_at {dialect.types['real']} NOT NULL)")


def pending(dialect: Dialect, current: int, url: str) -> list[tuple[int, list[str]]]:
    """The migrations a store at schema version ``current`` still needs, rendered for ``dialect``."""
    if current > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"the job store {url} has schema version {current}; this version of contentdownload "
            f"knows up to {SCHEMA_VERSION}: upgrade contentdownload to use it"
        )
    return [(version, render(dialect)) for version, render in MIGRATIONS if version > current]


def check_transition_table(found: set[tuple[str, str]], url: str) -> None:
    """The database's copy of the transition table must be the code's: a difference means a missing migration."""
    expected = set(transitions.pairs())
    if found != expected:
        extra, missing = sorted(found - expected), sorted(expected - found)
        raise StoreError(
            f"the job store {url} has a different transition table than this version "
            f"(extra {extra}, missing {missing}); it needs a migration, not a repair"
        )
