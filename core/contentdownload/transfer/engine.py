"""An asyncio HTTP/1.1 client for GETs: one event loop running many transfers, keep-alive connections per host.

:class:`Engine` opens an :class:`Exchange` per request: the status line and headers
parsed (by ``httptools``, llhttp's bindings), then the body as it arrives
(:meth:`Exchange.chunks`, de-chunked, never decoded). Connections are pooled per
``(scheme, host, port)``, at most ``per_host`` open at once per host (more requests wait
their turn, first come first served); a connection goes back to the pool only after a
keep-alive response's body was read to its end, and :meth:`Exchange.abandon` closes it.
A request that finds a pooled connection closed by the server before any byte of the
answer is sent once more on a new connection (what urllib3 does too).

Reading: each connection is an :class:`asyncio.BufferedProtocol`. The status line and
headers are read into one reused buffer and parsed there; a ``2xx`` body framed by one
``Content-Length`` is then received straight into reused blocks of ``block_size`` bytes
(:meth:`Engine.open`; no parser, no ``bytes`` object per read) and handed on as
memoryviews with the function that gives the block back (:meth:`Exchange.blocks`), so a
big body is copied once, from the socket to its block, whatever reads it next (a writer,
a hash thread). Chunked bodies and bodies ending at close go through the parser.

Timeouts: ``connect_timeout`` for the connection (and the TLS handshake), then
``read_timeout`` for the headers and between body blocks. Flow control: reading pauses
while more than :data:`HIGH_WATER` body bytes wait to be consumed (or, straight into
blocks, while every block of a connection's :data:`HIGH_WATER` worth is still held), and
resumes once they are down to :data:`LOW_WATER` (once a block is given back). Failures are the :class:`~contentdownload.errors.TransportError`
tree; a body shorter than its ``Content-Length`` or a chunked body cut mid-way raises
:class:`~contentdownload.errors.EngineIncompleteBody`, never ends quietly.

:func:`new_event_loop` gives a uvloop loop where uvloop is installed, else asyncio's.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
import threading
from typing import Any, AsyncIterator, Callable, Mapping
from urllib.parse import urlsplit

import httptools

from contentdownload.errors import (
    EngineConnectError,
    EngineConnectionLost,
    EngineConnectionReset,
    EngineConnectTimeout,
    EngineIncompleteBody,
    EngineProtocolError,
    EngineReadTimeout,
)
from contentdownload.transfer.headers import HeaderFields
from contentdownload.version import __version__

#: Body bytes buffered before the connection stops reading (and resumes at :data:`LOW_WATER`).
HIGH_WATER = 8 << 20
LOW_WATER = HIGH_WATER // 4
#: The size of a body block read straight from the socket, unless :meth:`Engine.open` is given another.
BLOCK_SIZE = 1 << 20
#: The buffer the status line, headers and parsed bodies are read into, one per connection.
READ_BUFFER = 256 << 10
_DEFAULT_PORTS = {"http": 80, "https": 443}

PoolKey = tuple[str, str, int]


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop: uvloop's when it is installed, else asyncio's."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - depends on the platform
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _wait(loop: asyncio.AbstractEventLoop, future: asyncio.Future, timeout: float | None, error: Callable[[], BaseException]) -> Any:
    """``future``, failed with ``error()`` when not done within ``timeout`` seconds."""
    if timeout is None:
        return future
    handle = loop.call_later(max(timeout, 0.0), lambda: future.done() or future.set_exception(error()))
    future.add_done_callback(lambda _: handle.cancel())
    return future


Block = tuple["bytes | memoryview", "Callable[[], None] | None"]


class _Buffer:
    """One reused block: ``filled`` bytes received, the first ``taken`` of them handed on, ``held`` views not given back.

    One byte more than ``size`` is there to read into: the first byte after a body that ends in the block.
    """

    __slots__ = ("view", "filled", "taken", "held", "retired")

    def __init__(self, size: int):
        self.view = memoryview(bytearray(size + 1))
        self.filled = self.taken = self.held = 0
        self.retired = False  # filled, or the body ended in it: back to the free list once nothing holds it


class _Blocks:
    """A connection's blocks of ``size`` bytes, at most ``limit``; given back from any thread (a hash thread).

    :meth:`take` a free one (``None`` when all are held: ``on_free`` is then called, in the
    loop, once one is given back).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, size: int, limit: int, on_free: Callable[[], None]):
        self.loop, self.size, self.limit, self.on_free = loop, size, limit, on_free
        self.free: list[_Buffer] = []
        self.count = 0
        self.waiting = False
        self.lock = threading.Lock()

    def take(self, *, force: bool = False) -> _Buffer | None:
        """A free block, or a new one while fewer than ``limit`` exist (or ``force``)."""
        with self.lock:
            if self.free:
                return self.free.pop()
            if self.count >= self.limit and not force:
                self.waiting = True
                return None
            self.count += 1
        return _Buffer(self.size)

    def cut(self, buffer: _Buffer) -> Block:
        """The bytes of ``buffer`` received since the last cut, and the function that gives them back."""
        view = buffer.view[buffer.taken:buffer.filled]
        buffer.taken = buffer.filled
        with self.lock:
            buffer.held += 1
        return view, lambda: self._give(buffer)

    def retire(self, buffer: _Buffer) -> None:
        """Nothing more goes into ``buffer``: free once every view of it is given back."""
        with self.lock:
            buffer.retired = True
            self._free_if_unheld(buffer)

    def _give(self, buffer: _Buffer) -> None:
        with self.lock:
            buffer.held -= 1
            wake = self._free_if_unheld(buffer) and self.waiting
            if wake:
                self.waiting = False
        if wake:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                self.loop.call_soon_threadsafe(self.on_free)

    def _free_if_unheld(self, buffer: _Buffer) -> bool:
        if buffer.held or not buffer.retired:
            return False
        buffer.filled = buffer.taken = 0
        buffer.retired = False
        self.free.append(buffer)
        return True

    @property
    def in_use(self) -> int:
        """Bytes in blocks not free."""
        return (self.count - len(self.free)) * self.size


class _Connection(asyncio.BufferedProtocol):
    """One HTTP/1.1 connection: parses responses, receives a sized body into blocks, pauses reading above the high-water mark."""

    def __init__(self, loop: asyncio.AbstractEventLoop, key: PoolKey):
        self.loop, self.key = loop, key
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.used_before = False  # taken from the pool (so a failure before any byte may be a stale keep-alive)
        self._read_buffer: memoryview | None = None
        self._pool: _Blocks | None = None
        self.block_size = BLOCK_SIZE
        self._reset()

    def _reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.fields: list[tuple[str, str]] = []
        self.reason_bytes = b""
        self.status = 0
        self.keep_alive = False
        self.got_bytes = False
        self.headers_done: asyncio.Future = self.loop.create_future()
        self.blocks: collections.deque[Block] = collections.deque()
        self.buffered = 0  # parsed body bytes not taken yet
        self.received = 0
        self.complete = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future | None = None
        self.paused = False  # by the parsed bytes buffered
        self.starved = False  # every block held
        self.active = False
        self._sized: int | None = None  # the body's length, when it may go straight into blocks
        self._left: int | None = None  # body bytes still to come straight into blocks (``None``: parsed)
        self._current: _Buffer | None = None

    # -- asyncio.BufferedProtocol --------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._left:
            current = self._current
            if current is None:  # asked while starved (reading is paused): one block past the limit
                assert self._pool is not None
                current = self._current = self._pool.take(force=True)
            assert current is not None and self._pool is not None
            free = self._pool.size - current.filled
            return current.view[current.filled:current.filled + (self._left + 1 if self._left <= free else free)]
        if self._read_buffer is None:
            self._read_buffer = memoryview(bytearray(READ_BUFFER))
        return self._read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        if not self.active:  # bytes nobody asked for: the connection cannot be trusted any more
            self.close()
            return
        self.got_bytes = True
        if self._left is not None:
            if self._left == 0:  # bytes after the body: this connection cannot be reused
                self.keep_alive = False
                self.close()
                return
            self._received_into_block(nbytes)
            return
        assert self._read_buffer is not None
        try:
            self.parser.feed_data(self._read_buffer[:nbytes])
        except httptools.HttpParserError as exc:
            if self.complete:  # garbage after a finished response: only this connection's reuse is lost
                self.keep_alive = False
            else:
                self._fail(EngineProtocolError(f"bad response: {exc}"))
            self.close()
            return
        if self._sized is not None and not self.complete and self.error is None:
            self._start_blocks(self._sized)

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.active or self.complete:
            return
        if self.headers_done.done() and self._ends_at_close():
            self.on_message_complete()
            return
        self._fail(self._lost_error(exc))

    def pause_writing(self) -> None:  # the request is small: nothing to hold back
        pass

    def resume_writing(self) -> None:
        pass

    # -- httptools callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:  # a second response behind the first, unasked: not this body's, and the connection is lost
            raise EngineProtocolError("a response after the end of the one asked for")

    def on_status(self, status: bytes) -> None:
        self.reason_bytes += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        self._sized = self._sized_length()
        if not self.headers_done.done():
            self.headers_done.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.blocks.append((body, None))
        self.buffered += len(body)
        self.received += len(body)
        if self.buffered > HIGH_WATER and not self.paused:
            self.paused = True
            self._pause()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._wake()

    # -- a body straight into blocks ------------------------------------------------------

    def _sized_length(self) -> int | None:
        """The body's length when it is a ``2xx`` framed by one ``Content-Length`` alone (what goes straight into blocks)."""
        if not 200 <= self.status < 300 or self.status == 204:
            return None
        names = [name.lower() for name, _ in self.fields]
        if names.count("content-length") != 1 or "transfer-encoding" in names:
            return None
        length = self.fields[names.index("content-length")][1].strip()
        return int(length) if length.isdigit() else None

    def _start_blocks(self, length: int) -> None:
        """The headers (and maybe the body's first bytes) are parsed: the rest of the body goes straight into blocks."""
        self._left = length - self.received
        if self._pool is None or self._pool.size != self.block_size:
            self._pool = _Blocks(self.loop, self.block_size, max(2, HIGH_WATER // self.block_size), self._unstarve)
        self._next_block()

    def _next_block(self) -> None:
        assert self._pool is not None
        self._current = self._pool.take()
        if self._current is None and not self.starved:
            self.starved = True
            self._pause()

    def _unstarve(self) -> None:
        """A block was given back: reading goes on (into a block taken while starved, if one was)."""
        if not self.starved or not self._left or self.closed:
            return
        if self._current is None:
            assert self._pool is not None
            self._current = self._pool.take()
            if self._current is None:  # none free after all: the pool tells again when one is
                return
        self.starved = False
        self._resume()

    def _received_into_block(self, nbytes: int) -> None:
        current, pool = self._current, self._pool
        assert current is not None and pool is not None and self._left is not None
        if nbytes > self._left:  # bytes after the body: this connection cannot be reused
            nbytes = self._left
            self.keep_alive = False
        current.filled += nbytes
        self.received += nbytes
        self._left -= nbytes
        if self._left == 0 or current.filled == pool.size:
            self.blocks.append(pool.cut(current))
            pool.retire(current)
            self._current = None
            if self._left == 0:
                self.on_message_complete()
                return
            self._next_block()
        self._wake()

    def _pause(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def _resume(self) -> None:
        if not self.paused and not self.starved and self.transport is not None and not self.closed:
            self.transport.resume_reading()

    # -- the exchange's side ------------------------------------------------------------

    def _ends_at_close(self) -> bool:
        """A body without ``Content-Length`` or chunked framing ends when the connection does."""
        names = {name.lower() for name, _ in self.fields}
        return "content-length" not in names and "transfer-encoding" not in names

    def _lost_error(self, exc: BaseException | None) -> BaseException:
        error: BaseException
        if isinstance(exc, ConnectionResetError):
            error = EngineConnectionReset(f"the server reset the connection ({self.received} body bytes received)")
        elif self.headers_done.done():
            error = EngineIncompleteBody(self.received, self._missing())
        else:
            error = EngineConnectionLost("the server closed the connection before the headers")
        if exc is not None:
            error.__cause__ = exc
        return error

    def _missing(self) -> int | None:
        length = next((v.strip() for n, v in self.fields if n.lower() == "content-length"), None)
        return int(length) - self.received if length is not None and length.isdigit() else None

    def _fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        if not self.headers_done.done():
            self.headers_done.set_exception(error)
            self.headers_done.exception()  # retrieved here: an abandoned exchange must not warn
        self._wake()

    def _wake(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def start(self, request: bytes, block_size: int) -> None:
        """Send ``request`` on a connection ready for a new exchange, its body to be read in blocks of ``block_size``."""
        self._reset()
        self.active = True
        self.block_size = block_size
        assert self.transport is not None
        self.transport.write(request)

    def take(self) -> Block | None:
        """The next body block and the function that gives it back (``None``: nothing to give back; ``None`` when none is buffered)."""
        if self.blocks:
            block = self.blocks.popleft()
            if block[1] is None:
                self.buffered -= len(block[0])
                if self.paused and self.buffered <= LOW_WATER:
                    self.paused = False
                    self._resume()
            return block
        current = self._current
        if current is not None and current.filled > current.taken and self._pool is not None:
            return self._pool.cut(current)
        return None

    def more(self, timeout: float | None) -> asyncio.Future:
        """A future done when a block, the end or a failure arrives (failing after ``timeout`` seconds)."""
        self.waiter = self.loop.create_future()
        return _wait(self.loop, self.waiter, timeout, lambda: EngineReadTimeout(f"no body bytes for {timeout:g} s"))

    @property
    def held(self) -> int:
        """Body bytes received and not given back yet (parsed ones not taken, blocks not free)."""
        return self.buffered + (self._pool.in_use if self._pool is not None else 0)

    @property
    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.closed and self.error is None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class _Host:
    """One origin's connections: the idle ones, how many are open, who waits for one."""

    __slots__ = ("idle", "open", "waiters")

    def __init__(self) -> None:
        self.idle: list[_Connection] = []
        self.open = 0
        self.waiters: collections.deque[asyncio.Future] = collections.deque()

    def wake_one(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


class Exchange:
    """One GET's response: ``status``, ``reason``, ``url`` and ``headers`` parsed, the body read with :meth:`chunks`.

    Read the body to its end or :meth:`abandon` it: until then the connection counts against ``per_host``.
    """

    def __init__(self, engine: "Engine", conn: _Connection, url: str):
        self._engine, self._conn, self.url = engine, conn, url
        self.status: int = conn.status
        self.reason: str = conn.reason_bytes.decode("latin-1")
        self.headers = HeaderFields(conn.fields)
        self._done = False

    @property
    def status_code(self) -> int:
        """``status``, under the name a ``requests`` response gives it."""
        return self.status

    @property
    def received(self) -> int:
        """Body bytes received so far."""
        return self._conn.received

    async def blocks(self, *, timeout: Callable[[], float | None] | None = None) -> AsyncIterator[Block]:
        """The body as it arrives (de-chunked, not decoded), to its end, as ``(data, give_back)``; raises a
        :class:`~contentdownload.errors.TransportError`.

        ``data`` is a memoryview of a reused block when ``give_back`` is a function: call it (from
        any thread) once nothing reads ``data`` any more; until then the block is not reused,
        and reading pauses when all of the connection's blocks are held. ``timeout()`` gives the
        seconds to wait for each next block (default: the engine's read timeout).
        """
        conn, engine = self._conn, self._engine
        try:
            while True:
                block = conn.take()
                if block is not None:
                    yield block
                    continue
                if conn.error is not None:
                    raise conn.error
                if conn.complete:
                    break
                await conn.more(timeout() if timeout is not None else engine.read_timeout)
        finally:
            self._finish()

    async def chunks(self, *, timeout: Callable[[], float | None] | None = None) -> AsyncIterator[bytes | memoryview]:
        """:meth:`blocks` for a reader done with each block before it asks for the next (each is given back then)."""
        async with contextlib.aclosing(self.blocks(timeout=timeout)) as blocks:
            async for data, give_back in blocks:
                try:
                    yield data
                finally:
                    if give_back is not None:
                        give_back()

    def _finish(self) -> None:
        if not self._done:
            self._done = True
            self._engine._release(self._conn)

    def abandon(self) -> None:
        """Close the connection without reading the rest of the body; it is never reused."""
        if not self._done:
            self._conn.keep_alive = False
            self._conn.close()
            self._finish()


class Engine:
    """Keep-alive HTTP/1.1 GETs on the running event loop (see the module).

    ``per_host``: connections open at once per ``(scheme, host, port)``. ``connect_timeout``,
    ``read_timeout``: seconds. ``ssl_context``: for ``https`` (``None``: the system's default
    context, which verifies; the run's trust is :func:`contentdownload.transfer.options.ssl_context`
    of its ``verify``). ``default_headers``: sent with every request (a request's own win).
    """

    def __init__(self, *, per_host: int, connect_timeout: float, read_timeout: float,
                 ssl_context: ssl.SSLContext | None, default_headers: Mapping[str, str]):
        self.per_host = max(1, int(per_host))
        self.connect_timeout, self.read_timeout = float(connect_timeout), float(read_timeout)
        self.ssl_context = ssl_context
        self.default_headers = dict(default_headers)
        self._hosts: dict[PoolKey, _Host] = {}
        self._closed = False
        self._live: set[_Connection] = set()  # every connection open, pooled or in use
        self._loop: asyncio.AbstractEventLoop | None = None

    async def open(self, url: str, headers: Mapping[str, str], *,
                   timeout: tuple[float | None, float | None] | None = None, block_size: int = BLOCK_SIZE) -> Exchange:
        """Send a GET for ``url``; returns once the status line and headers are parsed.

        ``timeout``: (connect, read) seconds for this request instead of the engine's.
        ``block_size``: the bytes of a block a sized body is received into (see :meth:`Exchange.blocks`).
        """
        connect, read = timeout if timeout is not None else (self.connect_timeout, self.read_timeout)
        key, target = _target(url)
        request = self._request(key, target, headers)
        while True:
            conn = await self._acquire(key, connect)
            try:
                conn.start(request, block_size)
                await _wait(conn.loop, conn.headers_done, read, lambda: EngineReadTimeout(f"no response headers for {read:g} s"))
            except (EngineConnectionLost, EngineReadTimeout) as exc:
                stale = conn.used_before and not conn.got_bytes and isinstance(exc, EngineConnectionLost)
                conn.close()
                self._release(conn)
                if stale:
                    continue
                raise
            except BaseException:
                conn.close()
                self._release(conn)
                raise
            return Exchange(self, conn, url)

    def _request(self, key: PoolKey, target: str, headers: Mapping[str, str]) -> bytes:
        merged = {name.lower(): (name, value) for name, value in self.default_headers.items()}
        merged.update((name.lower(), (name, value)) for name, value in headers.items())
        scheme, host, port = key
        shown = f"[{host}]" if ":" in host else host
        merged.setdefault("host", ("Host", shown if port == _DEFAULT_PORTS[scheme] else f"{shown}:{port}"))
        merged.setdefault("user-agent", ("User-Agent", f"contentdownload/{__version__}"))
        merged["connection"] = ("Connection", "keep-alive")
        lines = [f"GET {target} HTTP/1.1"]
        lines += [f"{name}: {value}" for name, value in merged.values()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _acquire(self, key: PoolKey, connect_timeout: float | None) -> _Connection:
        host = self._hosts.get(key)
        if host is None:
            host = self._hosts[key] = _Host()
        while True:
            while host.idle:
                conn = host.idle.pop()
                if not conn.closed:
                    conn.used_before = True
                    return conn
                self._live.discard(conn)
                host.open -= 1
            if host.open < self.per_host:
                host.open += 1
                try:
                    conn = await self._connect(key, connect_timeout)
                except BaseException:
                    host.open -= 1
                    host.wake_one()
                    raise
                conn.used_before = False
                return conn
            await self._wait_turn(host)

    @staticmethod
    async def _wait_turn(host: _Host) -> None:
        waiter = asyncio.get_running_loop().create_future()
        host.waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                host.wake_one()  # woken, then cancelled: the turn goes to the next
            raise

    async def _connect(self, key: PoolKey, timeout: float | None) -> _Connection:
        scheme, host, port = key
        loop = asyncio.get_running_loop()
        if scheme == "https" and self.ssl_context is None:
            self.ssl_context = ssl.create_default_context()
        context = self.ssl_context if scheme == "https" else None
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(lambda: _Connection(loop, key), host, port, ssl=context,
                                                       server_hostname=host if context is not None else None)
        except TimeoutError as exc:
            raise EngineConnectTimeout(f"no connection to {host}:{port} within {timeout:g} s") from exc
        except ssl.SSLError as exc:
            raise EngineConnectError(f"TLS handshake with {host}:{port} failed: {exc}", "tls_error") from exc
        except ConnectionRefusedError as exc:
            raise EngineConnectError(f"connection to {host}:{port} refused", "connection_refused") from exc
        except OSError as exc:
            raise EngineConnectError(f"no connection to {host}:{port}: {exc}") from exc
        self._loop = loop
        self._live.add(conn)
        return conn

    def _release(self, conn: _Connection) -> None:
        """An exchange on ``conn`` ended: back to the pool when it is reusable, else closed."""
        conn.active = False
        host = self._hosts.get(conn.key)
        if host is None:
            conn.close()
            return
        if conn.reusable and not self._closed:
            host.idle.append(conn)
        else:
            conn.close()
            self._live.discard(conn)
            host.open -= 1
        host.wake_one()

    def abort(self) -> None:
        """Close every connection, from any thread: a read in progress ends at once with a transport error."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._close_live)

    def _close_live(self) -> None:
        for conn in list(self._live):
            conn.close()

    async def aclose(self) -> None:
        """Close every pooled connection; exchanges still being read are closed when they end."""
        self._closed = True
        for host in self._hosts.values():
            for conn in host.idle:
                conn.close()
                self._live.discard(conn)
            host.open -= len(host.idle)
            host.idle.clear()
        await asyncio.sleep(0)  # let the transports' closes run


def _target(url: str) -> tuple[PoolKey, str]:
    """The pool key and request target of an ``http``/``https`` URL (``ValueError`` for anything else, or one to quote)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {scheme or '(none)'}")
    port = parts.port or _DEFAULT_PORTS[scheme]
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if not target.isascii() or any(c <= " " or c == "\x7f" for c in target) or not parts.hostname.isascii():
        raise ValueError("the URL needs quoting first")  # requests quotes it: the synchronous path's
    return (scheme, parts.hostname, port), target
