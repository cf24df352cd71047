"""How durable the part store makes a finished file: ``--durability file|batch|none``.

What each survives:

- ``file``: every part is fsynced before its rename and its folder after it, one job at
  a time. A job the store records finished has its file on disk through a crash of the
  process or of the machine (power cut).
- ``batch`` (the default): the same guarantee and the same order (the part durable, then
  the rename, then the folder durable, then the record), but the renames of jobs that
  finish together are done by one committer per staging folder, which fsyncs each
  folder once for the whole batch instead of once per file (group commit: a batch is
  whatever waits while the previous one is written, or, once batches hold more than one
  file, arrives within :data:`BATCH_WINDOW_S` of its first, up to :data:`MAX_BATCH`). The
  parts themselves are fsynced by the workers, in parallel.
- ``none``: nothing is fsynced (parts, sidecars, folders), and no early writeback is
  asked for (it only prepares the final fsync). Survives a crash of the
  process (the kernel still writes what it was given), not of the machine: after a
  power cut a file recorded finished may be empty, short or missing; the next run's
  check of every finished file (size and mtime, else SHA-256) then fetches it again.
  Checkpoints do not make resume offsets durable either, so a part resumes from what
  the sidecar recorded in this boot.

The level is per thread (:func:`using`; the job worker sets it for each job), the sync
function per process (:func:`set_fsync`, which is how the tests count fsyncs).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import queue
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import attrs

LEVELS: tuple[str, ...] = ("file", "batch", "none")
DEFAULT = "batch"
#: The most promotions one batch holds.
MAX_BATCH = 256
#: How long a batch of the part store's committers stays open after its first item for
#: more to join: a job's record waits this much longer, a batch of jobs finishing within it
#: shares one lease check, one folder fsync and one store transaction.
BATCH_WINDOW_S = 0.005
#: The most parts made durable at once by one batch (a disk takes parallel flushes faster than serial ones).
SYNC_THREADS = 4


_fsync: Callable[[int], None] | None = None  # None: os.fsync, looked up at each call


def set_fsync(fsync: Callable[[int], None] | None) -> Callable[[int], None] | None:
    """Replace the function every level uses to make a descriptor durable (``None``: ``os.fsync``); returns the previous one."""
    global _fsync
    previous, _fsync = _fsync, fsync
    return previous


def _sync(fd: int) -> None:
    (_fsync or os.fsync)(fd)


def _sync_one(fd: int) -> OSError | None:
    try:
        _sync(fd)
    except OSError as exc:
        return exc
    return None


@attrs.frozen
class Durability:
    """A level: whether and how the part store makes files durable."""

    level: str = DEFAULT

    def __attrs_post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"unknown durability {self.level!r}: use file, batch or none")

    @property
    def syncs(self) -> bool:
        return self.level != "none"

    def sync(self, fd: int) -> None:
        """Make the file ``fd`` durable (nothing at level ``none``)."""
        if self.syncs:
            _sync(fd)

    def sync_all(self, fds: Sequence[int]) -> list[OSError | None]:
        """Make the files ``fds`` durable, up to :data:`SYNC_THREADS` at once (nothing at level ``none``):
        for each, what its fsync raised (``None``: durable)."""
        if not self.syncs or not fds:
            return [None] * len(fds)
        if len(fds) == 1:
            return [_sync_one(fds[0])]
        return list(_sync_pool().map(_sync_one, fds))

    def sync_folder(self, path: Path) -> None:
        """Make the names in the folder ``path`` durable (a no-op where a folder cannot be fsynced)."""
        if not self.syncs:
            return
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError:
            return
        try:
            _sync(fd)
        except OSError:
            pass  # some filesystems cannot fsync a folder
        finally:
            os.close(fd)


_current: contextvars.ContextVar[Durability] = contextvars.ContextVar("contentdownload_durability", default=Durability())


def current() -> Durability:
    """The level in force in this thread (set by :func:`using`; ``batch`` where none was set)."""
    return _current.get()


@contextlib.contextmanager
def using(level: str) -> Iterator[Durability]:
    """``level`` in force in this thread inside the block."""
    token = _current.set(Durability(level))
    try:
        yield _current.get()
    finally:
        _current.reset(token)


class _Slot:
    __slots__ = ("item", "done", "result", "error")

    def __init__(self, item: Any):
        self.item, self.done, self.result, self.error = item, threading.Event(), None, None


class Committer:
    """Runs ``commit(items)`` for items submitted by many threads, in batches (group commit).

    :meth:`submit` blocks until its item's batch is committed and returns its result (or
    raises what the batch raised). A batch is every item waiting when the committer is
    free, and what arrives within ``window`` seconds (default 0) of its first item, up to ``max_batch``,
    once the last batch held more than one item (jobs finish together: it is worth waiting for more).
    ``counted``: its batch sizes are among :func:`commit_batches` (the part store's committers).
    """

    def __init__(self, commit: Callable[[Sequence[Any]], Sequence[Any]], *, max_batch: int = MAX_BATCH, window: float = 0.0,
                 counted: bool = False):
        self.commit, self.max_batch, self.window, self.counted = commit, max_batch, window, counted
        self._queue: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.batches: list[int] = []  # the size of each batch committed (for metrics and tests)

    def submit(self, item: Any) -> Any:
        slot = _Slot(item)
        self._queue.put(slot)
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="contentdownload-committer", daemon=True)
                self._thread.start()
        slot.done.wait()
        if slot.error is not None:
            raise slot.error
        return slot.result

    def _take(self) -> list[_Slot]:
        """The next batch; the window opens only after a batch of more than one (a lone job, one at a time, never waits)."""
        batch = [self._queue.get()]
        closes = time.monotonic() + (self.window if self.batches and self.batches[-1] > 1 else 0.0)
        while len(batch) < self.max_batch:
            left = closes - time.monotonic()
            try:
                batch.append(self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            try:
                results = self.commit([slot.item for slot in batch])
                for slot, result in zip(batch, results):
                    slot.result = result
            except BaseException as exc:  # every job of the batch sees what went wrong
                for slot in batch:
                    slot.error = exc
            finally:
                self.batches.append(len(batch))
                if self.counted:
                    count_batch(len(batch))
                for slot in batch:
                    slot.done.set()


class LoopCommitter:
    """:class:`Committer` for callers on one event loop: ``await submit(item)`` holds no thread while it waits.

    A batch is every item submitted while the previous batch was committed (group commit), up
    to ``max_batch``; ``commit(items)`` runs in the loop's default executor, so the loop never
    waits on the disk or the store. What the batch raised is raised to each of its callers
    that waits (:meth:`submit`); an item handed over with :meth:`add` is nobody's to wait for.
    """

    def __init__(self, commit: Callable[[Sequence[Any]], Sequence[Any]], *, max_batch: int = MAX_BATCH):
        self.commit, self.max_batch = commit, max_batch
        self._pending: list[tuple[Any, asyncio.Future[Any] | None]] = []
        self._draining: asyncio.Task[None] | None = None
        self.batches: list[int] = []

    async def submit(self, item: Any) -> Any:
        """``item``'s result, once its batch is committed."""
        done = asyncio.get_running_loop().create_future()
        self._enqueue(item, done)
        return await done

    def add(self, item: Any) -> None:
        """Hand ``item`` over without waiting for its batch (``commit`` deals with its own failures)."""
        self._enqueue(item, None)

    async def drain(self) -> None:
        """Wait until every item handed over is committed."""
        while self._draining is not None:
            await self._draining

    def _enqueue(self, item: Any, done: "asyncio.Future[Any] | None") -> None:
        self._pending.append((item, done))
        if self._draining is None:
            self._draining = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
                self.batches.append(len(batch))
                try:
                    results = await loop.run_in_executor(None, contextvars.copy_context().run, self.commit, [item for item, _ in batch])
                except Exception as exc:  # every caller of the batch sees what went wrong; the next batch goes on
                    _fail_all(batch, exc)
                    continue
                except BaseException as exc:  # cancelled: the loop is going away
                    _fail_all(batch, exc)
                    raise
                for (_, done), result in zip(batch, results):
                    if done is not None and not done.done():
                        done.set_result(result)
        finally:
            self._draining = None
            _fail_all(self._pending, asyncio.CancelledError())  # left only when cancelled
            self._pending = []


def _fail_all(batch: Sequence[tuple[Any, "asyncio.Future[Any] | None"]], exc: BaseException) -> None:
    for _, done in batch:
        if done is None or done.done():
            continue
        if isinstance(exc, asyncio.CancelledError):
            done.cancel()
        else:
            done.set_exception(exc)


_committers: dict[Any, Committer] = {}
_loop_committers: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Any, LoopCommitter]]" = weakref.WeakKeyDictionary()
_all_batches: list[int] = []  # every committer's batch sizes, in the order committed
_committers_lock = threading.Lock()
_fsync_pool: ThreadPoolExecutor | None = None


def committer(key: Any, commit: Callable[[Sequence[Any]], Sequence[Any]]) -> Committer:
    """The committer of ``key`` (a staging folder) in this process."""
    with _committers_lock:
        found = _committers.get(key)
        if found is None:
            found = _committers[key] = Committer(commit, window=BATCH_WINDOW_S, counted=True)
        return found


def loop_committer(key: Any, commit: Callable[[Sequence[Any]], Sequence[Any]]) -> LoopCommitter:
    """The committer of ``key`` (a staging folder) on the running event loop."""
    found = _loop_committers.setdefault(asyncio.get_running_loop(), {})
    if key not in found:
        found[key] = LoopCommitter(commit)
    return found[key]


def _sync_pool() -> ThreadPoolExecutor:
    global _fsync_pool
    with _committers_lock:
        if _fsync_pool is None:
            _fsync_pool = ThreadPoolExecutor(max_workers=SYNC_THREADS, thread_name_prefix="contentdownload-fsync")
        return _fsync_pool


def count_batch(size: int) -> None:
    """Count a batch of ``size`` parts promoted together (among :func:`commit_batches`)."""
    _all_batches.append(size)


def commit_batches() -> list[int]:
    """The size of every batch the committers of this process committed, oldest first."""
    return list(_all_batches)


def _forget_committers() -> None:
    global _committers_lock, _fsync_pool
    _committers.clear()  # a forked child has none of its parent's threads, nor their batches
    _loop_committers.clear()
    _all_batches.clear()
    _committers_lock = threading.Lock()
    _fsync_pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_committers)
