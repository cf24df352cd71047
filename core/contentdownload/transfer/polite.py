"""Politeness: requests per second per host, pauses a host asked for, bytes per second per run.

:class:`HostPacer` spaces the requests to each host ``1 / rate`` seconds apart (no burst
allowance: at most ``rate + 1`` requests to a host in any one second), and holds every
request to a host that answered ``429`` or ``503`` with ``Retry-After`` until that time
has passed, whichever worker asks. :class:`ByteRate` keeps the body bytes of all workers
together at a rate. Both take the clock and the sleep function, so tests run them on a
fake clock; :class:`~contentdownload.transfer.http.HttpClient` passes a sleep that keeps
the lease alive and stops on Ctrl-C.
"""

from __future__ import annotations

import threading
import time
from typing import Callable


def host_key(host: str | None) -> str:
    """The name requests to one host are counted under: lower case, no IPv6 brackets."""
    return (host or "").strip("[]").lower()


class HostPacer:
    """Per host: requests at most ``rate`` per second, spaced evenly; pauses after ``429``/``503``.

    ``rate``: requests per second per host (``None``: no spacing, only pauses).
    """

    def __init__(self, rate: float | None = None, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.interval = 1.0 / rate if rate else 0.0
        self.clock, self.sleep = clock, sleep
        self._lock = threading.Lock()
        self._next: dict[str, float] = {}  # host -> earliest time of its next request
        self._paused_until: dict[str, float] = {}
        self._throttled: dict[str, dict[str, float]] = {}

    def wait_turn(self, host: str | None) -> None:
        """Wait until a request to ``host`` may go out, and take that turn."""
        key = host_key(host)
        while True:
            with self._lock:
                now = self.clock()
                due = max(self._next.get(key, now), self._paused_until.get(key, now))
                if due <= now:
                    if self.interval:
                        self._next[key] = now + self.interval
                    return
            self.sleep(due - now)

    def pause(self, host: str | None, seconds: float) -> None:
        """``host`` asked for ``seconds`` of quiet (``Retry-After``): no request to it before then."""
        key = host_key(host)
        with self._lock:
            until = self.clock() + max(0.0, seconds)
            self._paused_until[key] = max(self._paused_until.get(key, until), until)
            seen = self._throttled.setdefault(key, {"responses": 0, "paused_s": 0.0})
            seen["responses"] += 1
            seen["paused_s"] = round(seen["paused_s"] + max(0.0, seconds), 3)

    def paused(self, host: str | None) -> bool:
        """Whether ``host`` asked for quiet that has not ended yet."""
        with self._lock:
            return self._paused_until.get(host_key(host), 0.0) > self.clock()

    def throttled(self) -> dict[str, dict[str, float]]:
        """Hosts that asked for a pause: ``{host: {"responses": n, "paused_s": seconds asked in all}}``."""
        with self._lock:
            return {host: dict(seen) for host, seen in self._throttled.items()}


#: Idle time a byte rate may make up for, in seconds: a worker delayed by the scheduler catches up,
#: a paused run does not burst.
CATCH_UP_S = 1.0


class ByteRate:
    """Body bytes of all workers together at most ``rate`` per second (idle time earns at most :data:`CATCH_UP_S`)."""

    def __init__(self, rate: float, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.rate = float(rate)
        self.clock, self.sleep = clock, sleep
        self._lock = threading.Lock()
        self._due: float | None = None  # when the bytes received so far are due at the rate

    def consumed(self, n: int) -> None:
        """``n`` body bytes arrived: wait until they fit the rate."""
        with self._lock:
            now = self.clock()
            earliest = now if self._due is None else max(self._due, now - CATCH_UP_S)  # no credit before the first bytes
            self._due = earliest + n / self.rate
            wait = self._due - now
        if wait > 0:
            self.sleep(wait)
