"""The PostgreSQL job store: many processes on many machines share one database.

psycopg 3 with a connection pool (1 to 8 connections per store, transactions, no
autocommit). A claim selects one candidate ``FOR UPDATE SKIP LOCKED`` and updates it in
the same transaction, so claimers never wait on each other nor pick the same job. Lease
times are the database's clock (``cd_now()``, unix seconds of ``now()``), so machines
with skewed clocks agree on when a lease expired.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Any, Iterator
from urllib.parse import urlsplit, urlunsplit

from contentdownload.errors import IllegalTransition, StoreError
from contentdownload.store.base import OUTAGE_MAX_WAIT_S, PLANNED_SQL, SqlJobStore, UnknownJobError, translated
from contentdownload.store.schema import (
    POSTGRES,
    SCHEMA_VERSION,
    TRANSITION_SQLSTATE,
    check_transition_table,
    pending,
    version_table,
)

#: ``pg_advisory_xact_lock`` key that serialises schema migrations ("cdstore" in ASCII)
MIGRATION_LOCK = 0x6364_7374_6F72_65


def redact(url: str) -> str:
    """The URL without its password (for logs and ``store.url``)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit((parts.scheme, f"{user}:***@{netloc[1]}", parts.path, parts.query, parts.fragment))


def translate(exc: BaseException) -> BaseException | None:
    import psycopg
    from psycopg import errors
    from psycopg_pool import PoolTimeout

    if isinstance(exc, PoolTimeout):
        return StoreError(f"no PostgreSQL connection available for the job store: {exc}")
    if not isinstance(exc, psycopg.Error):
        return None
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if getattr(exc, "sqlstate", None) == TRANSITION_SQLSTATE:
        return IllegalTransition(f"{text} (refused by the database)")
    if isinstance(exc, errors.ForeignKeyViolation):
        return UnknownJobError(f"unknown job key (the job was never planned in this store): {text}")
    return StoreError(f"PostgreSQL job store error: {type(exc).__name__}: {text}")


def is_transient(exc: BaseException) -> bool:
    """The server is away, not the request wrong: connection refused or lost, admin shutdown,
    server starting up or out of connections, or no pooled connection in time."""
    import psycopg
    from psycopg_pool import PoolTimeout

    return isinstance(exc, (psycopg.OperationalError, PoolTimeout))


class PostgresStore(SqlJobStore):
    """A job store in a PostgreSQL database (``postgresql://user@host/db``)."""

    skip_locked = " FOR UPDATE OF jobs SKIP LOCKED"
    for_update = " FOR UPDATE"
    aborts_on_error = True

    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 8, connect_timeout: float = 10.0,
                 pool_timeout: float = OUTAGE_MAX_WAIT_S, **retry: Any):
        super().__init__(**retry)
        import psycopg
        from psycopg_pool import ConnectionPool

        self.url = redact(url)
        self._keysets: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
        self._q_cache: dict[str, str] = {}
        with translated(translate):
            try:
                with psycopg.connect(url, autocommit=False, connect_timeout=int(connect_timeout)) as conn:
                    self._migrate(conn)
            except psycopg.OperationalError as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise StoreError(f"cannot connect to the job store {self.url}: {first}") from None
            # The pool's own reconnection backs off without a bound (1, 2, 4, 8... s): after a long
            # outage its next attempt could come minutes after the server is back. It gives up
            # after one retry step instead, and the next store call, retried at its own pace,
            # starts a fresh attempt at once.
            self._pool = ConnectionPool(
                url, min_size=min_size, max_size=max_size, open=True, timeout=pool_timeout,
                reconnect_timeout=OUTAGE_MAX_WAIT_S,
                kwargs={"autocommit": False, "connect_timeout": int(connect_timeout)},
                name="contentdownload-store", check=self._check_connection,
            )

    def _check_connection(self, conn: Any) -> None:
        """The pool's check on checkout. A dead connection rarely dies alone (a restart, terminated
        backends): then every idle one is checked at once, and the dead are replaced, instead of
        the pool finding them one checkout at a time with a pause of 1, 2, 4... s between."""
        from psycopg_pool import ConnectionPool

        try:
            ConnectionPool.check_connection(conn)
        except Exception:
            self._pool.check()
            raise

    def pick_among_sql(self, limit: str = "1") -> str:
        # The LATERAL sub-select (it has a LIMIT, so it cannot be flattened) probes jobs by primary
        # key once per key of the set, in key order, and locks the first claimable row it finds,
        # skipping rows other claimers hold: the plan does not depend on table statistics.
        return ("SELECT j.key FROM claim_keys c CROSS JOIN LATERAL ("
                "SELECT jobs.key FROM jobs WHERE jobs.key = c.key "
                f"AND {PLANNED_SQL} LIMIT 1 FOR UPDATE SKIP LOCKED) j "
                f"WHERE c.set_id = ? AND c.key > ? ORDER BY c.key LIMIT {limit}")

    # -- connections ------------------------------------------------------------------

    def q(self, sql: str) -> str:
        converted = self._q_cache.get(sql)
        if converted is None:
            converted = self._q_cache[sql] = sql.replace("?", "%s")
        return converted

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        with self._pool.connection() as conn:
            yield conn

    def _begin(self, conn: Any, write: bool) -> None:
        pass  # the first statement opens the transaction (autocommit is off)

    def _relax(self, conn: Any) -> None:
        conn.execute("SET LOCAL synchronous_commit TO off")

    def _commit(self, conn: Any) -> None:
        conn.commit()

    def _rollback(self, conn: Any) -> None:
        try:
            conn.rollback()
        except Exception:
            pass

    def _translate(self, exc: BaseException) -> BaseException | None:
        return translate(exc)

    def _retryable(self, exc: BaseException) -> bool:
        from psycopg import errors

        return isinstance(exc, (errors.DeadlockDetected, errors.SerializationFailure))

    def _transient(self, exc: BaseException) -> bool:
        return is_transient(exc)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.close()

    # -- schema -----------------------------------------------------------------------

    @staticmethod
    def _version(conn: Any) -> int:
        if conn.execute("SELECT to_regclass('schema_version')").fetchone()[0] is None:
            return 0
        return int(conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0])

    def _migrate(self, conn: Any) -> None:
        try:
            if self._version(conn) != SCHEMA_VERSION:
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))  # one process migrates at a time
                self.created = self._version(conn) == 0
                conn.execute(version_table(POSTGRES))
                for version, statements in pending(POSTGRES, self._version(conn), self.url):
                    self._apply_migration(conn, version, statements)
                    conn.execute("INSERT INTO schema_version (version, applied_at) VALUES (%s, cd_now())", (version,))
            found = {(a, b) for a, b in conn.execute("SELECT from_state, to_state FROM job_transitions")}
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        check_transition_table(found, self.url)

    def schema_version(self) -> int:
        return self._run(self._version, write=False)

    # -- PostgreSQL specifics ---------------------------------------------------------

    def _insert_planned(self, conn: Any, rows: list[tuple[str, str, str, str | None, str | None]]) -> int:
        inserted = 0
        for start in range(0, len(rows), 10_000):
            chunk = rows[start:start + 10_000]
            cur = conn.execute(
                "INSERT INTO jobs (key, scheme, state, payload, identity, name_fold, location, created_at, updated_at) "
                "SELECT k, s, 'planned', p::jsonb, i, f, %s, cd_now(), cd_now() "
                "FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[]) WITH ORDINALITY AS t (k, s, p, i, f, n) "
                "ORDER BY n ON CONFLICT (key) DO NOTHING",
                (self.location, *([r[i] for r in chunk] for i in range(5))),
            )
            inserted += cur.rowcount
        return inserted

    def _keyset_cache(self, conn: Any) -> dict:
        cache = self._keysets.get(conn)
        if cache is None:
            cache = self._keysets[conn] = {}
        return cache

    def _load_keyset(self, conn: Any, set_id: int, keys: frozenset[str], evict: list[int]) -> None:
        try:
            self._fill_keyset(conn, set_id, keys, evict)
            conn.commit()
        except BaseException:
            conn.rollback()
            raise

    def _fill_keyset(self, conn: Any, set_id: int, keys: frozenset[str], evict: list[int]) -> None:
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS claim_keys (set_id bigint NOT NULL, key text NOT NULL, "
                     "PRIMARY KEY (set_id, key))")
        for old in evict:
            conn.execute("DELETE FROM claim_keys WHERE set_id = %s", (old,))
        with conn.cursor().copy("COPY claim_keys (set_id, key) FROM STDIN") as copy:
            for key in keys:
                copy.write_row((set_id, key))
        conn.execute("ANALYZE claim_keys")
