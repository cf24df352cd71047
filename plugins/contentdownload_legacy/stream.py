"""``stream_io`` of the legacy plugin: the plain loop (read a block, hash it, write it), always from byte 0.

It sends no ``Range`` (a ``Range``/``If-Range`` in the decision is ignored) and writes
the part from scratch through the part store in ``plain`` mode (no fsync, no sidecar).
The status line is judged first by the core's classification: ``304`` to a conditional
request is ``not_modified``; ``412`` retries without validators; a ``206`` (never asked
for) is retried as ``bad_content_range``; ``408``, ``429`` and ``5xx`` retry; every other
non-``200`` status fails with ``http_<code>`` and its body is never written. A body
shorter than ``Content-Length`` (for a compressed body, the raw bytes) or larger than
``max_bytes`` is never reported ``complete``. The body is read by the core's
``BodyReader``, so the read timeout and the speed limits (``too_slow``, ``max_time``)
hold here too.
"""

from __future__ import annotations

from contentdownload import StreamContext, StreamResult, hookimpl
from contentdownload.errors import UnsafePathError
from contentdownload.transfer.headers import content_encoding, content_length, decodable
from contentdownload.transfer.parts import PartStore
from contentdownload.transfer.status import Attempt, transport_errors

_DROPPED_HEADERS = frozenset({"range", "if-range"})


@hookimpl
def stream_io(ctx: StreamContext) -> StreamResult:
    """One full GET; the body (decoded) goes to the part in ``chunk_size`` blocks, hashed on the way."""
    attempt = Attempt(ctx, {k: v for k, v in ctx.decision.headers if k.lower() not in _DROPPED_HEADERS})
    response = attempt.send()
    if isinstance(response, StreamResult):
        return response
    parts = PartStore.for_paths(ctx.paths, mode="plain")
    with response:
        verdict = attempt.verdict(response, ranged=False)
        if verdict.discard_part:
            parts.discard(ctx.paths)
        if verdict.stops:
            return attempt.stopped(verdict)
        encoded = content_encoding(response) is not None
        if not decodable(content_encoding(response)):
            return attempt.result("failed", "unsupported_encoding")
        announced = content_length(response)
        max_bytes = ctx.options.max_bytes
        if max_bytes is not None and announced is not None and not encoded and announced > max_bytes:
            return attempt.result("failed", "too_large")
        try:
            part = attempt.open_part(parts, ctx.paths, expected_size=None if encoded else announced)
        except UnsafePathError as exc:
            return attempt.result("failed", exc.reason)
        outcome = part.receive(attempt.body_reader(response, decode=True), effects=ctx.effects, progress=ctx.progress,
                               max_bytes=max_bytes, errors=transport_errors(), block_size=max(4096, ctx.options.chunk_size))
        return attempt.body_result(part, outcome, response, offset=0, expected_body=None if encoded else announced)
