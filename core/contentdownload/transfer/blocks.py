"""Moving body blocks to disk: reused buffers, whole writes, SHA-256 in a second thread, early writeback.

- :class:`BufferPool`: a few reused buffers; a block is read into one, written, and the
  buffer comes back once the hash thread is done with it (so memory stays at
  ``count * size`` whatever the body's length, and no block is allocated per read).
- :func:`write_all`: ``os.write`` until every byte is written (a short write is continued,
  never dropped).
- :class:`Hasher`: the SHA-256 of a body, inline or in a thread fed memoryviews.
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


class Hasher:
    """SHA-256 (any ``hashlib`` object) of the blocks fed, inline or, when ``threaded``, in a thread.

    ``feed(block, done)`` hashes ``block`` and then calls ``done()`` (when given): a caller
    that reuses the block's buffer passes the function that takes it back.
    """

    def __init__(self, digest: Any, threaded: bool, depth: int = DEPTH):
        self.digest = digest
        self.thread: threading.Thread | None = None
        if threaded:
            self.queue: queue.Queue[tuple[Any, Callable[[], None] | None] | None] = queue.Queue(depth)
            self.thread = threading.Thread(target=self._run, name="contentdownload-sha256", daemon=True)
            self.thread.start()

    def feed(self, block: bytes | memoryview, done: Callable[[], None] | None = None) -> None:
        if self.thread is not None:
            self.queue.put((block, done))
            return
        self.digest.update(block)
        if done is not None:
            done()

    def _run(self) -> None:
        update, get = self.digest.update, self.queue.get
        while (item := get()) is not None:
            block, done = item
            update(block)
            if done is not None:
                done()

    def stop(self) -> None:
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join()
            self.thread = None

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
