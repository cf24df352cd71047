"""The SQLite job store: one file, many threads and processes on one machine.

Every connection runs in WAL mode with a 30 s busy timeout, foreign keys on and
``synchronous=NORMAL`` (a committed transaction survives a crash of the process; WAL
keeps readers and the writer out of each other's way). Each thread has its own
connection. Writes, claims included, run in ``BEGIN IMMEDIATE`` transactions: the
write lock is taken up front, so two claimers can never pick the same job and a
transaction never has to be retried halfway. Times are this machine's clock.

Leases are measured on the machine's steady clock (:mod:`contentdownload.clock`), never
stepped, so a wall-clock jump neither expires nor prolongs one; each lease records the
boot it was taken in, and a lease of another boot counts as expired (the machine
restarted: its holder is gone). A lease without a boot id (written before the store had
these columns, or where the system does not tell its boot id) is measured on the wall clock.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from contentdownload.errors import DamagedStoreError, DiskError, DiskFullError, DiskIOError, IllegalTransition, ReadOnlyError, StoreError
from contentdownload.store.base import PLANNED_SQL, SqlJobStore, UnknownJobError, translated
from contentdownload.store.schema import SCHEMA_VERSION, SQLITE, TABLES, TRANSITION_ERROR, columns, check_transition_table, pending, version_table

BUSY_TIMEOUT_S = 30.0
#: Seconds between tries while another process of this machine has the store's write turn.
TURN_POLL_S = 0.0005
#: How long a writer waits for its turn before it goes on to SQLite's own lock (at most the busy timeout).
TURN_TIMEOUT_S = 5.0
#: The poll once a turn has been waited for this long (a long transaction, or a stopped process).
TURN_SLOW_POLL_S, TURN_SLOW_AFTER_S = 0.005, 0.05


def disk_error(exc: sqlite3.Error, folder: Path) -> DiskError | None:
    """The full or read-only disk behind a SQLite error in ``folder`` (SQLite names no errno: the filesystem is asked)."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    if name == "SQLITE_FULL":
        return DiskFullError(errno.ENOSPC, f"no space left for the job store ({exc})", str(folder))
    if not name.startswith(("SQLITE_READONLY", "SQLITE_IOERR", "SQLITE_CANTOPEN")):
        return None
    try:
        fs = os.statvfs(folder)
    except OSError:
        return None
    if fs.f_flag & os.ST_RDONLY:
        return ReadOnlyError(errno.EROFS, f"the job store's filesystem is read-only ({exc})", str(folder))
    if fs.f_bavail == 0:
        return DiskFullError(errno.ENOSPC, f"no space left for the job store ({exc})", str(folder))
    if name.startswith("SQLITE_IOERR"):
        return DiskIOError(errno.EIO, f"the job store's disk reported an I/O error ({exc})", str(folder))
    return None


def translate(exc: BaseException, folder: Path | None = None) -> BaseException | None:
    """The store error (or, for a full or read-only ``folder``, the disk error) a SQLite error stands for."""
    if not isinstance(exc, sqlite3.Error):
        return None
    disk = disk_error(exc, folder) if folder is not None else None
    if disk is not None:
        return disk
    text = str(exc)
    if isinstance(exc, sqlite3.IntegrityError):
        if TRANSITION_ERROR in text:
            return IllegalTransition(f"{TRANSITION_ERROR} refused by the database: {text}")
        if "FOREIGN KEY" in text:
            return UnknownJobError(f"unknown job key (the job was never planned in this store): {text}")
    if isinstance(exc, sqlite3.OperationalError) and "locked" in text:
        return StoreError(f"the SQLite job store is locked by another connection (waited up to {BUSY_TIMEOUT_S:.0f} s): {text}")
    return StoreError(f"SQLite job store error: {type(exc).__name__}: {text}")


def parse_sqlite_url(url: str) -> Path:
    """``sqlite:///abs/path.db``, ``sqlite:////abs/path.db`` or ``sqlite:relative.db`` -> a path."""
    rest = url[len("sqlite:"):]
    if rest.startswith("//"):
        rest = "/" + rest.lstrip("/")
    return Path(rest)


#: RETURNING (3.35), upserts (3.24) and aggregate FILTER clauses (3.30)
MIN_SQLITE = (3, 35, 0)


class _Local(threading.local):
    conn: sqlite3.Connection | None = None
    keysets: dict | None = None
    pid: int = 0
    writing: bool = False  # inside a write transaction: on the process's writer connection


class _Writer:
    """The connection every write transaction of this process runs on, one at a time (under the write lock).

    One connection for the writes keeps SQLite's page cache warm: a connection finds the
    pages another connection changed stale and reads them again, so writes spread over
    every thread's connection read the same pages over and over.
    """

    def __init__(self) -> None:
        self.conn: sqlite3.Connection | None = None
        self.keysets: dict = {}
        self.pid = 0


class _WriteTurns:
    """The store's write turn among this machine's processes: an exclusive ``flock`` on ``DB-writer`` beside the database.

    SQLite's busy handler waits for the write lock by sleeping 1, 2, 5, 10, ... 100 ms, so
    with several processes writing, its sleeps, not the writes, set the pace. Writers of
    different processes take turns here instead, trying again every :data:`TURN_POLL_S`.
    After ``timeout`` seconds the writer goes on to SQLite's own lock and its busy timeout,
    so a stopped process holding the turn slows the others down, never blocks them. Where
    the file cannot be opened (a read-only folder), writers go straight to SQLite's lock.
    """

    def __init__(self, path: Path, timeout: float):
        self.path, self.timeout = path, timeout
        self._fd: int | None = None
        self._pid = 0
        self._in_use = False  # a writer is between taking and giving back the turn (one at a time: the store's write lock)
        self._closed = False
        self._guard = threading.Lock()

    @contextmanager
    def taken(self) -> Iterator[None]:
        """Hold the turn (callers of one process take turns on a lock of their own first)."""
        with self._guard:
            fd = self._file()
            self._in_use = fd is not None
        got = fd is not None and self._wait(fd)
        try:
            yield
        finally:
            if got:
                fcntl.flock(fd, fcntl.LOCK_UN)
            with self._guard:
                self._in_use = False
                if self._closed:  # the store was closed meanwhile: the file is closed once the turn is given back
                    self._close_fd()

    def _file(self) -> int | None:
        if self._closed:
            return None
        if self._pid != os.getpid():  # a forked child opens its own: a lock on the parent's open file would be shared
            self._close_fd()
            self._pid = os.getpid()
            try:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError:
                pass
        return self._fd

    def _wait(self, fd: int) -> bool:
        started = time.monotonic()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                waited = time.monotonic() - started
                if waited >= self.timeout:
                    return False
                time.sleep(TURN_POLL_S if waited < TURN_SLOW_AFTER_S else TURN_SLOW_POLL_S)
            except OSError:
                return False

    def close(self) -> None:
        """No more turns; the file is closed now, or by the writer holding the turn when it gives it back."""
        with self._guard:
            self._closed = True
            if not self._in_use:
                self._close_fd()

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


class SQLiteStore(SqlJobStore):
    """A job store in one SQLite file (WAL). Safe for many threads and processes on one machine."""

    def pick_among_sql(self, limit: str = "1") -> str:
        # CROSS JOIN keeps the key set as the outer loop: one primary-key probe into jobs per key.
        return ("SELECT c.key FROM claim_keys c CROSS JOIN jobs ON jobs.key = c.key "
                f"WHERE c.set_id = ? AND c.key > ? AND {PLANNED_SQL} "
                f"ORDER BY c.key LIMIT {limit}")

    lease_sql = ("lease_expires_at = cd_now() + ?, lease_boot_id = cd_boot(), "
                 "lease_boot_deadline = cd_steady() + ?")
    expired_sql = ("(CASE WHEN lease_boot_id IS NULL THEN lease_expires_at < cd_now() "
                   "WHEN lease_boot_id = cd_boot() THEN lease_boot_deadline < cd_steady() ELSE 1 END)")

    def _ttl(self, ttl: float) -> tuple[float, ...]:
        return (float(ttl), float(ttl))  # the wall-clock end (for people to read) and the steady one

    def __init__(self, path: str | Path, *, busy_timeout: float = BUSY_TIMEOUT_S, turn_timeout: float | None = None, **retry: Any):
        """``busy_timeout``: how long SQLite waits for its write lock; ``turn_timeout`` (default: :data:`TURN_TIMEOUT_S`,
        at most the busy timeout) how long a writer waits for its turn among this machine's processes first
        (see :class:`_WriteTurns`)."""
        super().__init__(**retry)
        self.path = Path(path)
        self.url = f"sqlite://{self.path}" if self.path.is_absolute() else f"sqlite:{self.path}"
        self.busy_timeout = busy_timeout
        real = Path(os.path.realpath(self.path))  # beside the file SQLite opens, whatever symlink or relative path names it
        self._turns = _WriteTurns(real.with_name(real.name + "-writer"),
                                  min(busy_timeout, TURN_TIMEOUT_S) if turn_timeout is None else turn_timeout)
        self._local = _Local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._writer = _Writer()
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            raise StoreError(f"the SQLite job store needs SQLite {'.'.join(map(str, MIN_SQLITE))} or newer; "
                             f"this Python has {sqlite3.sqlite_version}")
        if str(self.path) in ("", ":memory:"):
            raise StoreError("an in-memory SQLite database cannot be shared between threads; use 'memory:'")
        if not self.path.parent.is_dir():
            raise StoreError(f"cannot open the job store {self.url}: folder {self.path.parent} does not exist")
        self._set_aside_stale_journal()
        try:
            with translated(self._translate):
                self._migrate()
        except StoreError as exc:
            if isinstance(exc.__cause__, sqlite3.DatabaseError) and not isinstance(exc.__cause__, sqlite3.OperationalError):
                self.close()
                raise DamagedStoreError(f"the job store {self.path} is damaged ({exc.__cause__})") from None
            raise

    def _set_aside_stale_journal(self) -> None:
        """A write-ahead log left beside a deleted or emptied database belongs to the old one, and SQLite would
        reset it when the new file is opened: it is kept, renamed (``-wal.stale-<time>``), with its ``-shm``."""
        try:
            empty = self.path.stat().st_size == 0
        except FileNotFoundError:
            empty = True
        wal = self.path.with_name(self.path.name + "-wal")
        if empty and wal.is_file() and wal.stat().st_size > 0:
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            for suffix in ("-wal", "-shm"):
                old = self.path.with_name(self.path.name + suffix)
                if old.exists():
                    os.replace(old, old.with_name(f"{old.name}.stale-{stamp}"))

    # -- connections ------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(str(self.path), timeout=self.busy_timeout, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            mode = self._wal(conn)
            if str(mode).lower() != "wal":
                raise StoreError(f"cannot switch the job store {self.url} to WAL mode (it is in {mode!r} mode)")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.create_function("cd_now", 0, self.clock.wall)
            conn.create_function("cd_steady", 0, self.clock.steady)
            conn.create_function("cd_boot", 0, self.clock.boot_id)
        except BaseException:
            conn.close()
            raise
        with self._all_lock:
            self._all.append(conn)
        return conn

    def _wal(self, conn: sqlite3.Connection) -> str:
        """Switch to WAL (once per file: the mode is persistent). Switching a new file while another
        process does the same can fail at once with "locked" instead of waiting: retry until the busy timeout."""
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
                if str(mode).lower() != "wal":
                    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                return str(mode)
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def _writer_conn(self) -> sqlite3.Connection:
        writer = self._writer
        if writer.conn is None or writer.pid != os.getpid():  # a forked child never reuses its parent's connection
            writer.conn, writer.keysets, writer.pid = self._connect(), {}, os.getpid()
        return writer.conn

    def _thread_conn(self) -> sqlite3.Connection:
        if self._local.writing:
            return self._writer_conn()
        conn = self._local.conn
        if conn is None or self._local.pid != os.getpid():  # a forked child never reuses its parent's connection
            conn = self._connect()
            self._local.conn = conn
            self._local.keysets = {}
            self._local.pid = os.getpid()
        return conn

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        yield self._thread_conn()

    def _run(self, fn: Any, *, write: bool, keys: Any = None, durable: bool = True) -> Any:
        """Write transactions of this process's threads queue on a lock of ours.

        SQLite's busy handler waits for a lock by sleeping 1, 2, 5, 10, 25... ms; with
        several worker threads that sleep, not the work, would set the pace. Threads of
        one process take turns here instead, and processes on the write turn's file
        (:class:`_WriteTurns`).
        """
        if not write or self._open_batch() is not None:  # a batch holds the lock already
            return super()._run(fn, write=write, keys=keys, durable=durable)
        with self._write_lock, self._turns.taken():
            self._local.writing = True
            try:
                return super()._run(fn, write=True, keys=keys, durable=durable)
            finally:
                self._local.writing = False

    def _begin(self, conn: sqlite3.Connection, write: bool) -> None:
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")

    def _commit(self, conn: sqlite3.Connection) -> None:
        conn.execute("COMMIT")

    def _rollback(self, conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def _in_transaction(self, conn: sqlite3.Connection) -> bool:
        return conn.in_transaction

    def _translate(self, exc: BaseException) -> BaseException | None:
        return translate(exc, self.path.parent)

    def _transient(self, exc: BaseException) -> bool:
        """Another process holds the write lock past the busy timeout: wait longer (other errors are permanent)."""
        return isinstance(exc, sqlite3.OperationalError) and ("locked" in str(exc) or "busy" in str(exc))

    def close(self) -> None:
        self._closed = True
        self._turns.close()
        with self._all_lock:
            conns, self._all = self._all, []
        for conn in conns:
            try:
                conn.close()
            except sqlite3.Error:
                pass
        self._local = _Local()
        self._writer = _Writer()

    # -- schema -----------------------------------------------------------------------

    def _version(self, conn: sqlite3.Connection) -> int:
        exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'").fetchone()
        if not exists:
            return 0
        return int(conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0])

    def _migrate(self) -> None:
        conn = self._thread_conn()
        if self._version(conn) != SCHEMA_VERSION:  # the usual case skips the write lock
            conn.execute("BEGIN IMMEDIATE")  # one process migrates; the others wait, then see it done
            try:
                self.created = self._version(conn) == 0
                conn.execute(version_table(SQLITE))
                for version, statements in pending(SQLITE, self._version(conn), self.url):
                    self._apply_migration(conn, version, statements)
                    conn.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (version, time.time()))
                conn.execute("COMMIT")
            except BaseException:
                self._rollback(conn)
                raise
        self._check_tables(conn)
        found = {(a, b) for a, b in conn.execute("SELECT from_state, to_state FROM job_transitions")}
        check_transition_table(found, self.url)

    def _check_tables(self, conn: sqlite3.Connection) -> None:
        """Every table and column of the schema is there (a store with its version but not its tables is damaged)."""
        for table in TABLES:
            found = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
            missing = [name for name, _, _ in columns(table) if name not in found]
            if missing:
                self.close()
                what = f"table {table} is missing" if not found else f"table {table} lacks {', '.join(missing)}"
                raise DamagedStoreError(f"the job store {self.path} is damaged ({what})")

    def schema_version(self) -> int:
        return self._run(self._version, write=False)

    # -- SQLite specifics -------------------------------------------------------------

    def _insert_planned(self, conn: sqlite3.Connection, rows: list[tuple[str, str, str, str | None, str | None]]) -> int:
        before = conn.total_changes
        now = self.clock.wall()
        conn.executemany(
            "INSERT OR IGNORE INTO jobs (key, scheme, state, payload, identity, name_fold, location, created_at, updated_at) "
            "VALUES (?, ?, 'planned', ?, ?, ?, ?, ?, ?)",
            [(*row, self.location, now, now) for row in rows],
        )
        return conn.total_changes - before

    def _keyset_cache(self, conn: sqlite3.Connection) -> dict:
        if conn is self._writer.conn:
            return self._writer.keysets
        if self._local.keysets is None:
            self._local.keysets = {}
        return self._local.keysets

    def _load_keyset(self, conn: sqlite3.Connection, set_id: int, keys: frozenset[str], evict: list[int]) -> None:
        conn.execute("BEGIN")  # the temp database only: no lock on the store
        try:
            self._fill_keyset(conn, set_id, keys, evict)
            conn.execute("COMMIT")
        except BaseException:
            self._rollback(conn)
            raise

    def _fill_keyset(self, conn: sqlite3.Connection, set_id: int, keys: frozenset[str], evict: list[int]) -> None:
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS claim_keys (set_id INTEGER NOT NULL, key TEXT NOT NULL, "
                     "PRIMARY KEY (set_id, key)) WITHOUT ROWID")
        for old in evict:
            conn.execute("DELETE FROM temp.claim_keys WHERE set_id = ?", (old,))
        conn.executemany("INSERT OR IGNORE INTO temp.claim_keys (set_id, key) VALUES (?, ?)", ((set_id, k) for k in keys))
