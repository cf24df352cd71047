"""``stream_io`` of the streaming plugin: the status line decides, then large-chunk streaming to the part.

Nothing is written before the status line and headers are judged:

- ``206``: ``Content-Range`` must start where the range began (the overlap before the
  resume offset), end at the last byte and announce the total recorded in the sidecar
  (else ``bad_content_range``), and each validator the part recorded (ETag,
  Last-Modified) must be the response's (else ``validator_changed``); either way the part
  is dropped and the next attempt fetches the file whole. Then the part store compares
  the overlap with the part's tail (``overlap_mismatch`` when the origin changed) and
  appends the rest.
- ``200`` (also to a ranged request: validator changed or Range ignored): the part is
  truncated and written from byte 0.
- ``304`` to a conditional request: ``not_modified``, no body read.
- ``416``: the part is longer than the file (the overlap starts past its end): dropped,
  retried (``range_not_satisfiable``). A part that already holds the whole file gets a
  ``206`` of the overlap alone and is complete.
- ``412``: part and sidecar dropped, ``retry`` (``precondition_failed``) so the next
  decision goes fresh without validators.
- ``408``, ``429`` and ``5xx``: ``retry`` (with ``Retry-After``); other statuses ``failed``
  with ``http_<code>``. Error bodies are never read into the part.

The body is read by the core's :class:`~contentdownload.transfer.body.BodyReader` into
reused buffers of ``options.chunk_size`` (decoded for gzip/deflate, which makes the part
not resumable), within the read timeout and the attempt's speed limits
(``low_speed_limit``/``low_speed_time``: ``too_slow``, ``max_time``), and appended to the
part through the core's part store in ``durable`` mode (written whole, hashed in a second
thread for large bodies, its writeback started early); every ``options.checkpoint_bytes``
the part is checkpointed in the background (fdatasync, then the sidecar's committed
count) and the lease heart-beaten. A transfer that stops early (timeout, too slow, lost
connection, short body, cancellation) leaves the part and an up-to-date sidecar behind.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from contentdownload import StreamContext, StreamResult, hookimpl
from contentdownload.errors import UnsafePathError
from contentdownload.transfer.headers import ACCEPT_ENCODING, content_encoding, content_length, decodable, parse_content_range
from contentdownload.records.log import get_logger
from contentdownload.transfer.parts import PartStore, Sidecar, url_identity
from contentdownload.transfer.status import Attempt, transport_errors
from contentdownload.transfer.urls import redact_url
from contentdownload.transfer.validators import Validators, partial_problem, resume_start

if TYPE_CHECKING:  # pragma: no cover
    import requests

log = get_logger("contentdownload.streaming")


def _without(headers: dict[str, str], name: str) -> None:
    for key in [k for k in headers if k.lower() == name]:
        del headers[key]


def request_headers(ctx: StreamContext) -> tuple[dict[str, str], int]:
    """The headers to send and the offset the part continues from (-1 when not ranged).

    A resume always asks for the overlap before its offset (``Range: bytes=START-`` with
    START from :func:`~contentdownload.transfer.validators.resume_start`), whatever range
    the decision named, and never sends a weak ETag in ``If-Range``; the overlap check,
    not the validator, is what finally allows the splice.
    """
    decision = ctx.decision
    headers = dict(decision.headers)
    offset = decision.offset if decision.mode == "resume" else 0
    if offset <= 0:
        _without(headers, "range")
        _without(headers, "if-range")
        if not any(name.lower() == "accept-encoding" for name in headers):
            headers["Accept-Encoding"] = ACCEPT_ENCODING
        return headers, -1
    _without(headers, "range")
    headers["Range"] = f"bytes={resume_start(offset)}-"
    if any(n.lower() == "if-range" and v.strip().startswith("W/") for n, v in headers.items()):
        _without(headers, "if-range")
    _without(headers, "accept-encoding")
    headers["Accept-Encoding"] = "identity"
    return headers, offset


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
        """A ``416``: even the overlap lies past the end, so the part is longer than the file. Drop it."""
        self.parts.discard(self.ctx.paths)
        return self.result("retry", "range_not_satisfiable")

    def _partial_problem(self, response: requests.Response) -> str | None:
        """Why a ``206`` cannot continue the part (see :func:`~contentdownload.transfer.validators.partial_problem`)."""
        decision = self.ctx.decision
        recorded = Validators(etag=decision.etag, last_modified=decision.last_modified)
        problem = partial_problem(response.headers, resume_start(self.offset), recorded, decision.expected_total)
        if problem is not None:
            return problem
        announced = parse_content_range(response.headers.get("Content-Range"))
        assert announced is not None
        length = content_length(response)
        if announced.total is None or announced.end != announced.total - 1 or (length is not None and length != announced.length):
            return "bad_content_range"
        return "bad_content_range" if content_encoding(response) is not None else None

    def partial(self, response: requests.Response) -> StreamResult:
        ctx, paths = self.ctx, self.ctx.paths
        problem = self._partial_problem(response)
        if problem is not None:
            log.warning("rejected a 206 that does not continue the part", url=redact_url(ctx.url), reason=problem,
                        content_range=response.headers.get("Content-Range"), etag=response.headers.get("ETag"),
                        last_modified=response.headers.get("Last-Modified"), offset=self.offset)
            self.parts.discard(paths)
            return self.result("retry", problem)
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

    def sidecar(self, response: Any, offset: int, total: int | None) -> Sidecar:
        """What the part will hold: a resumed part keeps its record (and fsynced count); a new one gets the response's."""
        digests = dict(self.attempt.info.get("server_digests") or {})
        if offset:
            try:
                previous = self.parts.load_sidecar(self.ctx.paths)
            except (OSError, ValueError):
                previous = None
            if previous is not None:
                merged = {**previous.server_digests, **digests}
                self.attempt.info["server_digests"] = merged
                return attrs.evolve(previous, expected_total=total or previous.expected_total, server_digests=merged)
        encoding = content_encoding(response)
        accept_ranges = (response.headers.get("Accept-Ranges") or "").strip().lower()
        validators = Validators.of(response.headers)
        return Sidecar(
            url=url_identity(self.ctx.url), committed=offset, etag=validators.etag, last_modified=validators.last_modified,
            last_modified_strong=validators.date_is_strong, expected_total=total, content_encoding=encoding,
            resumable=encoding is None and accept_ranges != "none", final_url=redact_url(response.url), server_digests=digests,
        )

    def body(self, response: requests.Response, *, offset: int, total: int | None) -> StreamResult:
        """Write the body to the part from ``offset`` (appending to a hashed prefix when > 0)."""
        ctx, options = self.ctx, self.ctx.options
        refused = self._refuse_size(total)
        if refused is not None:
            return refused
        try:
            part = self.attempt.open_part(self.parts, ctx.paths, offset=offset, meta=self.sidecar(response, offset, total),
                                          expected_size=total)
        except UnsafePathError as exc:
            return self.result("failed", exc.reason)
        self.attempt.info["resumed_from"] = offset
        chunk = max(4096, int(options.chunk_size))
        reader = self.attempt.body_reader(response, decode=content_encoding(response) is not None)
        try:
            outcome = part.receive(reader, effects=ctx.effects, progress=ctx.progress, max_bytes=options.max_bytes,
                                   checkpoint_every=max(chunk, int(options.checkpoint_bytes)), block_size=chunk,
                                   heartbeat=ctx.lease.heartbeat, errors=transport_errors())
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
