"""The job store interface, its records and states, and the SQL machinery both databases share.

A job is a row keyed by its job key. Its life::

    planned --claim--> leased --mark_streaming--> streaming --finish--> finalized
       ^                 |  ^                        |    \\--fail--> failed (or planned: retry)
       |                 |  '--takeover (expired)----'
       '---- release / retryable fail / requeue (failed) / reopen (finalized)

Every claim bumps the job's ``epoch`` (its fencing token). Heartbeat, mark_streaming,
finish and fail name the epoch of the claim they act for, and are refused with
:class:`~contentdownload.errors.LeaseLostError` once another worker has taken the job
over (or the lease was released), so a worker that was paused past its lease cannot
finalize a job someone else now owns.

The operation ledger records each side effect of a job under an operation key
(:func:`contentdownload.jobs.keys.operation_key`) so that a job replayed after a crash skips
effects that completed (``done``) and redoes those that did not (``pending``/``failed``).
"""

from __future__ import annotations

import abc
import json
import logging
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Collection, Iterable, Iterator, Sequence, TypeVar

import attrs

from contentdownload.clock import SYSTEM_CLOCK, Clock
from contentdownload.errors import IllegalTransition, LeaseLostError, StoreError, StoreUnavailableError
from contentdownload.store import transitions
from contentdownload.store.schema import LOOKUP_VERSION
from contentdownload.store.schema import SchemaVersionError  # noqa: F401  (re-exported)
from contentdownload.store.transitions import JobState

T = TypeVar("T")


class UnknownJobError(StoreError, KeyError):
    """An operation named a job key that was never planned in this store."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "unknown job"


class UnknownOperationError(StoreError, KeyError):
    """``op_done``/``op_failed`` named an operation that ``op_begin`` never started."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown operation"


@attrs.frozen
class PlannedJob:
    """A job to record: its key, the key's scheme, and a JSON-able payload (urls, ids, relative path...)."""

    key: str
    scheme: str
    payload: dict = attrs.field(factory=dict)


@attrs.frozen
class JobRecord:
    """A job as the store has it. Times are unix seconds (the database's clock for PostgreSQL)."""

    key: str
    scheme: str
    state: JobState
    payload: dict
    attempts: int  # failures recorded (reset by requeue)
    claims: int  # how many times the job was claimed
    epoch: int  # the fencing token of the current (or last) lease
    lease_owner: str | None
    lease_expires_at: float | None
    etag: str | None
    last_modified: str | None
    size: int | None
    sha256: str | None
    path: str | None
    final_url: str | None
    content_type: str | None
    mtime_ns: int | None
    last_error: str | None
    updated_at: float
    #: the output folder of the job's file (finished) or of the run that planned or failed it: ``host:/folder``
    location: str | None = None


@attrs.frozen
class Claim:
    """A lease on one job: act for it with ``key`` and ``epoch``."""

    key: str
    epoch: int
    owner: str
    record: JobRecord


class JobStore(abc.ABC):
    """Where jobs, leases and the operation ledger live. Thread-safe: share one per process.

    ``created``: opening the store created its schema (it held nothing before).
    ``location``: the output folder (``host:/folder``) this process works for, recorded with the
    jobs it plans, finishes or fails (``None``: nothing recorded), so a store shared by several
    folders can tell them apart.
    """

    url: str
    created: bool = False
    location: str | None = None

    # -- jobs -------------------------------------------------------------------------

    @abc.abstractmethod
    def plan(self, jobs: Sequence[PlannedJob]) -> int:
        """Record new keys as ``planned``; keys already present are left alone. Returns how many were new."""

    @abc.abstractmethod
    def get(self, key: str) -> JobRecord | None: ...

    @abc.abstractmethod
    def claim(self, owner: str, ttl: float, keys: Collection[str] | None = None) -> Claim | None:
        """Take one claimable job, optionally among ``keys``: a job held under an expired lease
        first (wherever it is: takeover comes at the next claim), else a planned one.

        Pass the same ``frozenset`` object on every call of a run: the SQL backends load
        the key set into a per-connection temporary table once and reuse it.
        """

    @abc.abstractmethod
    def claim_key(self, key: str, owner: str, ttl: float) -> Claim | None:
        """Claim this job if it is claimable now; ``None`` otherwise."""

    @abc.abstractmethod
    def heartbeat(self, key: str, epoch: int, ttl: float) -> None:
        """Extend the lease to now + ``ttl``. Raises LeaseLostError when the lease is no longer this epoch's."""

    @abc.abstractmethod
    def mark_streaming(self, key: str, epoch: int) -> None:
        """``leased -> streaming`` (no-op when already streaming). Fenced."""

    @abc.abstractmethod
    def finish(self, key: str, epoch: int, *, path: str, size: int, sha256: str, etag: str | None = None,
               last_modified: str | None = None, final_url: str | None = None, content_type: str | None = None,
               mtime_ns: int | None = None) -> None:
        """``-> finalized`` with the file's facts; clears the lease. Fenced."""

    @abc.abstractmethod
    def fail(self, key: str, epoch: int, error: str, *, retryable: bool, max_attempts: int) -> JobState:
        """Count a failure: back to ``planned`` while retryable and under ``max_attempts``, else ``failed``. Fenced."""

    @abc.abstractmethod
    def release(self, key: str, epoch: int) -> None:
        """Give the job back (``planned``) without counting a failure. A stale epoch is ignored."""

    @abc.abstractmethod
    def reopen(self, key: str) -> None:
        """``finalized -> planned`` (the file is gone, or revalidation is asked for); no-op in other states."""

    @abc.abstractmethod
    def requeue(self, key: str) -> bool:
        """``failed -> planned`` for one job, attempts reset; ``False`` when it was not failed."""

    @abc.abstractmethod
    def requeue_failed(self) -> int:
        """``failed -> planned`` for every failed job, attempts reset. Returns how many."""

    @abc.abstractmethod
    def stats(self) -> dict:
        """``{"by_state", "expired_leases", "oldest_in_flight_s", "failures_by_reason", "total"}``."""

    @abc.abstractmethod
    def records(self, state: JobState | str | None = None) -> Iterator[JobRecord]: ...

    @abc.abstractmethod
    def lookup(self, *, keys: Iterable[str] = (), identities: Iterable[str] = (),
               names: Iterable[str] = ()) -> list[JobRecord]:
        """The records with one of ``keys``, one of the content ``identities`` (payload ``identity``)
        or one of the output ``names`` (payload ``relative_path``, compared case-insensitively), in
        key order. Indexed: the cost follows the number of values asked, not the store's size."""

    @abc.abstractmethod
    def count_active(self, keys: frozenset[str]) -> int:
        """How many of ``keys`` are planned, leased or streaming (pass the run's key set, as to :meth:`claim`)."""

    # -- the operation ledger ---------------------------------------------------------

    @abc.abstractmethod
    def op_begin(self, op_key: str, job_key: str, kind: str, epoch: int) -> str:
        """Start an operation; returns its status before: ``new``, ``pending``, ``done`` (skip it) or ``failed``."""

    def op_begin_many(self, ops: Sequence[tuple[str, str, str, int]]) -> list[str]:
        """:meth:`op_begin` for each ``(op_key, job_key, kind, epoch)``, in one transaction; the statuses in order."""
        if len(ops) <= 1:
            return [self.op_begin(*op) for op in ops]
        return self.batched(lambda: [self.op_begin(*op) for op in ops])

    @abc.abstractmethod
    def op_done(self, op_key: str, result: dict | None = None) -> None: ...

    @abc.abstractmethod
    def op_failed(self, op_key: str, error: str) -> None: ...

    @abc.abstractmethod
    def op_get(self, op_key: str) -> dict | None:
        """``{"status", "kind", "job_key", "result", "epoch", "updated_at", "error"}`` or ``None``."""

    @abc.abstractmethod
    def close(self) -> None: ...

    # -- batches ----------------------------------------------------------------------

    @abc.abstractmethod
    def batched(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` with every store call it makes in this thread in ONE write transaction,
        committed when ``fn`` returns; a ``batched`` inside ``fn`` joins it.

        ``fn`` must be idempotent: only store calls and computation, no other side effect,
        for it may run more than once. A transient failure of the store (the database
        locked or away, a deadlock, a serialization failure) rolls the transaction back
        and runs the whole ``fn`` again, within the store's retry budget. An exception
        that ``fn`` raises rolls everything back and propagates; one it catches (the
        refusal of one fenced call, say) leaves the transaction going, without the
        refused call's writes.
        """

    def claim_many(self, owner: str, ttl: float, keys: Collection[str] | None = None, limit: int = 64) -> list[Claim]:
        """Up to ``limit`` claims in one transaction, in the order successive :meth:`claim` calls
        would make them (jobs under an expired lease first, then planned ones)."""
        def take() -> list[Claim]:
            claims: list[Claim] = []
            while len(claims) < limit:
                claim = self.claim(owner, ttl, keys)
                if claim is None:
                    break
                claims.append(claim)
            return claims

        return self.batched(take)

    def heartbeat_many(self, pairs: Sequence[tuple[str, int]], ttl: float) -> dict[str, BaseException]:
        """Extend the leases ``(key, epoch)`` in one transaction; the refusal of each key whose lease
        is no longer held (an empty dict: all are)."""
        def beat() -> dict[str, BaseException]:
            refused: dict[str, BaseException] = {}
            for key, epoch in pairs:
                try:
                    self.heartbeat(key, epoch, ttl)
                except (LeaseLostError, UnknownJobError) as exc:
                    refused[key] = exc
            return refused

        return self.batched(beat)

    def __enter__(self) -> "JobStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {getattr(self, 'url', '?')}>"


# -- shared helpers ---------------------------------------------------------------------

HELD_STATES = tuple(s.value for s in transitions.HELD)


def empty_stats() -> dict:
    return {"by_state": {s.value: 0 for s in JobState}, "expired_leases": 0, "oldest_in_flight_s": None,
            "failures_by_reason": {}, "total": 0, "by_location": {}}


def count_location(stats: dict, location: str | None, state: str, n: int) -> None:
    """Add ``n`` jobs in ``state`` at ``location`` to ``stats["by_location"]`` (jobs without a location are not listed)."""
    if location:
        stats["by_location"].setdefault(location, {s.value: 0 for s in JobState})[state] += n


def dumps(obj: Any) -> str | None:
    if obj is None:
        return None
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def loads(value: Any) -> Any:
    if value is None or isinstance(value, (dict, list)):
        return value
    return json.loads(value)


def fenced_refusal(key: str, epoch: int, row: tuple | None, target: JobState | None) -> Exception:
    """Why a fenced write matched no row: unknown job, stale epoch, or a move the table forbids.

    ``row`` is ``(state, epoch)`` as stored now; ``target`` is the state the write wanted
    (``None`` for a heartbeat, which moves nothing).
    """
    if row is None:
        return UnknownJobError(f"unknown job key {key!r}")
    state, current = JobState(row[0]), int(row[1])
    if current != epoch:
        return LeaseLostError(f"lease on job {key} was taken over (epoch {epoch} is stale; now {current})")
    if target is not None and not transitions.is_allowed(state, target):
        return IllegalTransition(f"illegal job transition: {state.value} -> {target.value} (job {key})")
    return LeaseLostError(f"job {key} is {state.value}: no lease of epoch {epoch} to act for")


def lookup_columns(payload: dict | None) -> tuple[str | None, str | None]:
    """The indexed copies of a payload's fields: its content identity and its output name, casefolded."""
    payload = payload or {}
    name = payload.get("relative_path")
    return payload.get("identity") or None, name.casefold() if isinstance(name, str) and name else None


def fail_target(attempts_after: int, retryable: bool, max_attempts: int) -> JobState:
    return JobState.PLANNED if retryable and attempts_after < max_attempts else JobState.FAILED


# -- the SQL layer (SQLite and PostgreSQL) ----------------------------------------------

RECORD_COLUMNS = (
    "key", "scheme", "state", "payload", "attempts", "claims", "epoch", "lease_owner", "lease_expires_at",
    "etag", "last_modified", "size", "sha256", "path", "final_url", "content_type", "mtime_ns", "last_error",
    "updated_at", "location",
)
COLS = ", ".join(RECORD_COLUMNS)
HELD_SQL = "('leased', 'streaming')"
PLANNED_SQL = "state = 'planned'"
ACTIVE_SQL = "('planned', 'leased', 'streaming')"
PAGE = 1000
#: values per ``IN (...)`` of a lookup (under SQLite's default limit of 999 parameters)
LOOKUP_CHUNK = 500
KEYSETS_PER_CONNECTION = 8
#: how long store calls keep retrying while the store is unreachable (``--store-retry-s``)
STORE_RETRY_S = 300.0
OUTAGE_FIRST_WAIT_S, OUTAGE_MAX_WAIT_S = 0.1, 5.0

log = logging.getLogger("contentdownload.store")


@attrs.define
class KeySet:
    """A claim key set loaded into a connection's ``claim_keys`` table, and where its last claim was."""

    set_id: int
    cursor: str = ""


class ReplayBatch(Exception):
    """A statement failed inside a batch and aborted its transaction: the batch runs again with savepoints
    (caught by :meth:`SqlJobStore.batched`: never seen outside it)."""


@attrs.define
class Batch:
    """One attempt of a thread's :meth:`SqlJobStore.batched` call: its connection, the failure that
    lost its transaction, where the connection's key sets stood, and those loaded in the transaction."""

    conn: Any
    cursors: list  # (KeySet, cursor) before the batch
    savepoints: bool = False  # each call runs under a savepoint
    broken: BaseException | None = None
    loaded: list = attrs.field(factory=list)  # (cache, keys)

    def undo(self) -> None:
        """The transaction is rolled back: so are the claim cursors, and the key sets it loaded are gone."""
        for keyset, cursor in self.cursors:
            keyset.cursor = cursor
        for cache, keys in self.loaded:
            cache.pop(keys, None)


def row_to_record(row: Sequence[Any]) -> JobRecord:
    values = list(row)
    values[2] = JobState(values[2])
    values[3] = loads(values[3]) or {}
    for i in (4, 5, 6):
        values[i] = int(values[i])
    for i in (8, 18):
        values[i] = None if values[i] is None else float(values[i])
    for i in (11, 16):
        values[i] = None if values[i] is None else int(values[i])
    return JobRecord(*values)


class SqlJobStore(JobStore):
    """Job store logic in SQL, written once for SQLite and PostgreSQL.

    Statements use ``?`` placeholders and the ``cd_now()`` function (unix seconds; a Python
    function on SQLite connections, a SQL function on the database's clock in PostgreSQL).
    Subclasses provide connections, transactions, error translation, the bulk insert of
    :meth:`plan`, the loading of claim key sets, and how a lease is measured
    (:attr:`lease_sql`, :attr:`expired_sql`).

    ``clock``: the clocks the store reads in Python (the SQLite store's leases and times);
    ``timer`` and ``sleep`` pace the retries while the store is away.
    """

    #: appended to the candidate SELECT of a claim (``FOR UPDATE ... SKIP LOCKED`` in PostgreSQL)
    skip_locked = ""
    #: appended to a SELECT that reads a row it is about to update (``FOR UPDATE`` in PostgreSQL)
    for_update = ""
    #: the assignments that start or extend a lease, one ``?`` per item of :meth:`_ttl`
    lease_sql = "lease_expires_at = cd_now() + ?"
    #: true for a held job whose lease has run out
    expired_sql = "lease_expires_at < cd_now()"

    def __init__(self, *, retry_s: float = STORE_RETRY_S, clock: Clock = SYSTEM_CLOCK,
                 timer: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        self.retry_s = float(retry_s)
        self.clock = clock
        self._timer, self._sleep = timer, sleep
        self._outage = threading.local()  # .retrying: this thread is running a call again after an outage
        self._batch = threading.local()  # .open: this thread's batch (see :meth:`batched`), when one is running
        self._closed = False
        self._keyset_ids = iter(range(1, 1 << 62))
        self._keyset_lock = threading.Lock()

    # -- hooks ------------------------------------------------------------------------

    def q(self, sql: str) -> str:
        """The statement in the driver's placeholder style."""
        return sql

    @abc.abstractmethod
    def _connection(self) -> Any:
        """Context manager yielding a connection for this thread."""

    @abc.abstractmethod
    def _begin(self, conn: Any, write: bool) -> None: ...

    @abc.abstractmethod
    def _commit(self, conn: Any) -> None: ...

    @abc.abstractmethod
    def _rollback(self, conn: Any) -> None: ...

    @abc.abstractmethod
    def _translate(self, exc: BaseException) -> BaseException | None:
        """The store error for a driver error (``None``: not a driver error, re-raise it as is)."""

    def _retryable(self, exc: BaseException) -> bool:
        """A transaction that failed this way was rolled back and can simply be run again."""
        return False

    def _transient(self, exc: BaseException) -> bool:
        """The store is away (server down or restarting, connection lost, database locked): wait and retry."""
        return False

    @abc.abstractmethod
    def _insert_planned(self, conn: Any, rows: list[tuple[str, str, str, str | None, str | None]]) -> int:
        """Insert ``(key, scheme, payload, identity, name_fold)`` rows whose key is new; how many were."""

    @abc.abstractmethod
    def _keyset_cache(self, conn: Any) -> dict:
        """Per-connection ``{frozenset: KeySet}`` of key sets loaded into the ``claim_keys`` temp table."""

    @abc.abstractmethod
    def _load_keyset(self, conn: Any, set_id: int, keys: frozenset[str], evict: list[int]) -> None:
        """:meth:`_fill_keyset` in a transaction of its own."""

    @abc.abstractmethod
    def _fill_keyset(self, conn: Any, set_id: int, keys: frozenset[str], evict: list[int]) -> None:
        """Put ``keys`` into the ``claim_keys`` table as set ``set_id``, dropping the sets ``evict``."""

    # -- transactions -----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"the job store {self.url} is closed")

    def _relax(self, conn: Any) -> None:
        """Let this transaction commit without waiting for its flush to disk (see :meth:`_run`)."""

    #: a statement that fails aborts the whole transaction (PostgreSQL; a failed SQLite statement is undone alone)
    aborts_on_error = False

    def batched(self, fn: Callable[[], T]) -> T:
        if self._open_batch() is not None:
            return fn()
        try:
            return self._run(lambda conn: self._run_batch(conn, fn, savepoints=False), write=True)
        except ReplayBatch:  # a statement failed and took the transaction with it: again, each call under a savepoint
            return self._run(lambda conn: self._run_batch(conn, fn, savepoints=True), write=True)

    def _open_batch(self) -> "Batch | None":
        return getattr(self._batch, "open", None)

    def _run_batch(self, conn: Any, fn: Callable[[], T], *, savepoints: bool) -> T:
        """One attempt of a batch on ``conn``, in the transaction :meth:`_run` opened."""
        cursors = [(keyset, keyset.cursor) for keyset in self._keyset_cache(conn).values()]
        batch = self._batch.open = Batch(conn, cursors=cursors, savepoints=savepoints)
        try:
            result = fn()
        except BaseException as exc:
            batch.undo()
            if batch.broken is not None and batch.broken is not exc:  # whatever fn made of the failure that lost the transaction
                raise batch.broken from exc
            raise
        else:
            if batch.broken is not None:  # fn caught the failure that lost the transaction
                batch.undo()
                raise batch.broken
            return result
        finally:
            self._batch.open = None

    def _in_batch(self, batch: "Batch", fn: Callable[..., Any], keys: frozenset[str] | None) -> Any:
        """One store call inside a batch: on its connection and in its transaction, retried only with it."""
        conn = batch.conn
        if batch.broken is not None:
            raise batch.broken
        try:
            if batch.savepoints:
                conn.execute("SAVEPOINT cd_call")
            result = fn(conn) if keys is None else fn(conn, self._keyset(conn, keys, batch))
        except Exception as exc:
            if self._transient(exc) or self._retryable(exc) or not self._in_transaction(conn):
                batch.broken = exc  # the whole batch runs again (or fails) with it
                raise
            if batch.savepoints:
                conn.execute("ROLLBACK TO SAVEPOINT cd_call")
            if isinstance(exc, (StoreError, IllegalTransition, LeaseLostError)):
                raise  # refused by the store's own checks, after no write: the transaction goes on
            mapped = self._translate(exc)
            if mapped is None:
                raise
            if self.aborts_on_error and not batch.savepoints:
                batch.broken = ReplayBatch(str(mapped))
                raise batch.broken from exc
            raise mapped from exc
        if batch.savepoints:
            conn.execute("RELEASE SAVEPOINT cd_call")
        return result

    def _in_transaction(self, conn: Any) -> bool:
        """The connection's transaction is still open (an error of the database may have rolled it back)."""
        return True

    def _run(self, fn: Callable[[Any], Any], *, write: bool, keys: frozenset[str] | None = None,
             durable: bool = True) -> Any:
        """Run ``fn(conn)`` (``fn(conn, keyset)`` with ``keys``) in one transaction.

        Transient conflicts (deadlocks) are retried at once; while the store is away
        (see :meth:`_transient`) the call is retried with exponential backoff for up to
        :attr:`retry_s` seconds, with one log line per retry, then raises
        :class:`~contentdownload.errors.StoreUnavailableError`. ``durable=False`` marks
        writes whose loss in a crash of the database server is harmless (heartbeats,
        ``mark_streaming``, starting an operation): they may commit without waiting for
        the disk. Commits stay ordered, so any later durable commit makes them durable too.
        Inside a :meth:`batched` call of this thread, ``fn`` runs in the batch's transaction.
        """
        self._check_open()
        batch = self._open_batch()
        if batch is not None:
            return self._in_batch(batch, fn, keys)
        started, wait = self._timer(), OUTAGE_FIRST_WAIT_S
        try:
            while True:
                try:
                    return self._attempt(fn, write=write, keys=keys, durable=durable)
                except (StoreError, IllegalTransition, LeaseLostError):
                    raise
                except Exception as exc:
                    self._wait_out(exc, self._timer() - started, wait)
                    wait = min(wait * 2, OUTAGE_MAX_WAIT_S)
                    self._outage.retrying = True
        finally:
            self._outage.retrying = False

    def _wait_out(self, exc: Exception, waited: float, wait: float) -> None:
        """Sleep before running a call again after a transient error; raise the error when it is not one,
        or :class:`StoreUnavailableError` when the budget is spent."""
        if not self._transient(exc):
            mapped = self._translate(exc)
            if mapped is None:
                raise exc
            raise mapped from exc
        if waited + wait > self.retry_s:
            raise StoreUnavailableError(
                f"the job store {self.url} is unavailable (gave up after {waited:.0f} s, "
                f"--store-retry-s {self.retry_s:g}): {self._first_line(exc)}") from exc
        log.warning("job store %s unavailable (%s); retrying in %.1f s (waited %.1f s of %g)",
                    self.url, self._first_line(exc), wait, waited, self.retry_s)
        self._sleep(wait)
        self._check_open()

    @staticmethod
    def _first_line(exc: BaseException) -> str:
        text = str(exc).strip()
        return text.splitlines()[0] if text else type(exc).__name__

    def _attempt(self, fn: Callable[..., Any], *, write: bool, keys: frozenset[str] | None, durable: bool) -> Any:
        """One transaction, run again at once (up to 8 times) after a deadlock or serialization conflict."""
        for attempt in range(8):
            try:
                with self._connection() as conn:
                    keyset = self._keyset(conn, keys) if keys is not None else None
                    self._begin(conn, write)
                    if not durable:
                        self._relax(conn)
                    try:
                        result = fn(conn) if keys is None else fn(conn, keyset)
                    except BaseException:
                        self._rollback(conn)
                        raise
                    self._commit(conn)
                    return result
            except Exception as exc:
                if self._retryable(exc) and attempt < 7:
                    time.sleep(0.005 * (2 ** attempt))
                    continue
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _keyset(self, conn: Any, keys: frozenset[str], batch: "Batch | None" = None) -> "KeySet":
        """The key set loaded on ``conn`` (loading it in its own transaction, or in the ``batch``'s)."""
        cache = self._keyset_cache(conn)
        keyset = cache.get(keys)
        if keyset is not None:
            return keyset
        with self._keyset_lock:
            set_id = next(self._keyset_ids)
        evict = []
        while len(cache) >= KEYSETS_PER_CONNECTION:
            evict.append(cache.pop(next(iter(cache))).set_id)
        if batch is None:
            self._load_keyset(conn, set_id, keys, evict)
        else:
            self._fill_keyset(conn, set_id, keys, evict)
            batch.loaded.append((cache, keys))
        keyset = cache[keys] = KeySet(set_id)
        return keyset

    @staticmethod
    def _fetchall(conn: Any, sql: str, params: Sequence[Any] = ()) -> list:
        return conn.execute(sql, params).fetchall()

    # -- jobs -------------------------------------------------------------------------

    def plan(self, jobs: Sequence[PlannedJob]) -> int:
        unique: dict[str, tuple[str, str, str, str | None, str | None]] = {}
        for job in jobs:
            if job.key not in unique:
                unique[job.key] = (job.key, job.scheme, dumps(job.payload or {}) or "{}", *lookup_columns(job.payload))
        if not unique:
            self._check_open()
            return 0
        rows = [unique[k] for k in sorted(unique)]  # one lock order for every planner: no deadlocks
        return self._run(lambda conn: self._insert_planned(conn, rows), write=True)

    def get(self, key: str) -> JobRecord | None:
        rows = self._run(lambda conn: self._fetchall(conn, self.q(f"SELECT {COLS} FROM jobs WHERE key = ?"), (key,)), write=False)
        return row_to_record(rows[0]) if rows else None

    def _ttl(self, ttl: float) -> tuple[float, ...]:
        """The parameters of :attr:`lease_sql`."""
        return (float(ttl),)

    @property
    def _lease(self) -> str:
        """Lease the job of the key condition that follows (params: owner, :meth:`_ttl`, then the condition's)."""
        return ("UPDATE jobs SET state = 'leased', epoch = epoch + 1, claims = claims + 1, lease_owner = ?, "
                f"{self.lease_sql}, leased_at = cd_now(), updated_at = cd_now() WHERE key ")

    def _claim_sql(self, where: str) -> str:
        """One statement: pick a candidate (skipping rows other claimers hold locked) and lease it."""
        return self.q(f"{self._lease}= (SELECT key FROM jobs WHERE {where} LIMIT 1{self.skip_locked}) RETURNING {COLS}")

    def pick_among_sql(self, limit: str = "1") -> str:
        """The first ``limit`` planned jobs among a loaded key set (params: set_id, after), in key order."""
        raise NotImplementedError

    def pick_expired_sql(self, limit: str = "1") -> str:
        """``limit`` jobs of a loaded key set held under an expired lease (param: set_id), found through
        ``jobs_claim``, the longest expired first."""
        return (f"SELECT jobs.key FROM jobs WHERE {self.expired_held} AND EXISTS "
                "(SELECT 1 FROM claim_keys c WHERE c.set_id = ? AND c.key = jobs.key) "
                f"ORDER BY jobs.lease_expires_at LIMIT {limit}{self.skip_locked}")

    @staticmethod
    def _as_claim(rows: list, owner: str) -> Claim | None:
        if not rows:
            return None
        record = row_to_record(rows[0])
        return Claim(key=record.key, epoch=record.epoch, owner=owner, record=record)

    @property
    def expired_held(self) -> str:
        """A job whose holder's lease ran out."""
        return f"state IN {HELD_SQL} AND {self.expired_sql}"

    def claim(self, owner: str, ttl: float, keys: Collection[str] | None = None) -> Claim | None:
        if keys is None:
            def take(conn: Any) -> Claim | None:
                for where in (self.expired_held, PLANNED_SQL):
                    claim = self._as_claim(self._fetchall(conn, self._claim_sql(where), (owner, *self._ttl(ttl))), owner)
                    if claim is not None:
                        return claim
                return None

            return self._run(take, write=True)
        wanted = keys if isinstance(keys, frozenset) else frozenset(keys)
        if not wanted:
            self._check_open()
            return None

        def take_among(conn: Any, keyset: KeySet) -> Claim | None:
            # An expired lease first, wherever it is in the list (few jobs are held: the index finds
            # them), then the run's planned keys in key order from where this connection last found
            # a job, then once from the start: finished keys are stepped over once, not at every claim.
            expired = self.q(f"{self._lease}= ({self.pick_expired_sql()}) RETURNING {COLS}")
            claim = self._as_claim(self._fetchall(conn, expired, (owner, *self._ttl(ttl), keyset.set_id)), owner)
            if claim is not None:
                return claim
            planned = self.q(f"{self._lease}= ({self.pick_among_sql()}) RETURNING {COLS}")
            for after in dict.fromkeys((keyset.cursor, "")):
                claim = self._as_claim(self._fetchall(conn, planned, (owner, *self._ttl(ttl), keyset.set_id, after)), owner)
                if claim is not None:
                    keyset.cursor = claim.key
                    return claim
            return None

        return self._run(take_among, write=True, keys=wanted)

    def claim_many(self, owner: str, ttl: float, keys: Collection[str] | None = None, limit: int = 64) -> list[Claim]:
        if keys is None:
            return super().claim_many(owner, ttl, None, limit)
        wanted = keys if isinstance(keys, frozenset) else frozenset(keys)
        if not wanted or limit < 1:
            self._check_open()
            return []

        def take_among(conn: Any, keyset: KeySet) -> list[Claim]:
            # What successive claims would take, a statement or two per kind instead of two per job.
            claims = self._lease_picked(conn, self.pick_expired_sql("?"), (keyset.set_id, limit), owner, ttl)
            for after in dict.fromkeys((keyset.cursor, "")):
                if len(claims) >= limit:
                    break
                more = self._lease_picked(conn, self.pick_among_sql("?"), (keyset.set_id, after, limit - len(claims)), owner, ttl)
                if more:
                    keyset.cursor = more[-1].key
                claims += more
            return claims

        return self._run(take_among, write=True, keys=wanted)

    def _lease_picked(self, conn: Any, pick: str, params: tuple, owner: str, ttl: float) -> list[Claim]:
        """Lease the jobs the query ``pick`` selects (and, in PostgreSQL, locks); claims in its order."""
        picked = [row[0] for row in self._fetchall(conn, self.q(pick), params)]
        records: dict[str, JobRecord] = {}
        for start in range(0, len(picked), LOOKUP_CHUNK):
            chunk = picked[start:start + LOOKUP_CHUNK]
            sql = self.q(f"{self._lease}IN ({', '.join('?' * len(chunk))}) RETURNING {COLS}")
            records.update((rec.key, rec) for rec in map(row_to_record, self._fetchall(conn, sql, (owner, *self._ttl(ttl), *chunk))))
        return [Claim(key=key, epoch=records[key].epoch, owner=owner, record=records[key]) for key in picked]

    def claim_key(self, key: str, owner: str, ttl: float) -> Claim | None:
        def take(conn: Any) -> Claim | None:
            rows = self._fetchall(conn, self.q(
                f"SELECT state, {self.expired_sql} FROM jobs WHERE key = ?{self.for_update}"), (key,))
            if not rows:
                return None
            state, expired = rows[0]
            if state == "planned" or (state in HELD_STATES and expired):
                return self._as_claim(self._fetchall(conn, self.q(f"{self._lease}= ? RETURNING {COLS}"),
                                                     (owner, *self._ttl(ttl), key)), owner)
            return None

        return self._run(take, write=True)

    def _fenced(self, conn: Any, sql: str, params: tuple, key: str, epoch: int, target: JobState | None) -> list:
        rows = self._fetchall(conn, self.q(sql), params)
        if rows:
            return rows
        now = self._fetchall(conn, self.q("SELECT state, epoch FROM jobs WHERE key = ?"), (key,))
        if (getattr(self._outage, "retrying", False) and now and target is JobState.FINALIZED
                and now[0][0] == "finalized" and int(now[0][1]) == epoch):
            return []  # this very write committed before the connection was lost, and is being run again
        raise fenced_refusal(key, epoch, now[0] if now else None, target)

    def heartbeat(self, key: str, epoch: int, ttl: float) -> None:
        self._run(lambda conn: self._fenced(
            conn,
            f"UPDATE jobs SET {self.lease_sql}, updated_at = cd_now() "
            f"WHERE key = ? AND epoch = ? AND state IN {HELD_SQL} RETURNING key",
            (*self._ttl(ttl), key, int(epoch)), key, epoch, None), write=True, durable=False)

    def mark_streaming(self, key: str, epoch: int) -> None:
        def mark(conn: Any) -> None:
            rows = self._fetchall(conn, self.q(
                "UPDATE jobs SET state = 'streaming', updated_at = cd_now() "
                "WHERE key = ? AND epoch = ? AND state = 'leased' RETURNING key"), (key, int(epoch)))
            if rows:
                return
            now = self._fetchall(conn, self.q("SELECT state, epoch FROM jobs WHERE key = ?"), (key,))
            if now and now[0][0] == "streaming" and int(now[0][1]) == epoch:
                return
            raise fenced_refusal(key, epoch, now[0] if now else None, JobState.STREAMING)

        self._run(mark, write=True, durable=False)

    def finish(self, key: str, epoch: int, *, path: str, size: int, sha256: str, etag: str | None = None,
               last_modified: str | None = None, final_url: str | None = None, content_type: str | None = None,
               mtime_ns: int | None = None) -> None:
        params = (str(path), None if size is None else int(size), sha256, etag, last_modified, final_url, content_type,
                  None if mtime_ns is None else int(mtime_ns), self.location, key, int(epoch))
        self._run(lambda conn: self._fenced(
            conn,
            "UPDATE jobs SET state = 'finalized', path = ?, size = ?, sha256 = ?, etag = ?, last_modified = ?, "
            "final_url = ?, content_type = ?, mtime_ns = ?, location = coalesce(?, location), "
            "lease_owner = NULL, lease_expires_at = NULL, "
            f"updated_at = cd_now() WHERE key = ? AND epoch = ? AND state IN {HELD_SQL} RETURNING key",
            params, key, epoch, JobState.FINALIZED), write=True)

    def fail(self, key: str, epoch: int, error: str, *, retryable: bool, max_attempts: int) -> JobState:
        def record(conn: Any) -> JobState:
            rows = self._fetchall(conn, self.q(
                "UPDATE jobs SET attempts = attempts + 1, last_error = ?, "
                "state = CASE WHEN ? = 1 AND attempts + 1 < ? THEN 'planned' ELSE 'failed' END, "
                "location = coalesce(?, location), lease_owner = NULL, lease_expires_at = NULL, updated_at = cd_now() "
                f"WHERE key = ? AND epoch = ? AND state IN {HELD_SQL} RETURNING state"),
                (str(error), 1 if retryable else 0, int(max_attempts), self.location, key, int(epoch)))
            if rows:
                return JobState(rows[0][0])
            now = self._fetchall(conn, self.q("SELECT state, epoch, attempts FROM jobs WHERE key = ?"), (key,))
            target = fail_target(int(now[0][2]) + 1, retryable, max_attempts) if now else None
            raise fenced_refusal(key, epoch, now[0][:2] if now else None, target)

        return self._run(record, write=True)

    def release(self, key: str, epoch: int) -> None:
        self._run(lambda conn: conn.execute(self.q(
            "UPDATE jobs SET state = 'planned', epoch = epoch + 1, lease_owner = NULL, lease_expires_at = NULL, "
            f"updated_at = cd_now() WHERE key = ? AND epoch = ? AND state IN {HELD_SQL}"), (key, int(epoch))), write=True)

    def reopen(self, key: str) -> None:
        self._run(lambda conn: conn.execute(self.q(
            "UPDATE jobs SET state = 'planned', updated_at = cd_now() WHERE key = ? AND state = 'finalized'"), (key,)), write=True)

    def requeue(self, key: str) -> bool:
        return bool(self._run(lambda conn: conn.execute(self.q(
            "UPDATE jobs SET state = 'planned', attempts = 0, updated_at = cd_now() "
            "WHERE key = ? AND state = 'failed'"), (key,)).rowcount, write=True))

    def requeue_failed(self) -> int:
        return int(self._run(lambda conn: conn.execute(
            "UPDATE jobs SET state = 'planned', attempts = 0, updated_at = cd_now() WHERE state = 'failed'").rowcount,
            write=True))

    def stats(self) -> dict:
        def read(conn: Any) -> dict:
            out = empty_stats()
            for location, state, n in self._fetchall(conn, "SELECT location, state, count(*) FROM jobs GROUP BY location, state"):
                out["by_state"][state] += int(n)
                count_location(out, location, state, int(n))
            out["total"] = sum(out["by_state"].values())
            expired, oldest = self._fetchall(conn, (
                f"SELECT count(*) FILTER (WHERE {self.expired_sql}), cd_now() - min(leased_at) "
                f"FROM jobs WHERE state IN {HELD_SQL}"))[0]
            out["expired_leases"] = int(expired or 0)
            out["oldest_in_flight_s"] = None if oldest is None else max(0.0, float(oldest))
            out["failures_by_reason"] = {
                reason or "unknown": int(n) for reason, n in self._fetchall(conn, (
                    "SELECT last_error, count(*) AS n FROM jobs WHERE state = 'failed' "
                    "GROUP BY last_error ORDER BY n DESC, last_error"))
            }
            return out

        return self._run(read, write=False)

    def records(self, state: JobState | str | None = None) -> Iterator[JobRecord]:
        wanted = None if state is None else JobState(state).value
        after = ""
        while True:
            if wanted is None:
                sql, params = f"SELECT {COLS} FROM jobs WHERE key > ? ORDER BY key LIMIT {PAGE}", (after,)
            else:
                sql, params = f"SELECT {COLS} FROM jobs WHERE state = ? AND key > ? ORDER BY key LIMIT {PAGE}", (wanted, after)
            rows = self._run(lambda conn: self._fetchall(conn, self.q(sql), params), write=False)
            for row in rows:
                yield row_to_record(row)
            if len(rows) < PAGE:
                return
            after = rows[-1][0]

    def lookup(self, *, keys: Iterable[str] = (), identities: Iterable[str] = (),
               names: Iterable[str] = ()) -> list[JobRecord]:
        found: dict[str, JobRecord] = {}
        for column, values in (("key", set(keys)), ("identity", set(identities)), ("name_fold", {n.casefold() for n in names})):
            ordered = sorted(values)
            for start in range(0, len(ordered), LOOKUP_CHUNK):
                chunk = ordered[start:start + LOOKUP_CHUNK]
                sql = self.q(f"SELECT {COLS} FROM jobs WHERE {column} IN ({', '.join('?' * len(chunk))})")
                for row in self._run(lambda conn: self._fetchall(conn, sql, chunk), write=False):
                    if row[0] not in found:
                        found[row[0]] = row_to_record(row)
        return [found[key] for key in sorted(found)]

    def count_active(self, keys: frozenset[str]) -> int:
        if not keys:
            self._check_open()
            return 0
        # Driven by the jobs_claim index on state: the cost follows the store's active jobs, not the run's keys.
        sql = self.q(f"SELECT count(*) FROM jobs WHERE state IN {ACTIVE_SQL} AND EXISTS "
                     "(SELECT 1 FROM claim_keys c WHERE c.set_id = ? AND c.key = jobs.key)")
        return int(self._run(lambda conn, keyset: self._fetchall(conn, sql, (keyset.set_id,))[0][0], write=False, keys=keys))

    # -- schema -----------------------------------------------------------------------

    def _apply_migration(self, conn: Any, version: int, statements: Sequence[str]) -> None:
        """Run one migration's statements in the open transaction, then fill what they added."""
        for statement in statements:
            conn.execute(statement)
        if version == LOOKUP_VERSION:
            self._fill_lookup_columns(conn)

    def _fill_lookup_columns(self, conn: Any) -> None:
        """Copy identity and folded name out of the payload of every existing job (migration 4)."""
        after = ""
        while True:
            rows = self._fetchall(conn, self.q(f"SELECT key, payload FROM jobs WHERE key > ? ORDER BY key LIMIT {PAGE}"), (after,))
            updates = [(*lookup_columns(loads(payload)), key) for key, payload in rows]
            if updates:
                conn.cursor().executemany(self.q("UPDATE jobs SET identity = ?, name_fold = ? WHERE key = ?"), updates)
            if len(rows) < PAGE:
                return
            after = rows[-1][0]

    # -- the operation ledger ---------------------------------------------------------

    def op_begin(self, op_key: str, job_key: str, kind: str, epoch: int) -> str:
        return self._run(lambda conn: self._begin_op(conn, op_key, job_key, kind, epoch), write=True, durable=False)

    def _begin_op(self, conn: Any, op_key: str, job_key: str, kind: str, epoch: int, status: str | None = None) -> str:
        """:meth:`op_begin` on ``conn``; ``status``: the operation's, when the caller has read it (locked) already."""
        if status is None:
            inserted = self._fetchall(conn, self.q(
                "INSERT INTO operations (op_key, job_key, kind, status, epoch, created_at, updated_at) "
                "VALUES (?, ?, ?, 'pending', ?, cd_now(), cd_now()) ON CONFLICT (op_key) DO NOTHING RETURNING op_key"),
                (op_key, job_key, kind, int(epoch)))
            if inserted:
                return "new"
            rows = self._fetchall(conn, self.q(f"SELECT status FROM operations WHERE op_key = ?{self.for_update}"), (op_key,))
            status = rows[0][0]
        if status in ("pending", "failed"):
            conn.execute(self.q(
                "UPDATE operations SET status = 'pending', epoch = ?, updated_at = cd_now() WHERE op_key = ?"),
                (int(epoch), op_key))
        return status

    def op_begin_many(self, ops: Sequence[tuple[str, str, str, int]]) -> list[str]:
        """The statuses of all ``ops`` read in one statement per chunk (locked, in key order), then only the
        operations not on record inserted one by one: a rerun's ops, all done, cost no statement each."""
        def begin(conn: Any) -> list[str]:
            known = self._op_statuses(conn, sorted({op[0] for op in ops}))
            statuses = []
            for op_key, job_key, kind, epoch in ops:
                status = self._begin_op(conn, op_key, job_key, kind, epoch, known.get(op_key))
                known[op_key] = "done" if status == "done" else "pending"
                statuses.append(status)
            return statuses

        return self._run(begin, write=True, durable=False) if ops else []

    def _op_statuses(self, conn: Any, op_keys: Sequence[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        for start in range(0, len(op_keys), LOOKUP_CHUNK):
            chunk = op_keys[start:start + LOOKUP_CHUNK]
            sql = self.q(f"SELECT op_key, status FROM operations WHERE op_key IN ({', '.join('?' * len(chunk))}){self.for_update}")
            found.update((op_key, status) for op_key, status in self._fetchall(conn, sql, chunk))
        return found

    def _op_set(self, op_key: str, sql: str, params: tuple) -> None:
        def update(conn: Any) -> None:
            if conn.execute(self.q(sql), params).rowcount == 0:
                raise UnknownOperationError(f"unknown operation {op_key!r}: op_begin first")

        self._run(update, write=True)

    def op_done(self, op_key: str, result: dict | None = None) -> None:
        self._op_set(op_key, "UPDATE operations SET status = 'done', result = ?, error = NULL, updated_at = cd_now() "
                     "WHERE op_key = ?", (dumps(result), op_key))

    def op_failed(self, op_key: str, error: str) -> None:
        self._op_set(op_key, "UPDATE operations SET status = 'failed', error = ?, updated_at = cd_now() "
                     "WHERE op_key = ?", (str(error), op_key))

    def op_get(self, op_key: str) -> dict | None:
        rows = self._run(lambda conn: self._fetchall(conn, self.q(
            "SELECT status, kind, job_key, result, epoch, updated_at, error FROM operations WHERE op_key = ?"),
            (op_key,)), write=False)
        if not rows:
            return None
        status, kind, job_key, result, epoch, updated_at, error = rows[0]
        return {"status": status, "kind": kind, "job_key": job_key, "result": loads(result), "epoch": int(epoch),
                "updated_at": float(updated_at), "error": error}


@contextmanager
def translated(fn: Callable[[BaseException], BaseException | None]) -> Iterator[None]:
    """Raise driver errors as store errors (used outside :meth:`SqlJobStore._run`, e.g. while opening)."""
    try:
        yield
    except (StoreError, IllegalTransition, LeaseLostError):
        raise
    except Exception as exc:
        mapped = fn(exc)
        if mapped is None:
            raise
        raise mapped from exc
