"""What a response's status line means for a transfer, judged once for every plugin.

:func:`classify` maps a status code (and whether the request was ranged or conditional)
to a :class:`Verdict`: carry on with the body (``full`` for ``200``/``203``, ``partial``
for a ``206`` to a ranged request), check a ``416`` to a ranged request
(``range_not_satisfiable``: the part may already be complete), or stop with a
:class:`~contentdownload.hooks.model.StreamResult` status (``not_modified``, ``retry``,
``failed``) and a reason. ``discard_part`` says the part can no longer be trusted.
:class:`Attempt` is the request and result bookkeeping both built-in ``stream_io`` share.
"""

from __future__ import annotations

import functools
import http.client
import time
from typing import TYPE_CHECKING, Any, Literal

import attrs

from contentdownload.errors import NOT_PLUGIN_FAULTS, TooSlowError
from contentdownload.transfer.body import BodyReader, Clock, SpeedGuard
from contentdownload.hooks.model import StagePaths, StreamContext, StreamResult
from contentdownload.transfer.digests import content_digests, representation_digests, server_digests
from contentdownload.transfer.headers import RETRY_STATUSES, content_encoding, content_length, parse_retry_after
from contentdownload.transfer.http import failure_detail, request_failure
from contentdownload.records.log import get_logger
from contentdownload.transfer.urls import redact_url

if TYPE_CHECKING:  # pragma: no cover
    import requests

    from contentdownload.transfer.parts import BodyOutcome, Part, PartStore

log = get_logger(__name__)

Action = Literal["full", "partial", "range_not_satisfiable", "not_modified", "retry", "failed"]


@functools.cache
def transport_errors() -> tuple[type[BaseException], ...]:
    """Errors that end a request or a body read of the synchronous client (mapped to a reason by ``request_failure``).

    A function, so that importing this module loads neither requests nor urllib3: the
    event-loop engine's errors are all :class:`OSError`.
    """
    import requests
    import urllib3

    return (urllib3.exceptions.HTTPError, requests.exceptions.RequestException, http.client.HTTPException, OSError)


def __getattr__(name: str) -> Any:
    """``TRANSPORT_ERRORS``, the tuple :func:`transport_errors` gives, for plugins written before the function."""
    if name == "TRANSPORT_ERRORS":
        return transport_errors()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@attrs.frozen(kw_only=True)
class Verdict:
    """What to do after the status line: ``action``, the ``reason`` for a stop, and whether to drop the part."""

    action: Action
    reason: str = ""
    discard_part: bool = False
    retry_after: float | None = None

    @property
    def stops(self) -> bool:
        """Whether the attempt ends here, without a body."""
        return self.action in ("not_modified", "retry", "failed")


def classify(status: int, *, ranged: bool, conditional: bool, retry_after: str | None = None) -> Verdict:
    """The :class:`Verdict` for ``status`` to a request that was ``ranged`` and/or ``conditional``."""
    if status in (200, 203):
        return Verdict(action="full")
    if status == 206:
        if ranged:
            return Verdict(action="partial")
        return Verdict(action="retry", reason="bad_content_range", discard_part=True)  # never asked for
    if status == 304:
        return Verdict(action="not_modified", reason="not_modified") if conditional else Verdict(action="failed", reason="http_304")
    if status == 412:
        return Verdict(action="retry", reason="precondition_failed", discard_part=True)
    if status == 416:
        if ranged:
            return Verdict(action="range_not_satisfiable")
        return Verdict(action="retry", reason="range_not_satisfiable", discard_part=True)
    if status in RETRY_STATUSES or status == 408:
        return Verdict(action="retry", reason=f"http_{status}", retry_after=parse_retry_after(retry_after))
    return Verdict(action="failed", reason=f"http_{status}")


def is_conditional(headers: dict[str, str]) -> bool:
    return any(name.lower() in ("if-none-match", "if-modified-since") for name in headers)


class Attempt:
    """One ``stream_io`` attempt's bookkeeping: the request, the response fields, the timed result.

    ``guard`` holds the attempt's speed limits (``options.low_speed_limit``,
    ``low_speed_time``, ``max_time``), timed by ``clock`` (a monotonic clock).
    """

    def __init__(self, ctx: StreamContext, headers: dict[str, str], *, clock: Clock = time.monotonic):
        self.ctx, self.headers = ctx, headers
        self.started = time.perf_counter()
        self.guard = SpeedGuard.of(ctx.options, clock)
        self.info: dict[str, Any] = {"url": redact_url(ctx.url)}
        self.digests: tuple = ()

    def elapsed_ms(self) -> float:
        return round((time.perf_counter() - self.started) * 1000.0, 3)

    def result(self, status: str, reason: str, **fields: Any) -> StreamResult:
        return StreamResult(status=status, reason=reason, elapsed_ms=self.elapsed_ms(), **{**self.info, **fields})

    def send(self) -> requests.Response | StreamResult:
        """GET the URL with the headers: the response, or a result when no response came."""
        ctx = self.ctx
        connect, read = ctx.options.timeout
        timeout = (self.guard.timeout(connect, body=False), self.guard.timeout(read, body=False))  # within max_time
        try:
            response = ctx.http.get(ctx.url, self.headers, timeout=timeout)
        except NOT_PLUGIN_FAULTS:  # a lease lost or the store or the disk failing while waiting: no transport error
            raise
        except (*transport_errors(), ValueError) as exc:
            status, reason = request_failure(self._over_max_time(exc))
            log.info("request failed", url=redact_url(ctx.url), reason=reason, detail=failure_detail(exc))
            return self.result(status, reason)
        self.took(response)
        return response

    def took(self, response: Any) -> None:
        """Record what ``response`` (a ``requests`` response or an engine's :class:`~contentdownload.transfer.engine.Exchange`)
        says: status, final URL, type, coding, validators, digests, the time to its headers."""
        self.digests = server_digests(response.headers)
        self.info.update(
            http_status=response.status_code, final_url=redact_url(response.url),
            content_type=response.headers.get("Content-Type"), content_encoding=content_encoding(response),
            etag=response.headers.get("ETag"), last_modified=response.headers.get("Last-Modified"),
            ttfb_ms=self.elapsed_ms(),
            server_digests={d.label: d.value.hex() for d in representation_digests(self.digests)},
        )

    def _over_max_time(self, exc: BaseException) -> BaseException:
        """``exc``, or the :class:`TooSlowError` it became when the request outlived ``max_time``."""
        try:
            if self.guard.max_time is not None:
                self.guard.check()
        except TooSlowError as slow:
            if slow.reason == "max_time":
                return slow
        return exc

    def body_reader(self, response: requests.Response, *, decode: bool = False) -> BodyReader:
        """The body of ``response`` read within this attempt's read timeout and speed limits (``Part.receive``'s source)."""
        return BodyReader(response, guard=self.guard, read_timeout=self.ctx.options.timeout[1], decode=decode)

    def open_part(self, parts: "PartStore", paths: StagePaths, **kwargs: Any) -> "Part":
        """Open the part for this response's body (:meth:`PartStore.open`), checking its ``Content-Digest``."""
        part = parts.open(paths, **kwargs)
        if self.info.get("content_encoding") is None:  # a content digest covers the coded bytes
            part.check_body_digest(content_digests(self.digests))
        return part

    def verdict(self, response: requests.Response, *, ranged: bool) -> Verdict:
        return classify(response.status_code, ranged=ranged, conditional=is_conditional(self.headers),
                        retry_after=response.headers.get("Retry-After"))

    def stopped(self, verdict: Verdict) -> StreamResult:
        """The result of a verdict that ends the attempt."""
        fields = {"retry_after": verdict.retry_after} if verdict.retry_after is not None else {}
        return self.result(verdict.action, verdict.reason, **fields)

    def body_result(self, part: "Part", outcome: "BodyOutcome", response: requests.Response, *,
                    offset: int, expected_body: int | None) -> StreamResult:
        """Close ``part`` after :meth:`Part.receive` and say how the body ended.

        ``complete`` only when the body has the announced length (for a decoded body,
        the raw bytes read equal ``Content-Length``); else the part is kept for a retry.
        """
        received = part.position - offset
        fields = {"bytes_written": received, "resumed_from": offset, "total_size": part.position}
        if outcome.too_large:
            return self.result("failed", "too_large", bytes_written=self.ctx.effects.bytes_written)
        if outcome.overlap_mismatch:
            return self.result("retry", "overlap_mismatch", **fields)
        if outcome.error is not None:
            part.abandon()
            _, reason = request_failure(outcome.error)
            log.info("transfer interrupted", url=redact_url(self.ctx.url), reason=reason, committed=part.position,
                     detail=failure_detail(outcome.error))
            if _is_incomplete_read(outcome.error) or (expected_body is not None and received < expected_body and reason == "connection_lost"):
                reason = "short_body"
            return self.result("retry", reason, **fields)
        raw_length = content_length(response)
        decoded = content_encoding(response) is not None
        if (expected_body is not None and received != expected_body) or (decoded and raw_length is not None and response.raw.tell() != raw_length):
            part.abandon()
            return self.result("retry", "short_body", **fields)
        wrong = part.body_digest_mismatch()
        if wrong is not None:
            part.discard()
            log.warning("the body does not match its Content-Digest", url=redact_url(self.ctx.url), digest=wrong.label)
            return self.result("failed", "digest_mismatch", **fields)
        checked = tuple(d.label for d in part.body_digest.digests) if part.body_digest is not None else ()
        return self.result("complete", "complete", sha256=part.close(), verified_by=checked, **fields)


def _is_incomplete_read(exc: BaseException | None) -> bool:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, http.client.IncompleteRead) or any(isinstance(a, http.client.IncompleteRead) for a in getattr(exc, "args", ())):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
