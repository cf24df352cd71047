"""The worker's HTTP client, and how a transport failure is named.

:class:`HttpClient` wraps ``requests`` (imported when a thread first sends through it, so a
run the event-loop engine carries never loads it):

- one :class:`requests.Session` per thread (connection pooling without sharing a session
  across threads);
- a ``User-Agent`` naming the product and its version (or the one given), extra
  headers, cookies and a proxy for every request; TLS verification on by default;
- ``verify`` and ``proxies`` passed with every request, so that what the caller chose
  beats requests' environment merge (``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE``,
  ``HTTP(S)_PROXY``); with nothing chosen those variables and ``~/.netrc`` apply as usual;
- redirects followed by requests, but only to ``http``/``https`` targets (anything else
  raises :class:`~contentdownload.errors.UnsafeRedirectError`), at most ``max_redirects``
  of them, and with the ``Authorization`` header dropped whenever the host, port or
  scheme changes (requests' ``should_strip_auth``; credentials given as URL userinfo are
  turned into that header, so they never travel to another host either);
- urllib3's :class:`~urllib3.util.retry.Retry` on the adapter: connection failures and
  ``429``/``500``/``502``/``503``/``504`` answered before any body byte are retried with
  exponential backoff and ``Retry-After`` (capped at ``max_retry_after``); when the
  retries are spent the last response is returned as is (``raise_on_status=False``), so
  the stage sees the final status. The waits run through :meth:`HttpClient.waiting`, so a
  caller can keep a lease alive and stop on cancellation while the client waits.

URLs are logged only through :func:`~contentdownload.transfer.urls.redact_url`.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import ssl
import threading
import time
import urllib.request
import weakref
from typing import TYPE_CHECKING, Callable, Iterator, Mapping
from urllib.parse import urlsplit

from contentdownload.version import __version__
from contentdownload.errors import TooSlowError, UnsafeRedirectError
from contentdownload.records.log import get_logger
from contentdownload.transfer.digests import WANT_REPR_DIGEST
from contentdownload.transfer.headers import ACCEPT_ENCODING, DEFAULT_MAX_RETRY_AFTER, RETRY_STATUSES
from contentdownload.transfer.polite import ByteRate, HostPacer
from contentdownload.transfer.urls import ALLOWED_SCHEMES, redact_url

if TYPE_CHECKING:  # pragma: no cover
    import http.cookiejar

    import requests

    from contentdownload.transfer.engine import Engine
    from contentdownload.transfer.sessions import PatientRetry

log = get_logger(__name__)

#: A callable the client calls while it waits before a retry (see :meth:`HttpClient.waiting`).
WaitCallback = Callable[[], None]


def default_user_agent() -> str:
    """``contentdownload/<version>``."""
    return f"contentdownload/{__version__}"


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps: ``__cause__``/``__context__`` and urllib3's ``MaxRetryError.reason``."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and len(chain) < 16:
        chain.append(current)
        reason = getattr(current, "reason", None)
        current = reason if isinstance(reason, BaseException) else (current.__cause__ or current.__context__)
    return chain


def request_failure(exc: BaseException) -> tuple[str, str]:
    """Map a transport exception to ``(status, reason)`` for a :class:`~contentdownload.hooks.model.StreamResult`.

    ``status`` is ``retry`` for failures a later attempt may overcome (timeouts, refused or
    reset connections) and ``failed`` for those it cannot (a refused redirect, a bad URL, a
    certificate that does not verify, framing headers that contradict each other). The
    reason names what happened: ``connect_timeout``, ``read_timeout``, ``connection_refused``,
    ``connection_reset``, ``connection_lost``, ``protocol_error``, ``tls_error``, and
    ``too_slow`` or ``max_time`` for a broken speed limit (:class:`~contentdownload.errors.TooSlowError`) ...
    """
    import http.client

    import requests  # a failure of the engine's run names its cause here too: it comes once, on the first one
    import urllib3

    chain = _causes(exc)
    kinds = tuple(type(e) for e in chain)

    def has(*types: type) -> bool:
        return any(issubclass(kind, types) for kind in kinds)

    slow = next((e for e in chain if isinstance(e, TooSlowError)), None)
    if slow is not None:
        return "retry", slow.reason

    if has(UnsafeRedirectError):
        return "failed", "unsafe_redirect"
    if has(requests.exceptions.TooManyRedirects):
        return "failed", "too_many_redirects"
    if has(requests.exceptions.InvalidHeader, urllib3.exceptions.InvalidHeader, http.client.HTTPException) and not has(
        http.client.IncompleteRead, urllib3.exceptions.IncompleteRead
    ):
        return "failed", "protocol_error"
    if has(requests.exceptions.InvalidSchema, requests.exceptions.MissingSchema, requests.exceptions.InvalidURL,
           urllib3.exceptions.LocationParseError):
        return "failed", "invalid_url"
    if has(requests.exceptions.SSLError, urllib3.exceptions.SSLError, ssl.SSLError):
        return "failed", "tls_error"
    if has(ConnectionRefusedError):
        return "retry", "connection_refused"
    if has(ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
        return "retry", "connection_reset"
    # urllib3's NewConnectionError (any failed connect) subclasses ConnectTimeoutError.
    if has(requests.exceptions.ConnectTimeout, urllib3.exceptions.ConnectTimeoutError) and (
        has(TimeoutError, socket.timeout) or not has(urllib3.exceptions.NewConnectionError)
    ):
        return "retry", "connect_timeout"
    if has(urllib3.exceptions.ReadTimeoutError, requests.exceptions.ReadTimeout, requests.exceptions.Timeout, TimeoutError):
        return "retry", "read_timeout"
    if has(requests.exceptions.ContentDecodingError, urllib3.exceptions.DecodeError):
        return "retry", "decode_error"
    if has(requests.exceptions.ChunkedEncodingError, urllib3.exceptions.ProtocolError, http.client.IncompleteRead):
        return "retry", "connection_lost"
    if has(requests.exceptions.ConnectionError, OSError):
        return "retry", "connection_error"
    return "retry", "request_error"


def failure_detail(exc: BaseException) -> str:
    """One line for the log: the innermost cause's type and message, with URLs' secrets removed."""
    inner = _causes(exc)[-1]
    text = " ".join(str(inner).split())[:300]
    text = _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), _PATH_IN_TEXT.sub(r"\1<path>", text))
    return f"{type(inner).__name__}: {text}" if text else type(inner).__name__


_URL_IN_TEXT = re.compile(r"https?://\S+")
_PATH_IN_TEXT = re.compile(r"(url: )\S+")


def __getattr__(name: str) -> object:
    """The header helpers that lived here before :mod:`contentdownload.transfer.headers`, for plugins written against them."""
    from contentdownload.transfer import headers

    if not name.startswith("_") and hasattr(headers, name):
        return getattr(headers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _netrc_exists() -> bool:
    """Whether a netrc file is where ``requests.utils.get_netrc_auth`` looks: ``$NETRC``, else ``~/.netrc`` or ``~/_netrc``."""
    named = os.environ.get("NETRC")
    places = (named,) if named is not None else ("~/.netrc", "~/_netrc")
    return any(os.path.exists(os.path.expanduser(place)) for place in places)


class HttpClient:
    """The HTTP client a worker hands to ``stream_io`` (as ``ctx.http``); thread-safe.

    ``timeout``: (connect, read) seconds for :meth:`get` unless a call gives its own.
    ``retries``: how often a connection failure or a retryable status (``RETRY_STATUSES``)
    answered before the body is retried; ``backoff_factor``: urllib3's exponential
    backoff; ``max_retry_after``: cap on a server's ``Retry-After`` (and on backoff).
    ``verify``: verify TLS certificates (or a CA bundle path). ``max_redirects``: at most
    this many redirects. ``user_agent``: default ``contentdownload/<version>``.
    ``pool_maxsize``: connections kept per host per thread. ``headers``: sent with every
    request (a stage's own headers win). ``cookies``: a cookie jar copied into every
    thread's session. ``proxies``: requests' ``{scheme: proxy URL}`` (empty: the
    environment's proxy variables). ``host_rate``: requests per second per host, spaced
    evenly; ``limit_rate``: body bytes per second of all threads together (see
    :mod:`~contentdownload.transfer.polite`; the pipeline reports body bytes through
    :meth:`received`). Whatever the rates, a ``429``/``503`` with ``Retry-After`` pauses
    every request to that host (:attr:`pacer`, which also lists the hosts that asked).
    """

    def __init__(
        self,
        *,
        timeout: tuple[float, float] = (10.0, 60.0),
        retries: int = 5,
        backoff_factor: float = 0.5,
        verify: bool | str = True,
        max_redirects: int = 10,
        user_agent: str | None = None,
        pool_maxsize: int = 10,
        max_retry_after: float = DEFAULT_MAX_RETRY_AFTER,
        headers: Mapping[str, str] | None = None,
        cookies: http.cookiejar.CookieJar | None = None,
        proxies: Mapping[str, str] | None = None,
        host_rate: float | None = None,
        limit_rate: int | None = None,
    ):
        self.headers = dict(headers or {})
        self.cookies = cookies
        self.proxies = dict(proxies or {})
        self.timeout = (float(timeout[0]), float(timeout[1]))
        self.retries = int(retries)
        self.backoff_factor = float(backoff_factor)
        self.verify = verify
        self.max_redirects = int(max_redirects)
        self.user_agent = user_agent or default_user_agent()
        self.pool_maxsize = max(1, int(pool_maxsize))
        self.max_retry_after = float(max_retry_after)
        self._local = threading.local()
        self._sessions: "weakref.WeakSet[requests.Session]" = weakref.WeakSet()
        self._responses: "weakref.WeakSet[requests.Response]" = weakref.WeakSet()
        self._lock = threading.Lock()
        self.pacer = HostPacer(host_rate, sleep=self._wait)
        self.byte_rate = ByteRate(limit_rate, sleep=self._wait) if limit_rate else None
        #: the process's event-loop engine, set by whoever runs one (see :meth:`engine_for`)
        self.engine: "Engine | None" = None
        self._engine_origins: dict[tuple[str, str], bool] = {}

    def engine_for(self, url: str) -> "Engine | None":
        """:attr:`engine` when it can send this request as requests would, else ``None``.

        ``None`` when there is no engine, and for what only requests does: a scheme other
        than http(s), credentials in the URL, cookies, a host rate or a byte rate (the
        pacer), a host paused by its ``Retry-After``, a proxy (configured, or from the
        environment for this URL with ``NO_PROXY`` honoured), ``~/.netrc`` credentials for the host.
        """
        if self.engine is None or self.cookies is not None or self.pacer.interval or self.byte_rate is not None:
            return None
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ALLOWED_SCHEMES or "@" in parts.netloc or self.pacer.paused(parts.hostname):
            return None
        origin = (scheme, parts.netloc.lower())
        plain = self._engine_origins.get(origin)
        if plain is None:
            plain = self._engine_origins[origin] = self._plain_origin(url)
        return self.engine if plain else None

    def _plain_origin(self, url: str) -> bool:
        """Whether requests would send ``url`` straight to its origin: no proxy, no netrc credentials.

        requests is asked only when it could say no: a proxy is configured or in the
        environment (``urllib.request.getproxies``, which requests reads too), or a netrc
        file exists where requests looks for one.
        """
        if not (self.proxies or urllib.request.getproxies() or _netrc_exists()):
            return True
        import requests.utils

        if requests.utils.select_proxy(url, self.proxies) or requests.utils.select_proxy(url, requests.utils.get_environ_proxies(url)):
            return False
        return requests.utils.get_netrc_auth(url) is None

    def share_rates(self, processes: int) -> None:
        """This client is one of ``processes`` worker processes of a run: keep its share of ``host_rate`` and ``limit_rate``."""
        self.pacer.interval *= processes
        if self.byte_rate is not None:
            self.byte_rate.rate /= processes

    def received(self, n: int) -> None:
        """``n`` body bytes arrived in this thread: wait as ``limit_rate`` says (no-op without one)."""
        if self.byte_rate is not None:
            self.byte_rate.consumed(n)

    @property
    def retry_statuses(self) -> frozenset[int]:
        """Statuses this client already retries before the body (empty when ``retries`` is 0)."""
        return RETRY_STATUSES if self.retries > 0 else frozenset()

    def _retry(self) -> PatientRetry:
        from contentdownload.transfer.sessions import PatientRetry

        return PatientRetry(
            total=self.retries,
            connect=self.retries,
            read=self.retries,
            status=self.retries,
            other=0,
            redirect=False,
            allowed_methods=frozenset({"GET", "HEAD"}),
            status_forcelist=RETRY_STATUSES,
            backoff_factor=self.backoff_factor,
            backoff_max=self.max_retry_after,
            respect_retry_after_header=True,
            raise_on_status=False,
            max_retry_after=self.max_retry_after,
            waiter=self._wait,
            on_retry=self._count_retry,
            pacer=self.pacer,
        )

    def _count_retry(self) -> None:
        self._local.retries = self.retries_made() + 1

    def retries_made(self) -> int:
        """Requests this thread's sessions sent again on their own (urllib3's retries), since the thread began.

        A caller counting attempts takes the difference around its call.
        """
        return getattr(self._local, "retries", 0)

    def request_headers(self) -> dict[str, str]:
        """The headers every request carries: its sessions' headers, and its engine's defaults (:meth:`new_engine`).

        requests' own defaults (``Accept``, ``Connection``), the product's, then the configured
        ``headers`` (each replacing a field of the same name in any spelling).
        """
        headers = {"User-Agent": self.user_agent, "Accept-Encoding": ACCEPT_ENCODING, "Accept": "*/*", "Connection": "keep-alive",
                   "Want-Repr-Digest": WANT_REPR_DIGEST}  # RFC 9530: offer one if you can
        for name, value in self.headers.items():
            for same in [known for known in headers if known.lower() == name.lower()]:
                del headers[same]
            headers[name] = value
        return headers

    def session(self) -> requests.Session:
        """This thread's session (created on first use)."""
        session = getattr(self._local, "session", None)
        if session is None:
            from contentdownload.transfer.sessions import PoliteAdapter, SafeSession

            session = SafeSession()
            session.max_redirects = self.max_redirects
            session.verify = self.verify
            session.headers.update(self.request_headers())
            if self.cookies is not None:
                session.cookies.update(self.cookies)
            adapter = PoliteAdapter(self.pacer, pool_connections=4, pool_maxsize=self.pool_maxsize, max_retries=self._retry())
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            self._local.session = session
            with self._lock:
                self._sessions.add(session)
        return session

    def get(
        self,
        url: str,
        headers: Mapping[str, str] | None = None,
        *,
        timeout: tuple[float, float] | None = None,
        stream: bool = True,
    ) -> requests.Response:
        """Send a GET; returns the final response after redirects (its ``url`` is the final URL).

        The body is not read when ``stream`` (the default): read it from ``response.raw``
        or ``iter_content`` and close the response. Raises requests' exceptions for
        transport failures and :class:`UnsafeRedirectError` for a refused redirect (see
        :func:`request_failure` to turn either into a result).
        """
        scheme = urlsplit(url).scheme.lower()
        if scheme not in ALLOWED_SCHEMES:
            import requests

            raise requests.exceptions.InvalidSchema(f"unsupported URL scheme {scheme or '(none)'!r}: only http and https")
        response = self.session().get(url, headers=dict(headers or {}), timeout=timeout or self.timeout, stream=stream,
                                      allow_redirects=True, verify=self.verify, proxies=self.proxies or None)
        with self._lock:
            self._responses.add(response)
        on_response = getattr(self._local, "on_response", None)
        if on_response is not None:
            on_response(response)
        return response

    def new_engine(self, *, per_host: int) -> "Engine":
        """An event-loop engine for :attr:`engine`, with this client's timeouts, TLS trust and headers; create it on the loop that uses it."""
        from contentdownload.transfer.engine import Engine
        from contentdownload.transfer.options import ssl_context

        return Engine(per_host=per_host, connect_timeout=self.timeout[0], read_timeout=self.timeout[1],
                      ssl_context=ssl_context(self.verify), default_headers=self.request_headers())

    def abort(self) -> None:
        """Shut down the connection of every response still being read, from any thread, the engine's too.

        A read blocked in another thread (a slow or stalled server) returns at once with a
        transport error; used when the run is interrupted.
        """
        if self.engine is not None:
            self.engine.abort()
        with self._lock:
            responses = list(self._responses)
        for response in responses:
            sock = getattr(getattr(response.raw, "connection", None), "sock", None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    # -- waiting ----------------------------------------------------------------------

    @contextlib.contextmanager
    def waiting(self, callback: WaitCallback | None,
                on_response: Callable[[requests.Response], None] | None = None) -> Iterator[None]:
        """While the block runs in this thread, call ``callback()`` during retry waits (at least every half second).

        The callback may raise (for instance ``Cancelled`` or ``LeaseLostError``) to end
        the wait: the exception propagates out of :meth:`get`. ``on_response(response)``
        is called with every response :meth:`get` returns in the block (the progress
        display reads the body's expected size there).
        """
        previous = getattr(self._local, "on_wait", None), getattr(self._local, "on_response", None)
        self._local.on_wait, self._local.on_response = callback, on_response
        try:
            yield
        finally:
            self._local.on_wait, self._local.on_response = previous

    def _wait(self, seconds: float) -> None:
        callback = getattr(self._local, "on_wait", None)
        deadline = time.monotonic() + seconds
        while True:
            if callback is not None:
                callback()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            time.sleep(min(remaining, 0.5))

    def close(self) -> None:
        """Close every thread's session and its pooled connections."""
        with self._lock:
            sessions = list(self._sessions)
            self._sessions = weakref.WeakSet()
        for session in sessions:
            session.close()
        self._local = threading.local()

    def __enter__(self) -> "HttpClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
