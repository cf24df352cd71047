"""The in-memory job store: the same contract as the databases, for one process and no file.

Used when the persistent store is switched off: state lasts as long as the process.
Every method takes one lock, so the store is safe to share between worker threads; a
batch (:meth:`MemoryStore.batched`) holds it throughout, and undoes what it changed when it fails.
Leases are measured on the steady clock (:mod:`contentdownload.clock`), times recorded on the wall clock.
"""

from __future__ import annotations

import copy
import threading
from typing import Any, Callable, Collection, Iterable, Iterator, Sequence, TypeVar

from contentdownload.clock import SYSTEM_CLOCK, Clock
from contentdownload.errors import StoreError
from contentdownload.store import transitions
from contentdownload.store.base import (
    Claim,
    JobRecord,
    JobState,
    JobStore,
    PlannedJob,
    UnknownJobError,
    UnknownOperationError,
    dumps,
    count_location,
    empty_stats,
    fail_target,
    fenced_refusal,
    loads,
    lookup_columns,
)

P, L, S, F, X = JobState.PLANNED, JobState.LEASED, JobState.STREAMING, JobState.FINALIZED, JobState.FAILED
T = TypeVar("T")


class MemoryStore(JobStore):
    """Jobs and the ledger in dictionaries, behind one lock."""

    def __init__(self, url: str = "memory:", *, clock: Clock = SYSTEM_CLOCK):
        self.url = url
        self.clock = clock
        self._lock = threading.RLock()
        self._jobs: dict[str, dict[str, Any]] = {}
        self._planned: dict[str, None] = {}  # planned keys in planning order (a claim takes the first)
        self._held: dict[str, None] = {}  # leased or streaming keys
        self._by_ref: dict[tuple[str, str], set[str]] = {}  # ("identity" | "name", value) -> keys
        self._ops: dict[str, dict[str, Any]] = {}
        self._closed = False
        #: while a batch runs: each job and operation it touched, as it was before (``None``: absent)
        self._undo: dict[tuple[str, str], dict[str, Any] | None] | None = None

    # -- internals --------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"the job store {self.url} is closed")

    def _job(self, key: str) -> dict[str, Any] | None:
        self._check_open()
        row = self._jobs.get(key)
        self._keep("jobs", key, row)
        return row

    def _keep(self, table: str, key: str, entry: dict[str, Any] | None) -> None:
        """Inside a batch: remember a job's (``jobs``) or operation's (``ops``) entry before its first change."""
        if self._undo is not None and (table, key) not in self._undo:
            self._undo[(table, key)] = None if entry is None else dict(entry)

    def _undo_batch(self, undo: dict[tuple[str, str], dict[str, Any] | None]) -> None:
        """Put back every job and operation a failed batch touched (a job put back planned is claimed after the others)."""
        for (table, key), before in undo.items():
            if table == "ops":
                if before is None:
                    self._ops.pop(key, None)
                else:
                    self._ops[key] = before
                continue
            self._planned.pop(key, None)
            self._held.pop(key, None)
            now = self._jobs.pop(key, None)
            if before is None:
                if now is not None:
                    self._index(key, loads(now["payload"]), add=False)
                continue
            self._jobs[key] = before
            if before["state"] is P:
                self._planned[key] = None
            elif before["state"] in transitions.HELD:
                self._held[key] = None

    def _index(self, key: str, payload: dict, *, add: bool) -> None:
        """Add the job to (or take it out of) the lookups by content identity and output name."""
        identity, name_fold = lookup_columns(payload)
        for ref in (("identity", identity), ("name", name_fold)):
            if ref[1] is not None:
                if add:
                    self._by_ref.setdefault(ref, set()).add(key)
                else:
                    self._by_ref.get(ref, set()).discard(key)

    def _set_state(self, row: dict[str, Any], new: JobState) -> None:
        transitions.check_transition(row["state"], new)
        key = row["key"]
        self._planned.pop(key, None)
        self._held.pop(key, None)
        if new is P:
            self._planned[key] = None
        elif new in transitions.HELD:
            self._held[key] = None
        row["state"] = new

    @staticmethod
    def _record(row: dict[str, Any]) -> JobRecord:
        return JobRecord(
            key=row["key"], scheme=row["scheme"], state=row["state"], payload=loads(row["payload"]),
            attempts=row["attempts"], claims=row["claims"], epoch=row["epoch"], lease_owner=row["lease_owner"],
            lease_expires_at=row["lease_expires_at"], etag=row["etag"], last_modified=row["last_modified"],
            size=row["size"], sha256=row["sha256"], path=row["path"], final_url=row["final_url"],
            content_type=row["content_type"], mtime_ns=row["mtime_ns"], last_error=row["last_error"],
            updated_at=row["updated_at"], location=row["location"],
        )

    def _take(self, row: dict[str, Any], owner: str, ttl: float) -> Claim:
        self._keep("jobs", row["key"], row)
        self._set_state(row, L)
        row.update(epoch=row["epoch"] + 1, claims=row["claims"] + 1, lease_owner=owner, leased_at=self.clock.wall())
        self._extend(row, ttl)
        return Claim(key=row["key"], epoch=row["epoch"], owner=owner, record=self._record(row))

    def _extend(self, row: dict[str, Any], ttl: float) -> None:
        """The lease ends ``ttl`` from now on the steady clock (and, for people to read, on the wall clock)."""
        now = self.clock.wall()
        row.update(lease_expires_at=now + float(ttl), lease_deadline=self.clock.steady() + float(ttl), updated_at=now)

    def _expired(self, row: dict[str, Any]) -> bool:
        return row["lease_expires_at"] is not None and row["lease_deadline"] < self.clock.steady()

    def _held_row(self, key: str, epoch: int, target: JobState | None) -> dict[str, Any]:
        """The row, when ``epoch`` holds its lease; otherwise the same refusal the databases give."""
        row = self._job(key)
        if row is None or row["epoch"] != epoch or row["state"] not in transitions.HELD:
            raise fenced_refusal(key, epoch, None if row is None else (row["state"].value, row["epoch"]), target)
        return row

    # -- jobs -------------------------------------------------------------------------

    def plan(self, jobs: Sequence[PlannedJob]) -> int:
        with self._lock:
            self._check_open()
            now, added = self.clock.wall(), 0
            for job in jobs:
                if job.key in self._jobs:
                    continue
                self._jobs[job.key] = {
                    "key": job.key, "scheme": job.scheme, "state": P, "payload": dumps(job.payload or {}),
                    "attempts": 0, "claims": 0, "epoch": 0, "lease_owner": None, "lease_expires_at": None,
                    "lease_deadline": None, "leased_at": None, "etag": None, "last_modified": None, "size": None, "sha256": None,
                    "path": None, "final_url": None, "content_type": None, "mtime_ns": None, "last_error": None,
                    "updated_at": now, "location": self.location,
                }
                self._keep("jobs", job.key, None)
                self._planned[job.key] = None
                self._index(job.key, job.payload, add=True)
                added += 1
            return added

    def get(self, key: str) -> JobRecord | None:
        with self._lock:
            row = self._job(key)
            return None if row is None else self._record(row)

    def claim(self, owner: str, ttl: float, keys: Collection[str] | None = None) -> Claim | None:
        wanted = None if keys is None else (keys if isinstance(keys, (set, frozenset, dict)) else frozenset(keys))
        with self._lock:
            self._check_open()
            if wanted is not None and len(wanted) < len(self._planned):
                candidates = (k for k in wanted if k in self._planned)
            else:
                candidates = (k for k in self._planned if wanted is None or k in wanted)
            for key in self._held:  # an expired lease first, then planned jobs
                row = self._jobs[key]
                if self._expired(row) and (wanted is None or key in wanted):
                    return self._take(row, owner, ttl)
            for key in candidates:
                return self._take(self._jobs[key], owner, ttl)
            return None

    def claim_key(self, key: str, owner: str, ttl: float) -> Claim | None:
        with self._lock:
            row = self._job(key)
            if row is None:
                return None
            if row["state"] is P or (row["state"] in transitions.HELD and self._expired(row)):
                return self._take(row, owner, ttl)
            return None

    def heartbeat(self, key: str, epoch: int, ttl: float) -> None:
        with self._lock:
            self._extend(self._held_row(key, epoch, None), ttl)

    def mark_streaming(self, key: str, epoch: int) -> None:
        with self._lock:
            row = self._held_row(key, epoch, S)
            if row["state"] is L:
                self._set_state(row, S)
                row["updated_at"] = self.clock.wall()

    def finish(self, key: str, epoch: int, *, path: str, size: int, sha256: str, etag: str | None = None,
               last_modified: str | None = None, final_url: str | None = None, content_type: str | None = None,
               mtime_ns: int | None = None) -> None:
        with self._lock:
            row = self._held_row(key, epoch, F)
            self._set_state(row, F)
            row.update(path=str(path), size=None if size is None else int(size), sha256=sha256, etag=etag,
                       last_modified=last_modified, final_url=final_url, content_type=content_type,
                       mtime_ns=None if mtime_ns is None else int(mtime_ns), lease_owner=None,
                       lease_expires_at=None, updated_at=self.clock.wall(), location=self.location or row["location"])

    def fail(self, key: str, epoch: int, error: str, *, retryable: bool, max_attempts: int) -> JobState:
        with self._lock:
            row = self._job(key)
            target = None if row is None else fail_target(row["attempts"] + 1, retryable, max_attempts)
            row = self._held_row(key, epoch, target)
            self._set_state(row, target)
            row.update(attempts=row["attempts"] + 1, last_error=str(error), lease_owner=None,
                       lease_expires_at=None, updated_at=self.clock.wall(), location=self.location or row["location"])
            return target

    def release(self, key: str, epoch: int) -> None:
        with self._lock:
            row = self._job(key)
            if row is None or row["epoch"] != epoch or row["state"] not in transitions.HELD:
                return
            self._set_state(row, P)
            row.update(epoch=row["epoch"] + 1, lease_owner=None, lease_expires_at=None, updated_at=self.clock.wall())

    def reopen(self, key: str) -> None:
        with self._lock:
            row = self._job(key)
            if row is not None and row["state"] is F:
                self._set_state(row, P)
                row["updated_at"] = self.clock.wall()

    def requeue(self, key: str) -> bool:
        with self._lock:
            row = self._job(key)
            if row is None or row["state"] is not X:
                return False
            self._set_state(row, P)
            row.update(attempts=0, updated_at=self.clock.wall())
            return True

    def requeue_failed(self) -> int:
        with self._lock:
            self._check_open()
            failed = [key for key, row in self._jobs.items() if row["state"] is X]
            for key in failed:
                self.requeue(key)
            return len(failed)

    def stats(self) -> dict:
        with self._lock:
            self._check_open()
            out = empty_stats()
            now = self.clock.wall()
            oldest = None
            reasons: dict[str, int] = {}
            for row in self._jobs.values():
                out["by_state"][row["state"].value] += 1
                count_location(out, row["location"], row["state"].value, 1)
                if row["state"] in transitions.HELD:
                    if self._expired(row):
                        out["expired_leases"] += 1
                    if row["leased_at"] is not None and (oldest is None or row["leased_at"] < oldest):
                        oldest = row["leased_at"]
                elif row["state"] is X:
                    reason = row["last_error"] or "unknown"
                    reasons[reason] = reasons.get(reason, 0) + 1
            out["total"] = len(self._jobs)
            out["oldest_in_flight_s"] = None if oldest is None else max(0.0, now - oldest)
            out["failures_by_reason"] = dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
            return out

    def records(self, state: JobState | str | None = None) -> Iterator[JobRecord]:
        wanted = None if state is None else JobState(state)
        with self._lock:
            self._check_open()
            snapshot = [self._record(row) for key, row in sorted(self._jobs.items())
                        if wanted is None or row["state"] is wanted]
        return iter(snapshot)

    def lookup(self, *, keys: Iterable[str] = (), identities: Iterable[str] = (),
               names: Iterable[str] = ()) -> list[JobRecord]:
        with self._lock:
            self._check_open()
            found = {key for key in keys if key in self._jobs}
            for ref in [*(("identity", i) for i in identities), *(("name", n.casefold()) for n in names)]:
                found |= self._by_ref.get(ref, set())
            return [self._record(self._jobs[key]) for key in sorted(found)]

    def count_active(self, keys: frozenset[str]) -> int:
        with self._lock:
            self._check_open()
            return sum(1 for active in (self._planned, self._held) for key in active if key in keys)

    # -- the operation ledger ---------------------------------------------------------

    def op_begin(self, op_key: str, job_key: str, kind: str, epoch: int) -> str:
        with self._lock:
            self._check_open()
            op = self._ops.get(op_key)
            self._keep("ops", op_key, op)
            now = self.clock.wall()
            if op is None:
                if job_key not in self._jobs:
                    raise UnknownJobError(f"unknown job key (the job was never planned in this store): {job_key!r}")
                self._ops[op_key] = {"status": "pending", "kind": kind, "job_key": job_key, "result": None,
                                     "epoch": int(epoch), "updated_at": now, "error": None}
                return "new"
            status = op["status"]
            if status in ("pending", "failed"):
                op.update(status="pending", epoch=int(epoch), updated_at=now)
            return status

    def _op(self, op_key: str) -> dict[str, Any]:
        self._check_open()
        op = self._ops.get(op_key)
        self._keep("ops", op_key, op)
        if op is None:
            raise UnknownOperationError(f"unknown operation {op_key!r}: op_begin first")
        return op

    def op_done(self, op_key: str, result: dict | None = None) -> None:
        with self._lock:
            self._op(op_key).update(status="done", result=dumps(result), error=None, updated_at=self.clock.wall())

    def op_failed(self, op_key: str, error: str) -> None:
        with self._lock:
            self._op(op_key).update(status="failed", error=str(error), updated_at=self.clock.wall())

    def op_get(self, op_key: str) -> dict | None:
        with self._lock:
            self._check_open()
            op = self._ops.get(op_key)
            if op is None:
                return None
            out = copy.copy(op)
            out["result"] = loads(op["result"])
            return out

    # -- batches ---------------------------------------------------------------------

    def batched(self, fn: Callable[[], T]) -> T:
        with self._lock:
            if self._undo is not None:  # this thread's batch (the lock keeps other threads out)
                return fn()
            self._check_open()
            self._undo = undo = {}
            try:
                return fn()
            except BaseException:
                self._undo_batch(undo)
                raise
            finally:
                self._undo = None

    def close(self) -> None:
        with self._lock:
            self._closed = True


__all__ = ["MemoryStore"]
