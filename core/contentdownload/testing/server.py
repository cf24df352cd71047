"""A loopback HTTP/1.1 server for tests, benchmarks, demos and plugin authors.

:class:`LoopbackServer` serves files registered with :meth:`LoopbackServer.add_file` (or a
whole folder, see :meth:`LoopbackServer.mount`) with the parts of RFC 9110 a resumable
downloader depends on: byte ranges (``bytes=a-``, ``bytes=a-b``, ``bytes=-n``), ``416`` with
``Content-Range: bytes */SIZE``, ``If-Range`` (strong ETag or Last-Modified date),
``If-None-Match`` / ``If-Modified-Since`` (``304``), ``If-Match`` / ``If-Unmodified-Since``
(``412``), and optional gzip content coding. Misbehaviour is injected per path with
:class:`Fault` (connection cuts, ignored ranges, changed validators, wrong ``Content-Range``,
short bodies, error statuses with ``Retry-After``, stalls, closes before headers).

Bodies always come from files on disk and are sent with ``os.sendfile``, so the server keeps
up with a client over loopback even for files of several GiB. Every request is recorded
(:attr:`LoopbackServer.requests`) and summarised per path (:meth:`LoopbackServer.stats`).

Only the standard library is used (and the package's own stdlib-only header map). Example::

    from contentdownload.testing.server import Fault, LoopbackServer

    with LoopbackServer() as server:
        url = server.add_file("/papers/a.pdf", b"%PDF-1.7 ...", content_type="application/pdf")
        server.add_fault("/papers/a.pdf", Fault.cut_after(1000))
        ...  # download url; the first attempt is cut after 1000 body bytes
        assert server.stats("/papers/a.pdf").requests == 2

From a shell, ``python -m contentdownload.testing.server --root DIR [--port N]`` serves the
files of ``DIR`` (each at ``/relative/path``) until interrupted and prints its base URL on the
first line of output.
"""

from __future__ import annotations

import argparse
import base64
import collections
import email.utils
import errno
import gzip as _gzip
import hashlib
import hmac
import itertools
import os
import random
import shutil
import signal
import socket
import socketserver
import struct
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from contentdownload.transfer.headers import HeaderFields

__all__ = [
    "DEFAULT_LAST_MODIFIED",
    "Fault",
    "HeaderMap",
    "LoopbackServer",
    "PathStats",
    "RequestRecord",
    "main",
]

#: Last-Modified served when ``add_file`` is not given one (2023-11-14T22:13:20Z).
DEFAULT_LAST_MODIFIED = 1_700_000_000.0

_BLOCK = 1 << 20  # add_large_file generation block
_SMALL_BODY = 1 << 16  # bodies up to this size go out in the same write as the headers
_SENDFILE_CHUNK = 8 << 20
_DISCONNECTS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)
_NOT_FOUND_BODY = b"<html><head><title>404 Not Found</title></head><body><h1>Not Found</h1></body></html>\n"


# --------------------------------------------------------------------------------------------
# Public value types
# --------------------------------------------------------------------------------------------


class HeaderMap(HeaderFields):
    """Read-only request headers with case-insensitive lookups.

    Iteration yields the names as the client sent them. A header sent more than once is
    joined with ``", "``.
    """

    __slots__ = ()


@dataclass(frozen=True)
class RequestRecord:
    """One request the server received, as seen when :attr:`LoopbackServer.requests` was read.

    Attributes:
        method: ``GET``, ``HEAD``, ...
        path: the request path, percent-decoded, without the query string.
        target: the request target exactly as sent (path and query, still encoded).
        headers: request headers (:class:`HeaderMap`, case-insensitive).
        status: status code sent; ``0`` when no status line was sent (yet).
        body_bytes: body bytes actually handed to the connection.
        range: the ``Range`` header value, or ``None``.
        time: arrival time, ``time.time()`` (wall clock, comparable to file timestamps).
        fault: name of the :class:`Fault` applied to this request, or ``None``.
        complete: the whole announced body (or no body) was sent and the exchange finished.
        content_length: the ``Content-Length`` announced, or ``None``.
    """

    method: str
    path: str
    target: str
    headers: HeaderMap
    status: int
    body_bytes: int
    range: str | None
    time: float
    fault: str | None = None
    complete: bool = False
    content_length: int | None = None


@dataclass(frozen=True)
class PathStats:
    """Counters for one path since the server started or :meth:`LoopbackServer.reset_stats`.

    Attributes:
        requests: requests received for the path (any method).
        body_bytes: body bytes actually sent for the path.
        full_bodies: ``200`` responses to ``GET`` whose whole body was sent.
        statuses: the status of each request, in arrival order (``0``: no status line sent).
        ranges: the ``Range`` header of each request, ``None`` where absent.
        conditional: requests carrying ``If-None-Match`` or ``If-Modified-Since``.
    """

    requests: int = 0
    body_bytes: int = 0
    full_bodies: int = 0
    statuses: list[int] = field(default_factory=list)
    ranges: list[str | None] = field(default_factory=list)
    conditional: int = 0


def _signature(secret: bytes, path: str, expires: str) -> str:
    """The signature of a presigned URL of the loopback server: HMAC-SHA256 of the method, path and expiry."""
    return base64.b64encode(hmac.new(secret, f"GET\n{path}\n{expires}".encode(), hashlib.sha256).digest()).decode()


@dataclass(frozen=True)
class Fault:
    """A misbehaviour injected into one response; build one with the class methods.

    Queue faults with :meth:`LoopbackServer.add_fault`. Faults that shape the body
    (``cut_after``, ``short_body``, ``stall``, ``drip``, ``ignore_range``, ``wrong_content_range``)
    apply to file responses; the others apply to any path.
    """

    kind: str
    count: int = 0
    seconds: float = 0.0
    code: int = 0
    retry_after: float | str | None = None
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    data: bytes | None = None
    close: bool = False
    reset: bool = False
    rate: float = 0.0

    @classmethod
    def cut_after(cls, n: int, *, reset: bool = False) -> Fault:
        """Send the normal headers (full ``Content-Length``), then ``n`` body bytes, then close.

        With ``reset=True`` the connection is reset (RST) instead of closed (FIN); the client
        may then lose bytes it had not read yet.
        """
        if n < 0:
            raise ValueError("cut_after needs n >= 0")
        return cls("cut_after", count=n, reset=reset)

    @classmethod
    def short_body(cls, missing: int) -> Fault:
        """Announce the full ``Content-Length`` but send ``missing`` bytes fewer, then close."""
        if missing < 1:
            raise ValueError("short_body needs missing >= 1")
        return cls("short_body", count=missing)

    @classmethod
    def ignore_range(cls) -> Fault:
        """Answer ``200`` with the full body even when ``Range`` was sent."""
        return cls("ignore_range")

    @classmethod
    def ignore_if_range(cls) -> Fault:
        """Honour ``Range`` whatever ``If-Range`` says (a server that splices changed content)."""
        return cls("ignore_if_range")

    @classmethod
    def add_headers(cls, headers: Mapping[str, str]) -> Fault:
        """Answer normally, with these extra response headers (a lying digest, a second Content-Length)."""
        return cls("add_headers", headers=tuple(headers.items()))

    @classmethod
    def change_etag(cls) -> Fault:
        """Before answering, give the file a new ETag and Last-Modified (same content)."""
        return cls("change_etag")

    @classmethod
    def change_content(cls, new_bytes: bytes, *, keep_validators: bool = False) -> Fault:
        """Before answering, replace the file's content (new ETag and Last-Modified).

        With ``keep_validators=True`` the ETag and Last-Modified stay (see :meth:`LoopbackServer.set_content`).
        """
        return cls("change_content", data=bytes(new_bytes), close=keep_validators)

    @classmethod
    def wrong_content_range(cls, delta: int) -> Fault:
        """Answer ``206`` with the requested bytes but a ``Content-Range`` shifted by ``delta``.

        Without a ``Range`` header the whole body is sent as a ``206`` for ``0-`` shifted.
        """
        return cls("wrong_content_range", count=delta)

    @classmethod
    def status(cls, code: int, retry_after: float | str | None = None,
               body: bytes = b"<html>temporarily unavailable</html>",
               headers: Mapping[str, str] | None = None) -> Fault:
        """Answer ``code`` with ``body`` (and ``Retry-After`` when given, in seconds or a date)."""
        return cls("status", code=code, retry_after=retry_after, body=bytes(body),
                   headers=tuple((headers or {}).items()))

    @classmethod
    def stall(cls, seconds: float, after: int = 0, *, close: bool = False) -> Fault:
        """Send the headers and ``after`` body bytes, then pause ``seconds``.

        After the pause the rest of the body is sent, or the connection is closed when
        ``close=True``. Stopping the server ends the pause early and closes the connection.
        """
        return cls("stall", seconds=float(seconds), count=after, close=close)

    @classmethod
    def drip(cls, rate: float, after: int = 0) -> Fault:
        """Send the headers and ``after`` body bytes at full speed, then the rest at ``rate`` bytes a second.

        The rest goes out in pieces of a tenth of ``rate`` (at least one byte), so a client
        sees a steady trickle; stopping the server or a client that hangs up ends it.
        """
        if rate <= 0:
            raise ValueError("drip needs rate > 0")
        return cls("drip", rate=float(rate), count=max(0, after))

    @classmethod
    def delay(cls, seconds: float) -> Fault:
        """Wait ``seconds`` before sending anything, then answer normally."""
        return cls("delay", seconds=float(seconds))

    @classmethod
    def close_before_headers(cls) -> Fault:
        """Read the request, then close the connection without answering."""
        return cls("close_before_headers")


# --------------------------------------------------------------------------------------------
# Internal state
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Variant:
    """One representation of a file: a body on disk plus its validators."""

    body_path: Path
    size: int
    etag: str | None


@dataclass(frozen=True)
class _Entry:
    identity: _Variant
    gzip: _Variant | None
    last_modified: float | None
    content_type: str
    sha256: str | None
    owned: frozenset[Path]  # body files the server created and may delete
    options: tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class _Redirect:
    location: str
    status: int


@dataclass(frozen=True)
class _Status:
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...]


class _Rec:
    __slots__ = ("method", "path", "raw_path", "target", "headers", "status", "body_bytes", "range",
                 "time", "fault", "complete", "content_length")

    def __init__(self, method: str, path: str, raw_path: str, target: str, headers: HeaderMap) -> None:
        self.method = method
        self.path = path
        self.raw_path = raw_path
        self.target = target
        self.headers = headers
        self.status = 0
        self.body_bytes = 0
        self.range = headers.get("Range")
        self.time = time.time()
        self.fault: str | None = None
        self.complete = False
        self.content_length: int | None = None

    def freeze(self) -> RequestRecord:
        return RequestRecord(self.method, self.path, self.target, self.headers, self.status,
                             self.body_bytes, self.range, self.time, self.fault, self.complete,
                             self.content_length)


class _ConnectionGone(Exception):
    """The client went away, or a fault closed the connection on purpose."""


def _format_etag(value: str, weak: bool) -> str:
    value = value.strip()
    if value.startswith("W/"):
        return value
    if not (value.startswith('"') and value.endswith('"') and len(value) >= 2):
        value = f'"{value}"'
    return f"W/{value}" if weak else value


def _parse_etags(header: str) -> list[str]:
    """Entity tags of an If-None-Match / If-Match value (``*`` kept as is)."""
    tags: list[str] = []
    i, n = 0, len(header)
    while i < n:
        while i < n and header[i] in " \t,":
            i += 1
        if i >= n:
            break
        if header[i] == "*":
            tags.append("*")
            i += 1
            continue
        start = i
        if header.startswith("W/", i):
            i += 2
        if i < n and header[i] == '"':
            end = header.find('"', i + 1)
            if end < 0:
                break
            tags.append(header[start:end + 1])
            i = end + 1
        else:  # not a valid entity tag: skip to the next comma
            end = header.find(",", i)
            i = n if end < 0 else end
    return tags


def _opaque(tag: str) -> str:
    return tag[2:] if tag.startswith("W/") else tag


def _weak_match(tag: str, current: str | None) -> bool:
    return current is not None and _opaque(tag) == _opaque(current)


def _strong_match(tag: str, current: str | None) -> bool:
    return current is not None and not tag.startswith("W/") and not current.startswith("W/") and tag == current


def _parse_date(value: str) -> float | None:
    try:
        parsed = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if parsed is None or parsed.tzinfo is None:
        return None
    return parsed.timestamp()


def _sfv_sha256(digest: bytes) -> str:
    return f"sha-256=:{base64.b64encode(digest).decode()}:"


def _hash_range(fd: int, start: int, length: int) -> bytes:
    h = hashlib.sha256()
    while length > 0:
        block = os.pread(fd, min(length, 1 << 20), start)
        if not block:
            break
        h.update(block)
        start += len(block)
        length -= len(block)
    return h.digest()


def _http_date(ts: float) -> str:
    return email.utils.formatdate(ts, usegmt=True)


def _parse_range(header: str | None, size: int) -> tuple[str, int, int]:
    """Interpret a Range header against a body of ``size`` bytes.

    Returns ``("full", 0, size)`` when the header is absent, malformed, multi-range or not in
    bytes; ``("range", start, length)`` for a satisfiable single range; ``("unsatisfiable",
    0, 0)`` otherwise.
    """
    if header is None:
        return "full", 0, size
    unit, sep, spec = header.strip().partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return "full", 0, size
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if len(parts) != 1:
        return "full", 0, size  # multi-range (or empty): answered with the whole body
    first, dash, last = parts[0].partition("-")
    first, last = first.strip(), last.strip()
    if not dash or (first and not first.isdigit()) or (last and not last.isdigit()) or (not first and not last):
        return "full", 0, size
    if not first:  # suffix range
        suffix = int(last)
        if suffix == 0 or size == 0:
            return "unsatisfiable", 0, 0
        start = max(0, size - suffix)
        return "range", start, size - start
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return "full", 0, size  # invalid range spec: ignore the header
    if start >= size:
        return "unsatisfiable", 0, 0
    end = min(end, size - 1)
    return "range", start, end - start + 1


def _accepts_gzip(header: str | None) -> bool:
    if not header:
        return False
    qualities: dict[str, float] = {}
    for item in header.split(","):
        coding, *params = [p.strip() for p in item.split(";")]
        if not coding:
            continue
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        qualities[coding.lower()] = q
    for name in ("gzip", "x-gzip"):
        if name in qualities:
            return qualities[name] > 0
    return qualities.get("*", 0.0) > 0


def _path_key(path: str) -> str:
    if not path.startswith("/"):
        path = "/" + path
    return path


def _large_blocks(size: int, seed: int) -> Iterator[bytes]:
    """Pseudo-random content, fast: one random 1 MiB block, rotated, passed through a per-block
    byte permutation and stamped with the block index, so no two blocks share substrings."""
    base = random.Random(seed).randbytes(_BLOCK)
    index = 0
    remaining = size
    while remaining > 0:
        rng = random.Random(seed * 1_000_003 + index)
        table = list(range(256))
        rng.shuffle(table)
        shift = rng.randrange(_BLOCK)
        block = (base[shift:] + base[:shift]).translate(bytes(table))
        block = index.to_bytes(8, "big") + (seed & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "big") + block[16:]
        if remaining < _BLOCK:
            block = block[:remaining]
        yield block
        remaining -= len(block)
        index += 1


# --------------------------------------------------------------------------------------------
# HTTP plumbing
# --------------------------------------------------------------------------------------------


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], owner: LoopbackServer) -> None:
        self.owner = owner
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name (a DNS lookup); not needed on loopback.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = port

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, _DISCONNECTS) or isinstance(exc, _ConnectionGone):
            return
        if exc is not None:
            self.owner._note_error(exc)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "contentdownload-loopback/1"
    sys_version = ""
    wbufsize = _SMALL_BODY + 8192  # headers and small bodies leave in one write
    server: _HTTPServer

    # -- connection lifecycle ------------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self.server.owner._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        except (OSError, ValueError):
            pass
        finally:
            self.server.owner._track(self.connection, False)

    def handle(self) -> None:
        try:
            super().handle()
        except (_ConnectionGone, *_DISCONNECTS):
            self.close_connection = True
        except Exception as exc:  # recorded for LoopbackServer.errors, never printed
            self.close_connection = True
            self.server.owner._note_error(exc)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def version_string(self) -> str:
        return self.server_version

    # -- dispatch ------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def _not_allowed(self) -> None:
        owner = self.server.owner
        rec = owner._begin(self.command, self.path, self.headers)
        extra = [("Allow", "GET, HEAD")]
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if "Transfer-Encoding" in self.headers or not 0 <= length <= (1 << 20):
            self.close_connection = True  # the request body is left unread
            extra.append(("Connection", "close"))
        elif length:
            self.rfile.read(length)  # drain it so the connection stays usable
        self._simple(rec, 405, b"<html>method not allowed</html>", head=False, extra=extra)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    def _serve(self, head: bool) -> None:
        owner = self.server.owner
        rec = owner._begin(self.command, self.path, self.headers)
        try:
            self._answer(owner, rec, head)
        finally:
            owner._request_ended()

    def _answer(self, owner: LoopbackServer, rec: _Rec, head: bool) -> None:
        try:
            owner._respond(self, rec, head)
            self.wfile.flush()
        except _DISCONNECTS:
            self._close_quietly()
            raise _ConnectionGone() from None
        except _ConnectionGone:
            raise
        except Exception as exc:  # a server-side failure: 500 if nothing was sent yet, then close
            owner._note_error(exc)
            if rec.status == 0:
                try:
                    self._simple(rec, 500, b"<html>internal server error</html>", head,
                                 extra=(("Connection", "close"),))
                except Exception:
                    pass
            self._close_quietly()
            raise _ConnectionGone() from None

    # -- writing helpers -----------------------------------------------------------------

    def _close_quietly(self, reset: bool = False) -> None:
        self.close_connection = True
        sock = self.connection
        if reset:
            # Linger 0 turns the close into an RST; the file objects hold references to the
            # socket, so close them first or the descriptor would outlive this call.
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            for stream in (self.wfile, self.rfile):
                try:
                    stream.close()
                except (OSError, ValueError):
                    pass
            try:
                sock.close()
            except OSError:
                pass
            return
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _head(self, rec: _Rec, status: int, headers: list[tuple[str, str]] | tuple[tuple[str, str], ...],
              content_length: int | None) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        if content_length is not None:
            self.send_header("Content-Length", str(content_length))
        self.end_headers()  # into the write buffer; flushed with the body or explicitly
        rec.status = status
        rec.content_length = content_length

    # Accounting is done just before the bytes are handed to the kernel and undone if that
    # fails, so a client that has received everything never reads stale counters.

    def _flush(self, rec: _Rec, completes: bool) -> None:
        """Send what is buffered (headers, small bodies); ``completes`` marks the exchange done."""
        if completes:
            rec.complete = True
        try:
            self.wfile.flush()
        except BaseException:
            rec.complete = False
            raise

    def _simple(self, rec: _Rec, status: int, body: bytes, head: bool,
                content_type: str = "text/html; charset=utf-8",
                extra: tuple[tuple[str, str], ...] | list[tuple[str, str]] = ()) -> None:
        headers = [("Content-Type", content_type), *extra]
        self._head(rec, status, headers, len(body))
        data = b"" if head else body
        rec.body_bytes += len(data)
        rec.complete = True
        try:
            if data:
                self.wfile.write(data)
            self.wfile.flush()
        except BaseException:
            rec.body_bytes -= len(data)
            rec.complete = False
            raise

    def _send_body(self, rec: _Rec, fd: int, offset: int, count: int, completes: bool) -> int:
        """Send ``count`` bytes of ``fd`` from ``offset``; returns bytes sent (fewer at EOF).

        ``completes``: sending all ``count`` bytes finishes the response.
        """
        if count <= 0:
            self._flush(rec, completes)
            return 0
        if count <= _SMALL_BODY:
            data = os.pread(fd, count, offset)
            done = completes and len(data) == count
            rec.body_bytes += len(data)
            if done:
                rec.complete = True
            try:
                self.wfile.write(data)
                self.wfile.flush()
            except BaseException:
                rec.body_bytes -= len(data)
                rec.complete = False
                raise
            return len(data)
        self._flush(rec, False)
        out = self.connection.fileno()
        sent = 0
        use_sendfile = hasattr(os, "sendfile")
        rate, began = self.server.owner._rate, time.monotonic()
        while sent < count:
            want = min(count - sent, _SENDFILE_CHUNK if use_sendfile else 1 << 20, _SMALL_BODY if rate else count)
            if rate and sent:
                time.sleep(max(0.0, began + sent / rate - time.monotonic()))
            final = completes and sent + want == count
            rec.body_bytes += want
            if final:
                rec.complete = True
            try:
                if use_sendfile:
                    n = os.sendfile(out, fd, offset + sent, want)
                else:
                    chunk = os.pread(fd, want, offset + sent)
                    if chunk:
                        self.connection.sendall(chunk)
                    n = len(chunk)
            except BaseException as exc:
                rec.body_bytes -= want
                rec.complete = False
                if use_sendfile and isinstance(exc, OSError) and exc.errno in (
                        errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSOCK):
                    use_sendfile = False  # e.g. a file system without sendfile support
                    continue
                raise
            if n < want:
                rec.body_bytes -= want - n
                rec.complete = False
            if n == 0:
                break  # the file is shorter than announced
            sent += n
        return sent


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------


def _cleanup(httpd_holder: list, thread_holder: list, tmpdir: str | None) -> None:
    httpd = httpd_holder[0] if httpd_holder else None
    thread = thread_holder[0] if thread_holder else None
    if httpd is not None:
        if thread is not None and thread.is_alive():
            httpd.shutdown()
            thread.join(timeout=10)
        try:
            httpd.server_close()
        except OSError:
            pass
    if tmpdir:
        shutil.rmtree(tmpdir, ignore_errors=True)


class LoopbackServer:
    """A threaded HTTP/1.1 server on loopback serving registered files, statuses and faults.

    Args:
        root: folder where the server stores the bodies it serves (created if missing). When
            ``None`` a temporary folder is used and removed by :meth:`stop`.
        host: address to listen on.
        port: port to listen on; ``0`` picks a free one (see :attr:`base_url`).
        record_requests: keep a :class:`RequestRecord` per request (turn off for long
            benchmark runs; :meth:`stats` and :attr:`requests` are then empty).

    Use it as a context manager (``with LoopbackServer() as server: ...``) or call
    :meth:`start` and :meth:`stop`. Registration methods may be called at any time, before or
    while serving, from any thread. The socket is bound on first use, so :meth:`url` works
    before :meth:`start`.
    """

    def __init__(self, root: Path | None = None, host: str = "127.0.0.1", port: int = 0, *,
                 record_requests: bool = True) -> None:
        self._host = host
        self._port = port
        self._tmpdir: str | None = None
        if root is None:
            self._tmpdir = tempfile.mkdtemp(prefix="contentdownload-loopback-")
            root = Path(self._tmpdir)
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._bodies = self.root / "bodies"
        self._lock = threading.RLock()
        self._files: dict[str, _Entry] = {}
        self._redirects: dict[str, _Redirect] = {}
        self._statuses: dict[str, _Status] = {}
        self._signed: dict[str, bytes] = {}  # path -> the secret its presigned URLs are signed with
        self._mounts: list[tuple[str, Path]] = []
        self._faults: dict[str, collections.deque[list[Any]]] = {}
        self._records: list[_Rec] = []
        self._answering = 0  # requests being answered now
        self._most_at_once = 0
        self._record = record_requests
        self._errors: list[BaseException] = []
        self._conns: set[socket.socket] = set()
        self._generation = itertools.count(1)
        self._stopping = threading.Event()
        self._ended = threading.Condition()  # notified whenever a request's exchange ends
        self._httpd_holder: list[_HTTPServer] = []
        self._thread: threading.Thread | None = None
        self._thread_holder: list[threading.Thread] = []
        self._stopped = False
        self._bound_port: int | None = None
        self._finalizer = weakref.finalize(self, _cleanup, self._httpd_holder, self._thread_holder, self._tmpdir)
        self._rate: float | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def _httpd(self) -> _HTTPServer:
        with self._lock:
            if self._stopped:
                raise RuntimeError("the server was stopped")
            if not self._httpd_holder:
                httpd = _HTTPServer((self._host, self._port), self)
                self._httpd_holder.append(httpd)
                self._bound_port = int(httpd.server_address[1])
            return self._httpd_holder[0]

    def start(self) -> LoopbackServer:
        """Bind (if not yet bound) and serve in a daemon thread; returns ``self``."""
        httpd = self._httpd()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01},
                                                name=f"loopback-server-{self.port}", daemon=True)
                self._thread.start()
                self._thread_holder.append(self._thread)
        return self

    def stop(self) -> None:
        """Stop serving, close open connections and remove the temporary root if one was made.

        Idempotent. Responses in flight are cut; stalled responses wake up and close.
        """
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            thread = self._thread
            httpd = self._httpd_holder[0] if self._httpd_holder else None
        self._stopping.set()
        if httpd is not None and thread is not None and thread.is_alive():
            httpd.shutdown()
            thread.join(timeout=10)
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._finalizer()

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def serve_forever(self) -> None:
        """Serve in the calling thread until :meth:`stop` is called from another thread or a signal."""
        self.start()
        try:
            while not self._stopping.wait(0.2):
                pass
        finally:
            self.stop()

    @property
    def port(self) -> int:
        """The bound port (binds the socket on first use)."""
        if self._bound_port is None:
            self._httpd()
        assert self._bound_port is not None
        return self._bound_port

    @property
    def host(self) -> str:
        """The address listened on."""
        return self._host

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT`` without a trailing slash."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    def url(self, path: str) -> str:
        """The absolute URL of ``path`` (percent-encoded as needed)."""
        return self.base_url + quote(_path_key(path), safe="/!$&'()*+,;=:@-._~")

    @property
    def open_connections(self) -> int:
        """Client connections currently open on the server side."""
        with self._lock:
            return len(self._conns)

    @property
    def errors(self) -> list[BaseException]:
        """Unexpected exceptions raised while handling requests (client disconnects excluded)."""
        with self._lock:
            return list(self._errors)

    # -- registration --------------------------------------------------------------------

    def _new_body_path(self, key: str, suffix: str) -> Path:
        self._bodies.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        return self._bodies / f"{digest}-{next(self._generation)}{suffix}"

    def _write_body(self, key: str, data: bytes) -> Path:
        target = self._new_body_path(key, ".body")
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        return target

    @staticmethod
    def _hash_file(path: Path) -> tuple[str, int]:
        h = hashlib.sha256()
        size = 0
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
                size += len(chunk)
        return h.hexdigest(), size

    def _make_entry(self, key: str, body_path: Path, size: int, sha256: str | None, owned: set[Path],
                    options: dict[str, Any]) -> _Entry:
        etag = options.get("etag")
        weak = options.get("weak_etag", False)
        if options.get("no_etag"):
            identity_etag = None
        elif etag is not None:
            identity_etag = _format_etag(etag, weak)
        else:
            identity_etag = _format_etag(f'"{(sha256 or "")[:16]}"', weak)
        gz_variant = None
        if options.get("gzip"):
            gz_path = self._new_body_path(key, ".gz")
            h = hashlib.sha256()
            with open(body_path, "rb") as src, open(gz_path, "wb") as raw:
                with _gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
                    while chunk := src.read(1 << 20):
                        gz.write(chunk)
            with open(gz_path, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
            owned.add(gz_path)
            gz_etag = None if options.get("no_etag") else _format_etag(f'"gz-{h.hexdigest()[:16]}"', weak)
            gz_variant = _Variant(gz_path, gz_path.stat().st_size, gz_etag)
        last_modified = None if options.get("no_last_modified") else float(options["last_modified"])
        return _Entry(
            identity=_Variant(body_path, size, identity_etag),
            gzip=gz_variant,
            last_modified=last_modified,
            content_type=options.get("content_type", "application/octet-stream"),
            sha256=sha256,
            owned=frozenset(owned),
            options=tuple(options.items()),
        )

    def _install(self, key: str, entry: _Entry) -> None:
        with self._lock:
            old = self._files.get(key)
            self._files[key] = entry
            self._redirects.pop(key, None)
            self._statuses.pop(key, None)
        if old is not None:
            for path in old.owned - entry.owned:
                # Responses in flight keep reading through their open descriptors.
                try:
                    path.unlink()
                except OSError:
                    pass

    def add_file(self, path: str, data: bytes | None = None, *, source: Path | None = None,
                 etag: str | None = None, weak_etag: bool = False, no_etag: bool = False,
                 no_last_modified: bool = False, last_modified: float | None = None,
                 content_type: str = "application/octet-stream", gzip: bool | str = False,
                 headers: Mapping[str, str] | None = None, repr_digest: bool = False,
                 content_digest: bool = False) -> str:
        """Serve a file at ``path`` and return its URL.

        Args:
            path: URL path (``/dir/name.pdf``); a leading ``/`` is added if missing.
            data: the body; stored under :attr:`root`.
            source: serve an existing file instead of ``data`` (not copied; treat it as
                read-only while it is served).
            etag: ETag to serve (quotes added if missing); default ``"<sha256[:16]>"`` of the
                content.
            weak_etag: serve a weak validator ``W/"..."`` (never matches ``If-Range``).
            no_etag: serve no ETag.
            no_last_modified: serve no Last-Modified.
            last_modified: Unix time for Last-Modified; default :data:`DEFAULT_LAST_MODIFIED`.
            content_type: the ``Content-Type`` header.
            gzip: send a gzip-coded body (``Content-Encoding: gzip``, its own ETag, no range
                support) to clients whose ``Accept-Encoding`` allows gzip; ``"always"``: to
                every client, whatever it asked for (as misconfigured servers do).
            headers: extra response headers sent with every answer for this file.
            repr_digest: send ``Repr-Digest: sha-256=:...:`` of the whole representation.
            content_digest: send ``Content-Digest: sha-256=:...:`` of each response's body
                (on a 206, of the partial body only).

        Registering a path again replaces the earlier file, redirect or status.
        """
        if (data is None) == (source is None):
            raise ValueError("give exactly one of data= or source=")
        key = _path_key(path)
        owned: set[Path] = set()
        if data is not None:
            data = bytes(data)
            body_path = self._write_body(key, data)
            owned.add(body_path)
            sha = hashlib.sha256(data).hexdigest()
            size = len(data)
        else:
            body_path = Path(source).resolve()  # type: ignore[arg-type]
            sha, size = self._hash_file(body_path)
        options = {
            "etag": etag, "weak_etag": weak_etag, "no_etag": no_etag, "no_last_modified": no_last_modified,
            "last_modified": DEFAULT_LAST_MODIFIED if last_modified is None else last_modified,
            "content_type": content_type, "gzip": gzip, "headers": tuple((headers or {}).items()),
            "repr_digest": repr_digest, "content_digest": content_digest,
        }
        self._install(key, self._make_entry(key, body_path, size, sha, owned, options))
        return self.url(key)

    def add_large_file(self, path: str, size: int, seed: int = 0, **options: Any) -> tuple[str, str]:
        """Write ``size`` pseudo-random bytes (deterministic for ``seed``) and serve them at ``path``.

        Generation is fast (a random 1 MiB block, rotated and stamped with its index, so the
        content is not periodic). Returns ``(url, sha256 hex)``. Other keyword arguments are
        those of :meth:`add_file` (except ``data`` and ``source``).
        """
        if size < 0:
            raise ValueError("size must be >= 0")
        key = _path_key(path)
        target = self._new_body_path(key, ".body")
        h = hashlib.sha256()
        with open(target, "wb", buffering=0) as fh:
            for block in _large_blocks(size, seed):
                h.update(block)
                fh.write(block)
        sha = h.hexdigest()
        opts = {
            "etag": None, "weak_etag": False, "no_etag": False, "no_last_modified": False,
            "last_modified": DEFAULT_LAST_MODIFIED, "content_type": "application/octet-stream", "gzip": False,
            "headers": (), "repr_digest": False, "content_digest": False,
        }
        unknown = set(options) - set(opts)
        if unknown:
            target.unlink()
            raise TypeError(f"unexpected options: {sorted(unknown)}")
        opts.update(options)
        if opts["last_modified"] is None:
            opts["last_modified"] = DEFAULT_LAST_MODIFIED
        self._install(key, self._make_entry(key, target, size, sha, {target}, opts))
        return self.url(key), sha

    def set_content(self, path: str, data: bytes, *, keep_validators: bool = False) -> None:
        """Replace the bytes of a registered file; its ETag and Last-Modified change.

        Responses already in flight finish with the old bytes. An explicit ``etag=`` given at
        registration is dropped in favour of one derived from the new content. With
        ``keep_validators=True`` the ETag and Last-Modified stay as they were, as with servers
        that derive them from size and mtime when a file is replaced within the same second.
        """
        key = _path_key(path)
        with self._lock:
            entry = self._files.get(key)
        if entry is None:
            raise KeyError(f"no file registered at {key}")
        data = bytes(data)
        body_path = self._write_body(key, data)
        options = dict(entry.options)
        if keep_validators:
            options["etag"] = entry.identity.etag
            options["weak_etag"] = False  # the tag kept is already formatted
        else:
            options["etag"] = None
            options["last_modified"] = self._next_last_modified(entry)
        new = self._make_entry(key, body_path, len(data), hashlib.sha256(data).hexdigest(), {body_path}, options)
        self._install(key, new)

    @staticmethod
    def _next_last_modified(entry: _Entry) -> float:
        previous = dict(entry.options).get("last_modified") or DEFAULT_LAST_MODIFIED
        return float(max(int(time.time()), int(previous) + 1))

    def _change_validators(self, key: str) -> None:
        with self._lock:
            entry = self._files.get(key)
            if entry is None:
                return
            options = dict(entry.options)
            weak = bool(options.get("weak_etag"))
            tag = f"{(entry.sha256 or 'x')[:12]}-v{next(self._generation)}"
            options["etag"] = f'"{tag}"'
            options["last_modified"] = self._next_last_modified(entry)
            no_etag = bool(options.get("no_etag"))
            identity = _Variant(entry.identity.body_path, entry.identity.size,
                                None if no_etag else _format_etag(f'"{tag}"', weak))
            gz = entry.gzip
            if gz is not None:
                gz = _Variant(gz.body_path, gz.size, None if no_etag else _format_etag(f'"gz-{tag}"', weak))
            last_modified = None if options.get("no_last_modified") else options["last_modified"]
            self._files[key] = _Entry(identity, gz, last_modified, entry.content_type, entry.sha256,
                                      entry.owned, tuple(options.items()))

    def add_redirect(self, path: str, location: str, status: int = 302) -> str:
        """Answer requests for ``path`` with ``status`` and ``Location: location``; returns the URL of ``path``.

        ``location`` is sent as given (absolute, or relative such as ``/other``).
        """
        if status not in (301, 302, 303, 307, 308):
            raise ValueError(f"not a redirect status: {status}")
        key = _path_key(path)
        with self._lock:
            self._redirects[key] = _Redirect(location, status)
            self._files.pop(key, None)
            self._statuses.pop(key, None)
        return self.url(key)

    def require_signature(self, path: str, secret: bytes) -> None:
        """Answer ``path`` only to requests presigned with ``secret`` (:meth:`signed_url`) and not
        expired: 403 otherwise, as an object store does. ``path`` must be served already."""
        with self._lock:
            self._signed[_path_key(path)] = secret

    def signed_url(self, path: str, secret: bytes, expires_in: float = 300.0, *, access_key: str = "AKIDLOOPBACK") -> str:
        """A presigned URL of ``path`` in the AWS v2 query style (``AWSAccessKeyId``, ``Expires``,
        ``Signature``); signing again later gives a new ``Expires`` and ``Signature``."""
        path = _path_key(path)
        expires = str(int(time.time() + expires_in))
        query = f"AWSAccessKeyId={access_key}&Expires={expires}&Signature={quote(_signature(secret, path, expires), safe='')}"
        return self.url(path) + "?" + query

    def _signature_refused(self, rec: _Rec) -> bool:
        with self._lock:
            secret = self._signed.get(rec.path)
        if secret is None:
            return False
        query = dict(pair.partition("=")[::2] for pair in urlsplit(rec.target).query.split("&") if pair)
        expires, given = query.get("Expires", ""), unquote(query.get("Signature", ""))
        valid = hmac.compare_digest(given, _signature(secret, rec.path, expires))
        return not (valid and expires.isdigit() and int(expires) >= time.time())

    def add_status(self, path: str, status: int, body: bytes = b"<html>error page</html>",
                   headers: Mapping[str, str] | None = None) -> str:
        """Always answer requests for ``path`` with ``status``, ``body`` and extra ``headers``; returns the URL."""
        key = _path_key(path)
        with self._lock:
            self._statuses[key] = _Status(status, bytes(body), tuple((headers or {}).items()))
            self._files.pop(key, None)
            self._redirects.pop(key, None)
        return self.url(key)

    def remove(self, path: str) -> None:
        """Forget whatever is registered at ``path`` (it then answers 404)."""
        key = _path_key(path)
        with self._lock:
            entry = self._files.pop(key, None)
            self._redirects.pop(key, None)
            self._statuses.pop(key, None)
        if entry is not None:
            for owned in entry.owned:
                try:
                    owned.unlink()
                except OSError:
                    pass

    def mount(self, prefix: str, folder: Path) -> None:
        """Serve the files below ``folder`` at ``prefix/relative/path``.

        Looked up on each request (files may come and go); ETag and Last-Modified come from
        the file's size and modification time. Paths escaping ``folder`` answer 404.
        Registered paths take precedence.
        """
        prefix = "/" + prefix.strip("/")
        with self._lock:
            self._mounts.append((prefix.rstrip("/") + "/", Path(folder).resolve()))

    def add_fault(self, path: str, fault: Fault, times: int = 1) -> None:
        """Queue ``fault`` for the next ``times`` requests to ``path`` (``-1``: every request from then on).

        Faults queued for one path apply in order; each request consumes one application of
        the fault at the head of the queue. A fault queued with ``times=-1`` stays at the head.
        """
        if not isinstance(fault, Fault):
            raise TypeError("fault must be a Fault")
        if times == 0 or times < -1:
            raise ValueError("times must be >= 1, or -1 for every request")
        key = _path_key(path)
        with self._lock:
            self._faults.setdefault(key, collections.deque()).append([fault, times])

    def throttle(self, bytes_per_s: float | None) -> None:
        """Send every body larger than 64 KiB at most ``bytes_per_s`` per response (``None``: as fast as possible).

        Applies to responses started from then on; the bytes go out in blocks of at most 64 KiB,
        so :meth:`stats` ``body_bytes`` follows the transfer closely.
        """
        if bytes_per_s is not None and bytes_per_s <= 0:
            raise ValueError("throttle needs a rate > 0 bytes per second, or None")
        self._rate = bytes_per_s

    def clear_faults(self, path: str | None = None) -> None:
        """Drop the queued faults of ``path``, or of every path."""
        with self._lock:
            if path is None:
                self._faults.clear()
            else:
                self._faults.pop(_path_key(path), None)

    def pending_faults(self, path: str) -> list[tuple[Fault, int]]:
        """Faults still queued for ``path`` with their remaining counts."""
        with self._lock:
            return [(f, n) for f, n in self._faults.get(_path_key(path), ())]

    # -- observation ---------------------------------------------------------------------

    @property
    def requests(self) -> list[RequestRecord]:
        """A snapshot of every request received since start or :meth:`reset_stats`, in arrival order."""
        with self._lock:
            return [r.freeze() for r in self._records]

    def stats(self, path: str) -> PathStats:
        """Counters for ``path`` since start or :meth:`reset_stats`."""
        key = _path_key(path)
        with self._lock:
            recs = [r.freeze() for r in self._records if r.path == key]
        return PathStats(
            requests=len(recs),
            body_bytes=sum(r.body_bytes for r in recs),
            full_bodies=sum(1 for r in recs if r.method == "GET" and r.status == 200 and r.complete
                            and r.content_length is not None and r.body_bytes == r.content_length),
            statuses=[r.status for r in recs],
            ranges=[r.range for r in recs],
            conditional=sum(1 for r in recs if "If-None-Match" in r.headers or "If-Modified-Since" in r.headers),
        )

    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Block until ``predicate()`` holds, checking it each time a request ends; ``False`` after ``timeout`` seconds.

        An event to act on instead of a sleep: ``server.wait_until(lambda: server.stats(p).full_bodies >= 1, 60)``.
        """
        with self._ended:
            return self._ended.wait_for(predicate, timeout)

    def _request_ended(self) -> None:
        with self._lock:
            self._answering -= 1
        with self._ended:
            self._ended.notify_all()

    @property
    def most_at_once(self) -> int:
        """The most requests being answered at the same time since the start (or :meth:`reset_stats`)."""
        with self._lock:
            return self._most_at_once

    def reset_stats(self) -> None:
        """Forget the recorded requests (and so every counter)."""
        with self._lock:
            self._records.clear()
            self._most_at_once = self._answering

    def etag(self, path: str, gzip: bool = False) -> str | None:
        """The ETag currently served for ``path`` (the gzip variant's with ``gzip=True``)."""
        with self._lock:
            entry = self._files[_path_key(path)]
        variant = entry.gzip if gzip else entry.identity
        return variant.etag if variant is not None else None

    def last_modified(self, path: str) -> str | None:
        """The Last-Modified header value currently served for ``path``."""
        with self._lock:
            entry = self._files[_path_key(path)]
        return None if entry.last_modified is None else _http_date(entry.last_modified)

    # -- request handling (called from handler threads) ----------------------------------

    def _note_error(self, exc: BaseException) -> None:
        with self._lock:
            self._errors.append(exc)

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    def _begin(self, method: str, target: str, headers: Any) -> _Rec:
        raw_path = target.split("?", 1)[0] if target.startswith("/") else (urlsplit(target).path or "/")
        rec = _Rec(method, unquote(raw_path, errors="surrogateescape"), raw_path, target, HeaderMap(headers.items()))
        with self._lock:
            self._answering += 1
            self._most_at_once = max(self._most_at_once, self._answering)
            if self._record:
                self._records.append(rec)
        return rec

    def _take_fault(self, rec: _Rec, raw_key: str) -> Fault | None:
        with self._lock:
            for key in (rec.path, raw_key):
                queue = self._faults.get(key)
                if queue:
                    head = queue[0]
                    fault: Fault = head[0]
                    if head[1] > 0:
                        head[1] -= 1
                        if head[1] == 0:
                            queue.popleft()
                    rec.fault = fault.kind
                    return fault
        return None

    def _lookup(self, key: str, raw_key: str) -> tuple[str, Any]:
        with self._lock:
            for k in (key, raw_key):
                if k in self._statuses:
                    return "status", self._statuses[k]
                if k in self._redirects:
                    return "redirect", self._redirects[k]
                if k in self._files:
                    return "file", (k, self._files[k])
            mounts = list(self._mounts)
        for prefix, folder in mounts:
            if not key.startswith(prefix):
                continue
            relative = key[len(prefix):]
            parts = [p for p in relative.split("/") if p]
            if not parts or any(p in (".", "..") or "\x00" in p for p in parts):
                continue
            candidate = folder.joinpath(*parts)
            try:
                resolved = candidate.resolve()
                if not resolved.is_relative_to(folder) or not resolved.is_file():
                    continue
                st = resolved.stat()
            except (OSError, ValueError):
                continue
            entry = _Entry(
                identity=_Variant(resolved, st.st_size, f'"{st.st_size:x}-{st.st_mtime_ns:x}"'),
                gzip=None, last_modified=float(int(st.st_mtime)),
                content_type="application/octet-stream", sha256=None, owned=frozenset(), options=(),
            )
            return "file", (None, entry)
        return "missing", None

    def _respond(self, h: _Handler, rec: _Rec, head: bool) -> None:
        raw_key = rec.raw_path
        if self._signature_refused(rec):
            h._simple(rec, 403, b"<Error><Code>SignatureDoesNotMatch</Code></Error>", head)
            return
        fault = self._take_fault(rec, raw_key)
        if fault is not None:
            if fault.kind == "close_before_headers":
                rec.complete = True
                h._close_quietly()
                raise _ConnectionGone()
            if fault.kind == "delay":
                if self._stopping.wait(fault.seconds):
                    h._close_quietly()
                    raise _ConnectionGone()
            elif fault.kind == "status":
                extra = list(fault.headers)
                if fault.retry_after is not None:
                    retry = fault.retry_after
                    if isinstance(retry, float) and retry.is_integer():
                        retry = int(retry)
                    extra.append(("Retry-After", str(retry)))
                h._simple(rec, fault.code, fault.body, head, extra=extra)
                return
            elif fault.kind == "change_etag":
                file_key = self._file_key(rec.path, raw_key)
                if file_key is not None:
                    self._change_validators(file_key)
            elif fault.kind == "change_content":
                file_key = self._file_key(rec.path, raw_key)
                if file_key is not None:
                    self.set_content(file_key, fault.data or b"", keep_validators=fault.close)

        kind, target = self._lookup(rec.path, raw_key)
        if kind == "status":
            h._simple(rec, target.status, target.body, head, extra=target.headers)
        elif kind == "redirect":
            body = f'<html><a href="{target.location}">moved</a></html>'.encode("utf-8", "replace")
            h._simple(rec, target.status, body, head, extra=(("Location", target.location),))
        elif kind == "file":
            self._respond_file(h, rec, head, target[1], fault)
        else:
            h._simple(rec, 404, _NOT_FOUND_BODY, head)

    def _file_key(self, key: str, raw_key: str) -> str | None:
        with self._lock:
            for k in (key, raw_key):
                if k in self._files:
                    return k
        return None

    @staticmethod
    def _answer_preconditions(h: _Handler, rec: _Rec, head: bool, etag: str | None, lm: float | None,
                              common: list[tuple[str, str]]) -> bool:
        """Answer a failed precondition (412) or a 304, in the order of RFC 9110 section 13.2.2; whether it answered."""
        headers = rec.headers
        if_match = headers.get("If-Match")
        failed = False
        if if_match is not None:
            tags = _parse_etags(if_match)
            failed = not ("*" in tags or any(_strong_match(t, etag) for t in tags))
        elif headers.get("If-Unmodified-Since") is not None and lm is not None:
            since = _parse_date(headers["If-Unmodified-Since"])
            failed = since is not None and int(lm) > since
        if failed:
            h._simple(rec, 412, b"<html>precondition failed</html>", head, extra=common)
            return True
        if_none_match = headers.get("If-None-Match")
        not_modified = False
        if if_none_match is not None:
            tags = _parse_etags(if_none_match)
            not_modified = "*" in tags or any(_weak_match(t, etag) for t in tags)
        elif headers.get("If-Modified-Since") is not None and lm is not None:
            since = _parse_date(headers["If-Modified-Since"])
            not_modified = since is not None and int(lm) <= since
        if not_modified:
            h._head(rec, 304, common, None)
            h._flush(rec, True)
        return not_modified

    def _respond_file(self, h: _Handler, rec: _Rec, head: bool, entry: _Entry, fault: Fault | None) -> None:
        headers = rec.headers
        always = dict(entry.options).get("gzip") == "always"
        use_gzip = entry.gzip is not None and (always or _accepts_gzip(headers.get("Accept-Encoding")))
        variant = entry.gzip if use_gzip else entry.identity
        assert variant is not None
        etag, lm = variant.etag, entry.last_modified
        common: list[tuple[str, str]] = []
        if etag is not None:
            common.append(("ETag", etag))
        if lm is not None:
            common.append(("Last-Modified", _http_date(lm)))
        if entry.gzip is not None:
            common.append(("Vary", "Accept-Encoding"))
        options = dict(entry.options)
        common.extend(options.get("headers", ()))
        if fault is not None and fault.kind == "add_headers":
            common.extend(fault.headers)
        if options.get("repr_digest") and not use_gzip and entry.sha256:
            common.append(("Repr-Digest", _sfv_sha256(bytes.fromhex(entry.sha256))))

        if self._answer_preconditions(h, rec, head, etag, lm, common):
            return

        # Range selection (GET on the identity coding only).
        size = variant.size
        mode, start, length = "full", 0, size
        range_header = headers.get("Range")
        if not head and not use_gzip and range_header is not None:
            if_range = headers.get("If-Range")
            honour = True
            if if_range is not None and (fault is None or fault.kind != "ignore_if_range"):
                value = if_range.strip()
                if value.startswith('"') or value.startswith("W/"):
                    honour = _strong_match(value, etag)
                else:
                    date = _parse_date(value)
                    honour = date is not None and lm is not None and int(lm) == int(date)
            if honour:
                mode, start, length = _parse_range(range_header, size)
        fkind = fault.kind if fault is not None else None
        if fkind == "ignore_range":
            mode, start, length = "full", 0, size
        if fkind == "wrong_content_range" and mode == "full":
            mode = "range"

        ctype = [("Content-Type", entry.content_type)]
        encoding = [("Content-Encoding", "gzip")] if use_gzip else [("Accept-Ranges", "bytes")]
        if mode == "unsatisfiable":
            h._simple(rec, 416, b"<html>range not satisfiable</html>", head,
                      extra=(("Content-Range", f"bytes */{size}"), *common))
            return
        if mode == "range":
            shift = fault.count if fkind == "wrong_content_range" else 0
            first, last = start + shift, start + shift + length - 1
            status = 206
            response_headers = [*ctype, *encoding, ("Content-Range", f"bytes {first}-{last}/{size}"), *common]
        else:
            status = 200
            response_headers = [*ctype, *encoding, *common]

        with self._lock:  # open under the lock: set_content may unlink the old body right after
            fd = os.open(variant.body_path, os.O_RDONLY)
        try:
            if options.get("content_digest") and not head:
                response_headers.append(("Content-Digest", _sfv_sha256(_hash_range(fd, start, length))))
            h._head(rec, status, response_headers, length)
            if head:
                h._flush(rec, fkind != "stall")
                if fkind == "stall":
                    self._stall(h, fault)  # type: ignore[arg-type]
                    rec.complete = True
                return
            self._send_with_fault(h, rec, fd, start, length, fault)
        finally:
            os.close(fd)

    def _stall(self, h: _Handler, fault: Fault) -> None:
        if self._stopping.wait(fault.seconds) or fault.close:
            h._close_quietly()
            raise _ConnectionGone()

    def _drip(self, h: _Handler, rec: _Rec, fd: int, start: int, length: int, fault: Fault) -> int:
        """``fault.count`` bytes at once, then pieces of ``fault.rate / 10`` bytes at ``fault.rate`` bytes a second."""
        sent = h._send_body(rec, fd, start, min(fault.count, length), completes=fault.count >= length)
        piece = max(1, int(fault.rate / 10))
        while sent < length:
            if self._stopping.wait(piece / fault.rate):
                h._close_quietly()
                raise _ConnectionGone()
            n = min(piece, length - sent)
            sent += h._send_body(rec, fd, start + sent, n, completes=sent + n >= length)
        return sent

    def _send_with_fault(self, h: _Handler, rec: _Rec, fd: int, start: int, length: int, fault: Fault | None) -> None:
        fkind = fault.kind if fault is not None else None
        if fkind in ("cut_after", "short_body"):
            assert fault is not None
            n = min(fault.count, length) if fkind == "cut_after" else max(0, length - fault.count)
            h._send_body(rec, fd, start, n, completes=n >= length)
            h._close_quietly(reset=fault.reset)
            raise _ConnectionGone()
        if fkind == "stall":
            assert fault is not None
            first = min(fault.count, length)
            sent = h._send_body(rec, fd, start, first, completes=False)
            self._stall(h, fault)
            sent += h._send_body(rec, fd, start + first, length - first, completes=True)
        elif fkind == "drip":
            assert fault is not None
            sent = self._drip(h, rec, fd, start, length, fault)
        else:
            sent = h._send_body(rec, fd, start, length, completes=True)
        if sent < length:  # the body file shrank under us: the announced length cannot be met
            rec.complete = False
            h._close_quietly()
            raise _ConnectionGone()


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m contentdownload.testing.server --root DIR [--host H] [--port N]``.

    Serves every file below ``DIR`` at ``/relative/path`` until interrupted (Ctrl-C or
    SIGTERM). The first line printed is the base URL.
    """
    parser = argparse.ArgumentParser(prog="python -m contentdownload.testing.server",
                                     description="Serve a folder's files over HTTP/1.1 on loopback "
                                                 "(ranges, conditional requests, keep-alive).")
    parser.add_argument("--root", required=True, type=Path, help="folder whose files are served")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: a free one)")
    args = parser.parse_args(argv)
    folder = args.root
    if not folder.is_dir():
        parser.error(f"--root {folder} is not a folder")
    server = LoopbackServer(host=args.host, port=args.port, record_requests=False)
    server.mount("/", folder)
    try:
        server.start()
    except OSError as exc:
        print(f"cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        server.stop()
        return 1
    print(server.base_url, flush=True)
    print(f"serving {folder.resolve()}; Ctrl-C to stop", file=sys.stderr, flush=True)

    def _terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
