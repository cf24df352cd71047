"""Reading a response body: into the caller's buffers, as the bytes arrive, within speed limits.

:class:`SpeedGuard` is curl's ``--low-speed-limit``/``--low-speed-time`` and
``--max-time`` for one attempt: the attempt is too slow when fewer than
``low_speed_limit * low_speed_time`` bytes arrive in ``low_speed_time`` seconds (each
window starts when the one before received that many bytes), and too long past
``max_time`` seconds from its start. Its clock is a monotonic-clock callable, so tests
pass their own.

:class:`BodyReader` fills a buffer from a ``requests`` response (``readinto``). A read
returns what the socket has (a read never waits for a whole block, so a server sending
200 bytes a second is seen as such), and the socket's timeout is set before each read to
the nearest of the read timeout and the guard's deadline, so a server that sends nothing
at all is stopped at the deadline too. A plain body (``Content-Length``, no chunked
framing, nothing to decode) is read straight into the buffer from the connection's
buffered reader, keeping urllib3's byte counts so that the end of the body is detected,
checked and the connection reused exactly as urllib3 does; any other body goes through
urllib3's ``read1`` (chunked framing, content decoding).
"""

from __future__ import annotations

import functools
import http.client
import io
import socket
import time
from typing import TYPE_CHECKING, Any, Callable

from contentdownload.errors import TooSlowError

if TYPE_CHECKING:  # pragma: no cover
    import requests

Clock = Callable[[], float]

#: A block being filled is handed over once this many seconds passed since its first read,
#: full or not, so that a slow body still reaches the part (and the progress) steadily.
FILL_WINDOW_S = 0.25
#: The buffer of the connection's reader (``socket.makefile`` buffers this much). A ``readinto1`` larger than it
#: reads the socket even when the buffer holds bytes, and a timeout there loses them; see ``BodyReader._read_direct``.
_READER_BUFFER = io.DEFAULT_BUFFER_SIZE


@functools.cache
def _read_timeouts() -> tuple[type[BaseException], ...]:
    """What a read that waited too long raises, through http.client, urllib3 or requests."""
    import requests  # a body read through requests has already imported it
    import urllib3

    return (TimeoutError, socket.timeout, urllib3.exceptions.ReadTimeoutError, requests.exceptions.Timeout)


class SpeedGuard:
    """The speed limits of one attempt (see the module). ``low_speed_limit`` 0 or ``max_time`` ``None`` turns a limit off."""

    def __init__(self, *, low_speed_limit: int = 0, low_speed_time: float = 60.0, max_time: float | None = None,
                 clock: Clock = time.monotonic):
        self.limit, self.window, self.max_time, self.clock = int(low_speed_limit), float(low_speed_time), max_time, clock
        self.started = self.mark = clock()
        self.since_mark = 0

    @classmethod
    def of(cls, options: Any, clock: Clock = time.monotonic) -> "SpeedGuard":
        """The guard for a run's :class:`~contentdownload.hooks.model.TransferOptions`."""
        return cls(low_speed_limit=options.low_speed_limit, low_speed_time=options.low_speed_time,
                   max_time=options.max_time, clock=clock)

    def start_body(self) -> None:
        """The body starts now: the first low-speed window begins here (``max_time`` still counts from the start)."""
        self.mark, self.since_mark = self.clock(), 0

    def received(self, n: int) -> None:
        """Count ``n`` bytes just received; raises :class:`TooSlowError` when a limit is broken."""
        self.since_mark += n
        if self.limit and self.since_mark >= self.limit * self.window:
            self.mark, self.since_mark = self.clock(), 0
        self.check()

    def check(self) -> None:
        """Raise :class:`TooSlowError` when a limit is broken by now."""
        now = self.clock()
        if self.max_time is not None and now - self.started >= self.max_time:
            raise TooSlowError(f"the transfer took longer than --max-time {self.max_time:g} s", "max_time")
        if self.limit and now - self.mark >= self.window:
            raise TooSlowError(f"fewer than {self.limit} bytes a second for {self.window:g} s "
                               f"(--low-speed-limit, --low-speed-time): {self.since_mark} bytes", "too_slow")

    def remaining(self, *, body: bool = True) -> float | None:
        """Seconds until a limit is broken if no more bytes come (``None``: never); without ``body``, ``max_time``'s only."""
        deadlines = []
        if self.max_time is not None:
            deadlines.append(self.started + self.max_time)
        if self.limit and body:
            deadlines.append(self.mark + self.window)
        return min(deadlines) - self.clock() if deadlines else None

    def timeout(self, read_timeout: float | None, *, body: bool = True) -> float | None:
        """The timeout for the next blocking step: ``read_timeout`` or the guard's deadline, whichever is nearer.

        ``body``: the low-speed limit applies (it does to body reads, not to the request and its headers).
        """
        remaining = self.remaining(body=body)
        if remaining is None:
            return read_timeout
        remaining = max(remaining, 0.001)
        return remaining if read_timeout is None else min(read_timeout, remaining)


def _plain_reader(raw: Any, decode: bool) -> Any | None:
    """The buffered reader a plain body can be read from directly, or ``None`` when urllib3 must read it."""
    fp = getattr(raw, "_fp", None)
    if not isinstance(fp, http.client.HTTPResponse) or fp.chunked or fp.length is None or fp.fp is None:
        return None
    if getattr(raw, "_fp_bytes_read", None) != 0 or getattr(raw, "length_remaining", None) != fp.length:
        return None
    if decode and (raw.headers.get("Content-Encoding") or "identity").strip().lower() != "identity":
        return None
    return fp.fp if hasattr(fp.fp, "readinto1") else None


class BodyReader:
    """Reads a streamed ``requests`` response's body into buffers (see the module).

    ``guard``: the attempt's :class:`SpeedGuard`; ``read_timeout``: seconds a read may wait
    for a byte; ``decode``: undo a content coding (gzip, deflate).
    """

    def __init__(self, response: requests.Response, *, guard: SpeedGuard, read_timeout: float | None, decode: bool = False):
        self.raw, self.guard, self.read_timeout, self.decode = response.raw, guard, read_timeout, decode
        self.direct = _plain_reader(self.raw, decode)
        self._timeouts = _read_timeouts()
        self._timeout: float | None = -1.0
        self._buffered = True  # the connection's reader may hold body bytes (read with the headers, or by a small read)
        self._pending: BaseException | None = None
        guard.start_body()

    def readinto(self, view: memoryview) -> int:
        """Fill ``view`` from the body; the bytes read, 0 at its end.

        Returns early, with what it has, at the end of the body, :data:`FILL_WINDOW_S` after
        its first read, or when a read fails (the failure is raised by the next call), so no
        byte received is held back. Raises :class:`TooSlowError` when the guard's limits are
        broken, and the transport's errors.
        """
        if self._pending is not None:
            error, self._pending = self._pending, None
            raise error
        got, first = 0, self.guard.clock()
        while got < len(view):
            try:
                n = self._read_once(view[got:])
                if n:
                    self.guard.received(n)
            except Exception as exc:
                if not got:
                    raise
                self._pending = exc
                return got
            if not n:
                break
            got += n
            if self.guard.clock() - first >= FILL_WINDOW_S:
                break
        return got

    def _read_once(self, view: memoryview) -> int:
        self._set_timeout()
        try:
            return self._read_direct(view) if self.direct is not None else self._read_urllib3(view)
        except self._timeouts as exc:
            self.guard.check()  # the deadline that ended the read was the guard's: too slow
            raise exc

    def _set_timeout(self) -> None:
        timeout = self.guard.timeout(self.read_timeout)
        last = self._timeout
        if timeout == last or (timeout is not None and last is not None and last >= 0 and abs(timeout - last) <= 0.05 * timeout):
            return
        sock = getattr(getattr(self.raw, "connection", None), "sock", None)
        if sock is not None:
            sock.settimeout(timeout)
            self._timeout = timeout

    def _read_direct(self, view: memoryview) -> int:
        """One read from the connection into ``view``, keeping http.client's and urllib3's counts."""
        fp, raw = self.raw._fp, self.raw
        left = fp.length
        if left:
            size = min(left, len(view))
            if self._buffered:  # a read no larger than the buffer returns what it holds without reading the socket
                size = min(size, _READER_BUFFER)
            self._buffered = size < _READER_BUFFER  # a smaller read may leave some bytes in it
            n = self.direct.readinto1(view[:size])
            if not n:
                import urllib3

                raise urllib3.exceptions.ProtocolError("Connection broken: IncompleteRead",
                                                       urllib3.exceptions.IncompleteRead(raw._fp_bytes_read, left))
            fp.length -= n
            raw._fp_bytes_read += n
            raw.length_remaining -= n
            if fp.length:
                return n
        else:
            n = 0
        self.direct = None  # the body is complete: urllib3's own read sees the end and releases the connection
        return n or self._read_urllib3(view)

    def _read_urllib3(self, view: memoryview) -> int:
        data = self.raw.read1(len(view), decode_content=self.decode)
        n = len(data)
        view[:n] = data
        return n
