"""Moving body blocks to disk: reused buffers, whole writes, SHA-256 in a second thread, early writeback.

- :class:`BufferPool`: a few reused buffers; a block is read into one, written, and the
  buffer comes back once the hash thread is done with it (so memory stays at
  ``count * size`` whatever the body's length, and no block is allocated per read).
- :func:`write_all`: ``os.write`` until every byte is written (a short write is continued,
  never dropped).
- :class:`Stage`: a step (writing, hashing) run over blocks in a thread of its own, so
  that receiving, writing and hashing a big body overlap; :class:`Hasher` is the SHA-256
  stage.
- :func:`start_writeback`: Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``, so the disk
  starts writing a durable part while it is received and the final fsync has little left
  to do (a no-op elsewhere).
"""

from __future__ import annotations

import os
import queue
import sys
import threading
from typing import Any, Callable

#: Blocks a threaded hasher may hold (and buffers a pool has).
DEPTH = 4
_SYNC_FILE_RANGE_WRITE = 2
_sync_file_range: Any = None


class BufferPool:
    """``count`` buffers of ``size`` bytes: :meth:`take` one (waits while all are in use), :meth:`give` it back."""

    def __init__(self, size: int, count: int = DEPTH):
        self.size = size
        self._free: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
        for _ in range(count):
            self._free.put(memoryview(bytearray(size)))

    def take(self) -> memoryview:
        return self._free.get()

    def give(self, buffer: memoryview) -> None:
        self._free.put(buffer)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of ``data`` at ``fd``'s position, continuing after short writes."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


Done = Callable[[], None]


class Stage:
    """Runs ``step(block, done)`` for each block fed, inline or, when ``threaded``, in a thread of its own.

    ``done`` (``None`` or a function) is to be called once nothing will read ``block`` any
    more (a caller that reuses the block's buffer passes the function that takes it back);
    ``step`` calls it or hands it on. In a thread, the first error of ``step`` is kept:
    later blocks are skipped (their ``done`` called) and :meth:`raise_error`, :meth:`drain`
    or :meth:`stop` raises it in the caller's thread.

    Memory: a block fed with a ``done`` is bounded by its caller (who has so many buffers
    and waits for one to come back), so :meth:`feed` never blocks on it; at most ``depth``
    blocks fed without one wait at once (:meth:`feed` blocks for the next).
    """

    def __init__(self, step: Callable[[Any, Done | None], None], threaded: bool, name: str, depth: int = DEPTH):
        self.step = step
        self.error: BaseException | None = None
        self.failed = False  # once a step failed, no later block goes through it (its error raised or not)
        self.thread: threading.Thread | None = None
        if threaded:
            self.queue: queue.Queue[tuple[Any, Done | None, bool] | None] = queue.Queue()
            self.slots = threading.BoundedSemaphore(depth)
            self.thread = threading.Thread(target=self._run, name=name, daemon=True)
            self.thread.start()

    def feed(self, block: bytes | memoryview, done: Done | None = None) -> None:
        if self.thread is None:
            self.step(block, done)
            return
        slot = done is None
        if slot:
            self.slots.acquire()
        self.queue.put((block, done, slot))

    def _run(self) -> None:
        get, task_done = self.queue.get, self.queue.task_done
        while (item := get()) is not None:
            block, done, slot = item
            try:
                if not self.failed:
                    self.step(block, done)
                    done = None  # the step called it or handed it on
            except BaseException as exc:  # raised in the feeding thread by raise_error
                self.error, self.failed = exc, True
            finally:
                if done is not None:
                    done()
                if slot:
                    self.slots.release()
                task_done()
        task_done()

    def drain(self) -> None:
        """Wait until every block fed so far went through the step; raise its error if it failed."""
        if self.thread is not None:
            self.queue.join()
        self.raise_error()

    def raise_error(self) -> None:
        error, self.error = self.error, None
        if error is not None:
            raise error

    def stop(self) -> None:
        """Finish the blocks fed, end the thread; raise the step's error if it failed."""
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join()
            self.thread = None
        self.raise_error()


class Hasher(Stage):
    """SHA-256 (any ``hashlib`` object) of the blocks fed, inline or in a thread."""

    def __init__(self, digest: Any, threaded: bool, depth: int = DEPTH):
        self.digest = digest
        super().__init__(self._update, threaded, "contentdownload-sha256", depth)

    def _update(self, block: Any, done: Done | None) -> None:
        self.digest.update(block)
        if done is not None:
            done()

    def hexdigest(self) -> str:
        self.stop()
        return self.digest.hexdigest()


def _load_sync_file_range() -> Any:
    global _sync_file_range
    if _sync_file_range is None:
        _sync_file_range = False
        if sys.platform.startswith("linux"):
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            function = getattr(libc, "sync_file_range", None)
            if function is not None:
                function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
                function.restype = ctypes.c_int
                _sync_file_range = function
    return _sync_file_range


def start_writeback(fd: int, start: int, length: int) -> bool:
    """Ask the kernel to start writing ``length`` bytes of ``fd`` from ``start`` to disk, without waiting.

    Only a head start for a later fsync, which still makes the bytes durable; ``False``
    (nothing done) where ``sync_file_range`` does not exist or fails.
    """
    function = _load_sync_file_range()
    if not function or length <= 0:
        return False
    return function(fd, start, length, _SYNC_FILE_RANGE_WRITE) == 0
