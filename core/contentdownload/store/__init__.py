"""The job store: jobs, leases with fencing epochs, and the operation ledger.

``open_store(url)`` picks the backend from the URL:

- ``sqlite:///abs/path/jobs.db`` (also ``sqlite:////abs/...``) or ``sqlite:relative/jobs.db``:
  :class:`~contentdownload.store.sqlite.SQLiteStore`, the default (a file in the output
  folder's hidden subfolder);
- ``postgresql://user:pass@host:port/db`` or ``postgres://...``:
  :class:`~contentdownload.store.postgres.PostgresStore`, for many machines;
- ``memory:``: :class:`~contentdownload.store.memory.MemoryStore`, nothing persisted.

The database drivers are imported when a store of their kind is opened.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from contentdownload.clock import Clock
from contentdownload.errors import IllegalTransition, LeaseLostError, StoreError, UsageError
from contentdownload.store.base import (
    Claim,
    JobRecord,
    JobState,
    JobStore,
    PlannedJob,
    SchemaVersionError,
    UnknownJobError,
    UnknownOperationError,
)
from contentdownload.store.transitions import TRANSITIONS, check_transition

if TYPE_CHECKING:
    from contentdownload.store.memory import MemoryStore
    from contentdownload.store.postgres import PostgresStore
    from contentdownload.store.sqlite import SQLiteStore

__all__ = [
    "Claim",
    "JobRecord",
    "JobState",
    "JobStore",
    "PlannedJob",
    "TRANSITIONS",
    "check_transition",
    "open_store",
    "MemoryStore",
    "PostgresStore",
    "SQLiteStore",
    "IllegalTransition",
    "LeaseLostError",
    "StoreError",
    "SchemaVersionError",
    "UnknownJobError",
    "UnknownOperationError",
]


def open_store(url: str, *, retry_s: float | None = None, clock: Clock | None = None) -> JobStore:
    """Open (creating or migrating its schema if needed) the job store at ``url``.

    ``retry_s``: how long a store call keeps retrying while the database is unreachable
    (default :data:`~contentdownload.store.base.STORE_RETRY_S`). ``clock``: the clocks the
    SQLite and memory stores measure leases with (default the system's; PostgreSQL measures
    them on the database's clock).
    """
    retry: dict[str, Any] = {} if retry_s is None else {"retry_s": retry_s}
    local = {} if clock is None else {"clock": clock}
    text = str(url).strip()
    scheme = text.split(":", 1)[0].lower() if ":" in text else ""
    if scheme == "memory":
        from contentdownload.store.memory import MemoryStore

        return MemoryStore(text, **local)
    if scheme == "sqlite":
        from contentdownload.store.sqlite import SQLiteStore, parse_sqlite_url

        path = parse_sqlite_url(text)
        if str(path) in ("", ".", ":memory:"):
            raise UsageError(f"bad job store URL {text!r}: give a file, e.g. sqlite:///path/to/jobs.db (or 'memory:')")
        if not path.parent.is_dir():
            raise UsageError(f"bad job store URL {text!r}: folder {path.parent} does not exist")
        return SQLiteStore(path, **retry, **local)
    if scheme in ("postgresql", "postgres"):
        from contentdownload.store.postgres import PostgresStore

        return PostgresStore(text, **retry)
    raise UsageError(f"unknown job store URL {text!r}: use sqlite:///path/jobs.db, postgresql://host/db or memory:")


def __getattr__(name: str):
    if name == "MemoryStore":
        from contentdownload.store.memory import MemoryStore

        return MemoryStore
    if name == "SQLiteStore":
        from contentdownload.store.sqlite import SQLiteStore

        return SQLiteStore
    if name == "PostgresStore":
        from contentdownload.store.postgres import PostgresStore

        return PostgresStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
