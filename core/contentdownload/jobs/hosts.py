"""``--per-host``: at most so many transfers at once per host, for worker threads and event-loop tasks alike.

A run's jobs are transferred by worker threads and, on the event-loop lane
(:mod:`~contentdownload.jobs.fastlane`), by tasks of one loop; both take their slot from
the same :class:`Slots` of the host, so the limit holds whichever way a job runs.
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict, deque
from urllib.parse import urlsplit


class Slots:
    """``limit`` slots, taken by threads (:meth:`acquire`) and by event-loop tasks (:meth:`acquire_async`; FIFO), neither starved."""

    def __init__(self, limit: int):
        self._free = int(limit)
        self._cond = threading.Condition()
        self._waiters: deque[asyncio.Future[None]] = deque()  # the tasks waiting, as the futures they await
        self._threads = 0  # threads waiting
        self._threads_next = False  # whose turn it is when threads and tasks both wait

    def acquire(self, timeout: float | None = None) -> bool:
        """Take a slot, waiting up to ``timeout`` seconds (``None``: as long as it takes); whether one was taken."""
        with self._cond:
            self._threads += 1
            try:
                if not self._cond.wait_for(lambda: self._free > 0, timeout):
                    return False
            finally:
                self._threads -= 1
            self._free -= 1
            return True

    async def acquire_async(self) -> None:
        """Take a slot, waiting on the running loop (a task cancelled while waiting takes none)."""
        with self._cond:
            if self._free > 0:
                self._free -= 1
                return
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            with self._cond:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                    raise
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed over just as the task was cancelled
            raise

    def release(self) -> None:
        """Give a slot back: to the longest-waiting task or to a waiting thread, in turns when both wait, else to the pool."""
        with self._cond:
            self._threads_next = not self._threads_next
            if self._waiters and not (self._threads and self._threads_next):
                waiter = self._waiters.popleft()
                waiter.get_loop().call_soon_threadsafe(self._hand_over, waiter)
                return
            self._free += 1
            self._cond.notify()

    def _hand_over(self, waiter: asyncio.Future[None]) -> None:
        if waiter.cancelled():
            self.release()
        else:
            waiter.set_result(None)


class HostSlots:
    """The :class:`Slots` of each host (``limit`` each), by the URL's host name."""

    def __init__(self, limit: int):
        self._lock = threading.Lock()
        self._hosts: dict[str, Slots] = defaultdict(lambda: Slots(limit))

    def __call__(self, url: str) -> Slots:
        host = (urlsplit(url).hostname or "").lower()
        with self._lock:
            return self._hosts[host]
