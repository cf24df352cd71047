"""The synchronous client's ``requests`` machinery: retries, the pacer's adapter, the redirect-checking session.

Imported by :meth:`HttpClient.session <contentdownload.transfer.http.HttpClient.session>` when
a thread first sends a request through ``requests``, so a run the event-loop engine carries
never imports ``requests`` or urllib3.
"""

from __future__ import annotations

import time
from typing import Any, Callable
from urllib.parse import urljoin, urlsplit

import requests
import requests.adapters
from urllib3.exceptions import InvalidHeader
from urllib3.util.retry import Retry

from contentdownload.errors import UnsafeRedirectError
from contentdownload.records.log import get_logger
from contentdownload.transfer.headers import DEFAULT_MAX_RETRY_AFTER, PAUSE_STATUSES
from contentdownload.transfer.polite import HostPacer
from contentdownload.transfer.urls import ALLOWED_SCHEMES, redact_url

log = get_logger(__name__)


# -- retries --------------------------------------------------------------------------


class PatientRetry(Retry):
    """urllib3's ``Retry`` with a cap on ``Retry-After``, waits through a callback, and the host's pacer.

    ``max_retry_after`` caps what a server may ask for (and backoff). ``waiter(seconds)``
    does the waiting (default :func:`time.sleep`); :class:`HttpClient` passes one that
    slices the wait and calls the thread's wait callback between slices. ``on_retry()`` is
    called for every request sent again. ``pacer`` (a :class:`HostPacer`) is told of a
    ``429``/``503`` with ``Retry-After`` (every worker pauses on that host), and a request
    sent again waits for its turn there like any other.
    """

    def __init__(self, *args: Any, max_retry_after: float = DEFAULT_MAX_RETRY_AFTER,
                 waiter: Callable[[float], None] | None = None, on_retry: Callable[[], None] | None = None,
                 pacer: HostPacer | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.max_retry_after = float(max_retry_after)
        self.waiter = waiter or time.sleep
        self.on_retry, self.pacer = on_retry, pacer
        self.host: str | None = None  # the host of the request to send again (set by increment)

    def new(self, **kw: Any) -> "PatientRetry":
        """A copy with ``kw`` changed, keeping the cap, the waiter, the callbacks and the host."""
        new = super().new(**kw)
        new.max_retry_after = self.max_retry_after
        new.waiter = self.waiter
        new.on_retry, new.pacer, new.host = self.on_retry, self.pacer, self.host
        return new

    def increment(self, method: str | None = None, url: str | None = None, response: Any = None, error: Exception | None = None,
                  _pool: Any = None, _stacktrace: Any = None) -> "PatientRetry":
        """urllib3's count of one more try (``MaxRetryError`` when none is left); notes the host's pause first."""
        host = getattr(_pool, "host", None)
        if self.pacer is not None and response is not None and response.status in PAUSE_STATUSES:
            delay = self.get_retry_after(response)
            if delay is not None:
                self.pacer.pause(host, delay)
        new = super().increment(method, url, response, error, _pool, _stacktrace)
        new.host = host
        if self.on_retry is not None:
            self.on_retry()
        return new

    def get_retry_after(self, response: Any) -> float | None:
        """``Retry-After`` in seconds, capped at ``max_retry_after``; ``None`` when absent or malformed."""
        try:
            value = super().get_retry_after(response)
        except InvalidHeader:
            return None
        return None if value is None else min(float(value), self.max_retry_after)

    def sleep(self, response: Any = None) -> None:
        """Wait before the next try: the server's ``Retry-After`` when it sent one, else the backoff."""
        delay = self.get_retry_after(response) if (self.respect_retry_after_header and response is not None) else None
        if delay is None:
            delay = min(self.get_backoff_time(), self.max_retry_after)
        status = getattr(response, "status", None)
        log.info("http_retry", status=status, delay_s=round(delay, 3), retry=len(self.history))
        if delay > 0:
            self.waiter(delay)
        if self.pacer is not None:
            self.pacer.wait_turn(self.host)


class PoliteAdapter(requests.adapters.HTTPAdapter):
    """requests' adapter whose every request (redirects included) first waits for its turn at the host's pacer."""

    def __init__(self, pacer: HostPacer, **kwargs: Any):
        self.pacer = pacer
        super().__init__(**kwargs)

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        self.pacer.wait_turn(urlsplit(request.url or "").hostname)
        return super().send(request, *args, **kwargs)


# -- sessions -------------------------------------------------------------------------


class SafeSession(requests.Session):
    """A session that follows redirects only to http(s) targets.

    Authorization is stripped on a change of host, port or scheme by requests itself
    (``rebuild_auth``/``should_strip_auth``); this class adds the scheme check.
    """

    def __init__(self) -> None:
        super().__init__()
        self._environment: dict[tuple, dict] = {}

    def merge_environment_settings(self, url: str, proxies: Any, stream: Any, verify: Any, cert: Any) -> dict:
        """requests' merge of ``HTTP(S)_PROXY``/``NO_PROXY`` and the CA variables, read once per origin instead of per request."""
        parts = urlsplit(url)
        key = (parts.scheme, parts.netloc.rpartition("@")[2].lower(), tuple(sorted((proxies or {}).items())), stream, verify, cert)
        found = self._environment.get(key)
        if found is None:
            found = self._environment[key] = super().merge_environment_settings(url, proxies, stream, verify, cert)
        return dict(found, proxies=dict(found["proxies"]))

    def get_redirect_target(self, resp: requests.Response) -> str | None:
        """The redirect target, or raise :class:`UnsafeRedirectError` when it is not http(s)."""
        location = super().get_redirect_target(resp)
        if location is None:
            return None
        target = urljoin(resp.url, location.strip()) if not location.startswith("//") else f"{urlsplit(resp.url).scheme}:{location}"
        scheme = urlsplit(target).scheme.lower()
        if scheme not in ALLOWED_SCHEMES:
            shown = redact_url(target)
            resp.close()
            log.warning("refused a redirect to a non-http(s) URL", url=redact_url(resp.url), location=shown)
            raise UnsafeRedirectError(f"refused redirect from {redact_url(resp.url)} to {shown}: only http and https are followed", shown)
        log.debug("following a redirect", url=redact_url(resp.url), location=redact_url(target), status=resp.status_code)
        return location
