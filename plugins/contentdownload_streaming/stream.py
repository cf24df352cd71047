"""``stream_io`` of the streaming plugin: the status line decides, then large-chunk streaming to the part.

Nothing is written before the status line and headers are judged:

- ``206``: ``Content-Range`` must start at the resume offset, end at the last byte and
  announce the total recorded in the sidecar (and an ``ETag``, when sent, must be the one
  resumed from); the part's prefix is hashed and the new bytes appended. Anything else
  is ``bad_content_range`` (part dropped, retry).
- ``200`` (also to a ranged request: validator changed or Range ignored): the part is
  truncated and written from byte 0.
- ``304`` to a conditional request: ``not_modified``, no body read.
- ``416``: ``complete`` when the part already holds the whole representation, else the
  part is dropped and the attempt retried (``range_not_satisfiable``).
- ``412``: part and sidecar dropped, ``retry`` (``precondition_failed``) so the next
  decision goes fresh without validators.
- ``408``, ``429`` and ``5xx``: ``retry`` (with ``Retry-After``); other statuses ``failed``
  with ``http_<code>``. Error bodies are never read into the part.

The body is read with ``response.raw.read`` in blocks of ``options.chunk_size``
(decoded for gzip/deflate, which makes the part not resumable) and appended to the part
through the core's part store in ``durable`` mode (hashed, in a second thread for large
bodies); every ``options.checkpoint_bytes`` the part is checkpointed in the background
(fsync, then the sidecar's committed count) and the lease heart-beaten. A transfer that stops early (timeout, lost connection, short
body, cancellation) leaves the part and an up-to-date sidecar behind.
"""

from __future__ import annotations

import requests

from contentdownload import StreamContext, StreamResult, hookimpl
from contentdownload.errors import UnsafePathError
from contentdownload.transfer.http import ACCEPT_ENCODING, content_encoding, content_length, decodable, http_date, is_strong_etag, parse_content_range
from contentdownload.records.log import get_logger
from contentdownload.transfer.parts import PartStore, Sidecar, url_identity
from contentdownload.transfer.status import TRANSPORT_ERRORS, Attempt
from contentdownload.transfer.urls import redact_url

log = get_logger("contentdownload.streaming")


def _without(headers: dict[str, str], name: str) -> None:
    for key in [k for k in headers if k.lower() == name]:
        del headers[key]


def request_headers(ctx: StreamContext) -> tuple[dict[str, str], int]:
    """The headers to send and the offset the part continues from (0 when not ranged).

    A range without a validator could splice two versions of a file: one is added, or
    the file is fetched whole.
    """
    decision = ctx.decision
    headers = dict(decision.headers)
    ranged = any(name.lower() == "range" for name in headers)
    offset = decision.offset if (decision.mode == "resume" and ranged) else 0
    if decision.mode == "resume" and not ranged and decision.offset > 0:
        headers["Range"] = f"bytes={decision.offset}-"
        ranged, offset = True, decision.offset
    if ranged and not any(name.lower() == "if-range" for name in headers):
        validator = decision.etag if is_strong_etag(decision.etag) else http_date(decision.last_modified)
        if validator:
            headers["If-Range"] = validator
        else:
            _without(headers, "range")
            ranged, offset = False, 0
    if ranged:
        _without(headers, "accept-encoding")
        headers["Accept-Encoding"] = "identity"
    elif not any(name.lower() == "accept-encoding" for name in headers):
        headers["Accept-Encoding"] = ACCEPT_ENCODING
    return headers, (offset if ranged else -1)


class _Transfer:
    """One ``stream_io`` call."""

    def __init__(self, ctx: StreamContext):
        self.ctx = ctx
        headers, offset = request_headers(ctx)
        self.ranged, self.offset = offset >= 0, max(offset, 0)
        self.attempt = Attempt(ctx, headers)
        self.attempt.info["resumed_from"] = 0
        self.parts = PartStore.for_paths(ctx.paths, mode="durable")

    def result(self, status: str, reason: str, **fields) -> StreamResult:
        return self.attempt.result(status, reason, **fields)

    def run(self) -> StreamResult:
        response = self.attempt.send()
        if isinstance(response, StreamResult):
            log.info("request failed", url=redact_url(self.ctx.url), reason=response.reason)
            return response
        try:
            return self.judge(response)
        finally:
            response.close()

    def judge(self, response: requests.Response) -> StreamResult:
        """Decide from the status line and headers; stream the body only for 200/206."""
        verdict = self.attempt.verdict(response, ranged=self.ranged)
        if verdict.discard_part:
            self.parts.discard(self.ctx.paths)
        if verdict.stops:
            return self.attempt.stopped(verdict)
        if verdict.action == "range_not_satisfiable":
            return self.range_not_satisfiable(response)
        if verdict.action == "partial":
            return self.partial(response)
        if not decodable(content_encoding(response)):
            return self.result("failed", "unsupported_encoding")
        if self.ranged:
            log.info("full body to a ranged request, restarting the part", url=redact_url(self.ctx.url), offset=self.offset)
        return self.body(response, offset=0, total=content_length(response) if content_encoding(response) is None else None)

    def range_not_satisfiable(self, response: requests.Response) -> StreamResult:
        ctx, paths = self.ctx, self.ctx.paths
        announced = parse_content_range(response.headers.get("Content-Range"))
        total = announced.total if announced is not None else None
        expected = ctx.decision.expected_total
        part_size = PartStore.part_size(paths)
        if total is not None and self.offset == total and (part_size or -1) >= total and expected in (None, total):
            sha256 = self.parts.truncate(paths, total)
            log.info("part already complete", url=redact_url(ctx.url), size=total)
            return self.result("complete", "already_complete", sha256=sha256, total_size=total, resumed_from=self.offset)
        self.parts.discard(paths)
        return self.result("retry", "range_not_satisfiable")

    def _continues_part(self, response: requests.Response) -> bool:
        announced = parse_content_range(response.headers.get("Content-Range"))
        expected = self.ctx.decision.expected_total
        length = content_length(response)
        sent_etag, known_etag = response.headers.get("ETag"), self.ctx.decision.etag
        return (
            (not sent_etag or not known_etag or sent_etag.strip() == known_etag.strip())
            and announced is not None
            and announced.start == self.offset
            and announced.total is not None
            and announced.end == announced.total - 1
            and (expected is None or announced.total == expected)
            and (length is None or length == announced.length)
            and content_encoding(response) is None
        )

    def partial(self, response: requests.Response) -> StreamResult:
        ctx, paths = self.ctx, self.ctx.paths
        if not self._continues_part(response):
            log.warning("rejected a 206 whose Content-Range does not continue the part", url=redact_url(ctx.url),
                        content_range=response.headers.get("Content-Range"), offset=self.offset,
                        expected_total=ctx.decision.expected_total)
            self.parts.discard(paths)
            return self.result("retry", "bad_content_range")
        if (PartStore.part_size(paths) or -1) < self.offset:
            self.parts.discard(paths)
            return self.result("retry", "part_changed")
        announced = parse_content_range(response.headers.get("Content-Range"))
        assert announced is not None
        return self.body(response, offset=self.offset, total=announced.total)

    def _refuse_size(self, total: int | None) -> StreamResult | None:
        ctx = self.ctx
        if ctx.options.max_bytes is not None and total is not None and total > ctx.options.max_bytes:
            self.parts.discard(ctx.paths)
            return self.result("failed", "too_large", total_size=None)
        if ctx.job.size is not None and total is not None and total != ctx.job.size:
            self.parts.discard(ctx.paths)
            log.warning("server announces another size than the job expects", url=redact_url(ctx.url), announced=total, expected=ctx.job.size)
            return self.result("failed", "size_mismatch")
        return None

    def _sidecar(self, response: requests.Response, offset: int, total: int | None) -> Sidecar:
        decision, encoding = self.ctx.decision, content_encoding(response)
        accept_ranges = (response.headers.get("Accept-Ranges") or "").strip().lower()
        return Sidecar(
            url=url_identity(self.ctx.url), committed=offset,
            etag=response.headers.get("ETag") or (decision.etag if offset else None),
            last_modified=http_date(response.headers.get("Last-Modified")) or (decision.last_modified if offset else None),
            expected_total=total, content_encoding=encoding,
            resumable=encoding is None and accept_ranges != "none", final_url=redact_url(response.url),
        )

    def body(self, response: requests.Response, *, offset: int, total: int | None) -> StreamResult:
        """Write the body to the part from ``offset`` (appending to a hashed prefix when > 0)."""
        ctx, options = self.ctx, self.ctx.options
        refused = self._refuse_size(total)
        if refused is not None:
            return refused
        try:
            part = self.parts.open(ctx.paths, offset=offset, meta=self._sidecar(response, offset, total), expected_size=total)
        except UnsafePathError as exc:
            return self.result("failed", exc.reason)
        self.attempt.info["resumed_from"] = offset
        chunk = max(4096, int(options.chunk_size))
        decode = content_encoding(response) is not None
        try:
            outcome = part.receive(lambda: response.raw.read(chunk, decode_content=decode), effects=ctx.effects,
                                   progress=ctx.progress, max_bytes=options.max_bytes,
                                   checkpoint_every=max(chunk, int(options.checkpoint_bytes)),
                                   heartbeat=ctx.lease.heartbeat, errors=TRANSPORT_ERRORS)
        except BaseException:
            part.abandon()  # cancelled, lease lost, disk full...: leave a part the next attempt can trust
            raise
        if outcome.too_large:
            log.warning("body larger than max_bytes, aborted", url=redact_url(ctx.url), max_bytes=options.max_bytes)
        return self.attempt.body_result(part, outcome, response, offset=offset,
                                        expected_body=(total - offset) if total is not None else None)


@hookimpl
def stream_io(ctx: StreamContext) -> StreamResult:
    """Carry out the decision: one request, the status line judged first, the body streamed to the part."""
    return _Transfer(ctx).run()
