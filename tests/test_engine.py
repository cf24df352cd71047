"""The event-loop HTTP/1.1 engine over real loopback sockets: pooling, framing, timeouts, flow control, TLS."""

from __future__ import annotations

import asyncio
import os
import ssl

import pytest

from contentdownload.errors import (
    EngineConnectError,
    EngineConnectionReset,
    EngineIncompleteBody,
    EngineProtocolError,
    EngineReadTimeout,
    TransportError,
)
from contentdownload.testing.server import Fault
from contentdownload.transfer import engine as engine_module
from contentdownload.transfer.engine import Engine, new_event_loop
from contentdownload.transfer.options import ssl_context

DATA = os.urandom(200_000)


LOOPS = {"default": new_event_loop, "asyncio": asyncio.new_event_loop}
_loop_factory = [new_event_loop]


@pytest.fixture(autouse=True, params=list(LOOPS))
def _each_loop(request):
    """Every test runs on the loop the engine picks (uvloop where installed) and on asyncio's own."""
    _loop_factory[0] = LOOPS[request.param]
    yield
    _loop_factory[0] = new_event_loop


def run(coro):
    loop = _loop_factory[0]()
    try:
        return loop.run_until_complete(coro)
    finally:
        left = asyncio.all_tasks(loop)
        for task in left:
            task.cancel()
        if left:
            loop.run_until_complete(asyncio.wait(left))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def make_engine(**kwargs) -> Engine:
    options = {"per_host": 2, "connect_timeout": 5.0, "read_timeout": 5.0, "ssl_context": None, "default_headers": {}}
    return Engine(**{**options, **kwargs})


async def body(exchange) -> bytes:
    return b"".join([bytes(block) async for block in exchange.chunks()])


class Raw:
    """An asyncio server on loopback answering each request with ``answer(request_number)`` (bytes, or a coroutine)."""

    def __init__(self, answer, ssl_context: ssl.SSLContext | None = None, *, close: bool = False):
        self.answer, self.ssl_context, self.close = answer, ssl_context, close
        self.connections = 0
        self.open = 0
        self.most_open = 0
        self.requests: list[bytes] = []
        self.release = asyncio.Event()
        self.handlers: set[asyncio.Task] = set()

    async def __aenter__(self) -> "Raw":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl_context)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        for task in self.handlers:
            task.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)

    def url(self, path: str = "/x", scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}" if scheme == "http" else f"{scheme}://localhost:{self.port}{path}"

    async def _serve(self, reader, writer) -> None:
        self.handlers.add(asyncio.current_task())
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            while True:
                request = await reader.readuntil(b"\r\n\r\n")
                self.requests.append(request)
                reply = self.answer(len(self.requests), self)
                if asyncio.iscoroutine(reply):
                    reply = await reply
                if reply is None:  # hang up
                    break
                writer.write(reply)
                await writer.drain()
                if self.close:  # the reply is all there is
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):  # a cancelled handler just ends
            pass
        finally:
            self.open -= 1
            writer.close()


def ok(data: bytes = DATA, extra: str = "") -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(data)}\r\nX-Twice: a\r\nx-twice: b\r\n{extra}\r\n".encode() + data


def test_keep_alive_connections_are_reused_after_a_body_read_to_its_end():
    async def main():
        async with Raw(lambda n, srv: ok()) as srv:
            engine = make_engine()
            for _ in range(3):
                exchange = await engine.open(srv.url(), {"Accept-Encoding": "identity"})
                assert exchange.status == 200 and exchange.reason == "OK" and await body(exchange) == DATA
                assert exchange.headers.get("x-twice") == "a, b" and "X-TWICE" in exchange.headers
            await engine.aclose()
            return srv

    srv = run(main())
    assert srv.connections == 1 and len(srv.requests) == 3
    first = srv.requests[0].decode()
    assert "GET /x HTTP/1.1\r\n" in first and f"Host: 127.0.0.1:{srv.port}\r\n" in first
    assert "Connection: keep-alive" in first and "Accept-Encoding: identity" in first and "User-Agent: contentdownload/" in first


def test_at_most_per_host_connections_are_open_and_the_others_wait():
    arrived = asyncio.Event()

    async def answer(n, srv):
        if n == 2:
            arrived.set()
        await srv.release.wait()
        return ok(b"x" * 100)

    async def main():
        async with Raw(answer) as srv:
            engine = make_engine(per_host=2)

            async def one():
                return await body(await engine.open(srv.url(), {}))

            tasks = [asyncio.ensure_future(one()) for _ in range(6)]
            await arrived.wait()
            for _ in range(20):  # give a third connection every chance to appear
                await asyncio.sleep(0)
            assert srv.open == 2 and len(srv.requests) == 2
            srv.release.set()
            assert await asyncio.gather(*tasks) == [b"x" * 100] * 6
            await engine.aclose()
            return srv

    srv = run(main())
    assert srv.most_open == 2 and srv.connections == 2 and len(srv.requests) == 6


def test_content_length_body_from_the_loopback_server(server):
    url = server.add_file("/a.bin", DATA)

    async def main():
        engine = make_engine()
        exchange = await engine.open(url, {})
        assert exchange.status == 200 and exchange.headers.get("Content-Length") == str(len(DATA))
        return await body(exchange)

    assert run(main()) == DATA


def test_chunked_body_is_de_chunked():
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"

    async def main():
        async with Raw(lambda n, srv: chunked) as srv:
            engine = make_engine()
            got = [await body(await engine.open(srv.url(), {})) for _ in range(2)]
            return got, srv.connections

    assert run(main()) == ([b"hello world"] * 2, 1)


def test_a_body_until_close_ends_with_the_connection():
    async def main():
        async with Raw(lambda n, srv: b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it", close=True) as srv:
            return await body(await make_engine().open(srv.url(), {}))

    assert run(main()) == b"all of it"


@pytest.mark.parametrize("reply", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 40,
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n wo",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
], ids=["short content-length", "chunk cut", "last chunk missing"])
def test_a_body_cut_short_raises(reply):
    async def main():
        async with Raw(lambda n, srv: reply, close=True) as srv:
            exchange = await make_engine().open(srv.url(), {})
            with pytest.raises(EngineIncompleteBody) as raised:
                await body(exchange)
            return raised.value

    error = run(main())
    assert isinstance(error, TransportError) and error.reason == "short_body"


def test_a_short_body_from_the_loopback_server_raises(server):
    url = server.add_file("/short.bin", DATA)
    server.add_fault("/short.bin", Fault.short_body(1000))

    async def main():
        exchange = await make_engine().open(url, {})
        with pytest.raises(EngineIncompleteBody):
            await body(exchange)
        return exchange.received

    assert run(main()) == len(DATA) - 1000


def test_a_reset_raises(server):
    url = server.add_file("/reset.bin", DATA)
    server.add_fault("/reset.bin", Fault.cut_after(50_000, reset=True))

    async def main():
        exchange = await make_engine().open(url, {})
        with pytest.raises((EngineConnectionReset, EngineIncompleteBody)) as raised:
            await body(exchange)
        return raised.value

    assert isinstance(run(main()), ConnectionError)


def test_headers_that_never_come_time_out():
    async def main():
        async with Raw(lambda n, srv: asyncio.sleep(30)) as srv:
            with pytest.raises(EngineReadTimeout):
                await make_engine(read_timeout=0.2).open(srv.url(), {})

    run(main())


def test_a_body_that_stops_coming_times_out(server):
    url = server.add_file("/stall.bin", DATA)
    server.add_fault("/stall.bin", Fault.stall(30, after=1000))

    async def main():
        exchange = await make_engine(read_timeout=0.2).open(url, {})
        with pytest.raises(EngineReadTimeout):
            await body(exchange)

    run(main())
    server.stop()


def test_an_abandoned_exchange_is_never_reused():
    async def main():
        async with Raw(lambda n, srv: ok()) as srv:
            engine = make_engine(per_host=1)
            exchange = await engine.open(srv.url(), {})
            exchange.abandon()
            assert await body(await engine.open(srv.url(), {})) == DATA
            return srv.connections

    assert run(main()) == 2


def test_a_pooled_connection_the_server_closed_is_replaced():
    async def main():
        async with Raw(_close_after_first) as srv:
            engine = make_engine(per_host=1)
            first = await body(await engine.open(srv.url(), {}))
            second = await body(await engine.open(srv.url(), {}))  # sent on the pooled connection, which the server hangs up
            return first, second, srv.connections

    assert run(main()) == (b"one", b"two", 2)


def test_a_pooled_connection_closed_while_idle_is_not_used():
    async def main():
        async with Raw(lambda n, srv: ok(b"one"), close=True) as srv:
            engine = make_engine(per_host=1)
            first = await body(await engine.open(srv.url(), {}))
            pooled = engine._hosts[("http", "127.0.0.1", srv.port)].idle[0]
            while not pooled.closed:  # until the server's close reaches the idle connection
                await asyncio.sleep(0.001)
            second = await body(await engine.open(srv.url(), {}))
            return first, second, srv.connections, len(srv.requests)

    assert run(main()) == (b"one", b"one", 2, 2)


def _close_after_first(n, srv):
    async def reply():
        return ok(b"one" if n == 1 else b"two")

    if n == 2 and srv.connections == 1:
        return None  # the server hangs up the kept-alive connection instead of answering
    return reply()


def test_a_bad_status_line_is_a_protocol_error():
    async def main():
        async with Raw(lambda n, srv: b"HTTP/1.1 2x0 What\r\n\r\n") as srv:
            with pytest.raises(EngineProtocolError):
                await make_engine().open(srv.url(), {})

    run(main())


def test_a_refused_connection():
    async def main():
        async with Raw(lambda n, srv: ok()) as srv:
            url = srv.url()
        await asyncio.sleep(0.01)
        with pytest.raises(EngineConnectError) as raised:
            await make_engine().open(url, {})
        return raised.value.reason

    assert run(main()) == "connection_refused"


def _chunked(data: bytes, piece: int = 64 << 10) -> bytes:
    pieces = [data[i:i + piece] for i in range(0, len(data), piece)]
    return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"".join(
        b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


async def _until(predicate) -> None:
    for _ in range(400):
        if predicate():
            return
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
def test_reading_pauses_above_the_high_water_mark(monkeypatch, framing):
    monkeypatch.setattr(engine_module, "HIGH_WATER", 64 << 10)
    monkeypatch.setattr(engine_module, "LOW_WATER", 16 << 10)
    big = os.urandom(8 << 20)
    reply = _chunked(big) if framing == "chunked" else ok(big)

    async def main():
        async with Raw(lambda n, srv: reply) as srv:
            exchange = await make_engine().open(srv.url(), {}, block_size=256 << 10)
            conn = exchange._conn
            await _until(lambda: conn.paused or conn.starved)
            assert (conn.paused or conn.starved) and conn.held < 4 << 20  # the rest waits in the kernel and the server
            return await body(exchange)

    assert run(main()) == big


def test_a_sized_body_comes_in_reused_blocks_held_until_given_back(monkeypatch):
    """Straight into blocks: a block held is never overwritten; with every block held, reading stops until one is given back."""
    monkeypatch.setattr(engine_module, "HIGH_WATER", 128 << 10)  # two blocks of 64 KiB
    big = os.urandom(2 << 20)

    async def main():
        async with Raw(lambda n, srv: ok(big)) as srv:
            engine = make_engine()
            held, copies = [], []
            for _ in range(2):  # the second exchange reuses the connection and its blocks
                exchange = await engine.open(srv.url(), {}, block_size=64 << 10)
                async for data, give_back in exchange.blocks():
                    copies.append(bytes(data))
                    if give_back is None:  # parsed with the headers
                        continue
                    held.append((data, give_back, bytes(data)))
                    if len(held) > 3:  # hold a few, then give back the oldest
                        data, give_back, copy = held.pop(0)
                        assert data == copy  # nothing was received into a block still held
                        give_back()
                    if sum(len(d) for d, _, _ in held) >= 128 << 10:
                        await _until(lambda: exchange._conn.starved)
                        assert exchange._conn.starved  # every block held: reading waits
                        held.pop(0)[1]()
                for data, give_back, copy in held:
                    assert data == copy
                    give_back()
                held.clear()
            assert exchange._conn._pool.count <= 3  # two, and at most one more asked for while starved
            return b"".join(copies), srv.connections

    data, connections = run(main())
    assert data == big * 2 and connections == 1


class _Transport:
    """What a connection asks of its transport, recorded."""

    def __init__(self):
        self.paused, self.written = False, []

    def pause_reading(self):
        self.paused = True

    def resume_reading(self):
        self.paused = False

    def write(self, data):
        self.written.append(data)

    def close(self):
        pass


def test_bytes_delivered_while_every_block_is_held_are_kept_in_order(monkeypatch):
    """A transport may still deliver bytes after reading was paused (TLS hands over what it already decrypted):
    they go into one block past the limit, and reading resumes into that block, not a new one."""
    monkeypatch.setattr(engine_module, "HIGH_WATER", 2 << 10)  # two blocks of 1 KiB
    body = os.urandom(5 << 10)
    wire = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body

    def deliver(conn, data):
        while data:
            buffer = conn.get_buffer(-1)
            n = min(len(buffer), len(data))
            buffer[:n] = data[:n]
            conn.buffer_updated(n)
            data = data[n:]

    async def main():
        loop = asyncio.get_running_loop()
        conn = engine_module._Connection(loop, ("http", "x", 80))
        transport = _Transport()
        conn.connection_made(transport)
        conn.start(b"GET / HTTP/1.1\r\n\r\n", 1 << 10)
        header_end = wire.index(b"\r\n\r\n") + 4
        deliver(conn, wire[:header_end + 10])  # the headers and the body's first bytes, parsed
        deliver(conn, wire[header_end + 10:header_end + 2058])  # two blocks: all held now
        assert conn.starved and transport.paused
        deliver(conn, wire[header_end + 2058:header_end + 2558])  # delivered anyway
        got, held = [], []
        for _ in range(3):  # the parsed bytes and the two full blocks; the bytes in the block past the limit stay
            block = conn.take()
            got.append(bytes(block[0]))
            held.append(block[1])
        for give_back in held:
            if give_back is not None:
                give_back()
        await asyncio.sleep(0)  # the loop runs what the give-backs asked for
        assert not conn.starved and not transport.paused
        deliver(conn, wire[header_end + 2558:])
        while (block := conn.take()) is not None:
            got.append(bytes(block[0]))
            if block[1] is not None:
                block[1]()
        return b"".join(got), conn.complete

    assert run(main()) == (body, True)


def test_bytes_after_a_sized_body_end_the_connection_s_reuse():
    async def main():
        async with Raw(lambda n, srv: ok(b"x" * 300_000) + b"HTTP/1.1 200 OK\r\n") as srv:
            engine = make_engine()
            first = await body(await engine.open(srv.url(), {}, block_size=64 << 10))
            second = await body(await engine.open(srv.url(), {}))
            return first, second, srv.connections

    first, second, connections = run(main())
    assert first == second == b"x" * 300_000 and connections == 2


def test_a_second_response_sent_with_the_first_is_never_part_of_its_body():
    """A server answering twice in one write (a response nobody asked for yet): the first body is its
    ``Content-Length`` bytes, and the connection is not reused for what follows."""
    async def main():
        async with Raw(lambda n, srv: ok(b"hello") + ok(b"WORLD")) as srv:
            engine = make_engine()
            first = await body(await engine.open(srv.url(), {}))
            second = await body(await engine.open(srv.url(), {}))
            await engine.aclose()
            return first, second, srv.connections

    assert run(main()) == (b"hello", b"hello", 2)


def test_https_with_the_run_s_ca_bundle(tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_context)
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))

    async def main():
        async with Raw(lambda n, srv: ok(), ssl_context=server_context) as srv:
            trusted = make_engine(ssl_context=ssl_context(str(bundle)))
            got = await body(await trusted.open(srv.url(scheme="https"), {}))
            with pytest.raises(EngineConnectError) as raised:
                await make_engine(ssl_context=ssl_context(True)).open(srv.url(scheme="https"), {})
            unchecked = await body(await make_engine(ssl_context=ssl_context(False)).open(srv.url(scheme="https"), {}))
            return got, raised.value.reason, unchecked

    assert run(main()) == (DATA, "tls_error", DATA)


@pytest.mark.parametrize("url", ["ftp://h/x", "http:///x", "http://h/a b", "http://h/caf\u00e9", "http://h/x\r\nX: y"])
def test_a_url_the_engine_cannot_send_as_is_is_a_value_error(url):
    async def main():
        with pytest.raises(ValueError):
            await make_engine().open(url, {})

    run(main())
