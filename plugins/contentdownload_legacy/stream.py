"""``stream_io`` of the legacy plugin: the plain loop (read a chunk, hash it, write it), always from byte 0.

It sends no ``Range`` (a ``Range``/``If-Range`` in the decision is ignored), writes the
part from scratch, and still judges the status line before writing anything: ``304`` to
a conditional request is ``not_modified``; ``412`` retries without validators; a ``206``
(never asked for) is retried as ``bad_content_range``; ``408``,
``429`` and ``5xx`` retry; every other non-``200`` status fails with ``http_<code>`` and
its body is never written. A body shorter than ``Content-Length`` (identity coding; for
a compressed body, the raw bytes) or larger than ``max_bytes`` is never reported
``complete``.
"""

from __future__ import annotations

import hashlib
import http.client
import time
from typing import Any

import requests
import urllib3

from contentdownload import StreamContext, StreamResult, hookimpl
from contentdownload.errors import JobAbort
from contentdownload.transfer.http import RETRY_STATUSES, content_encoding, content_length, decodable, parse_retry_after, request_failure
from contentdownload.records.log import get_logger
from contentdownload.transfer.urls import redact_url

log = get_logger("contentdownload.legacy")

_TRANSPORT_ERRORS = (urllib3.exceptions.HTTPError, requests.exceptions.RequestException, http.client.HTTPException, OSError)
_DROPPED_HEADERS = frozenset({"range", "if-range"})


@hookimpl
def stream_io(ctx: StreamContext) -> StreamResult:
    """One full GET; the body (decoded) goes to the part in 64 KiB chunks, hashed on the way."""
    started = time.perf_counter()
    headers = {k: v for k, v in ctx.decision.headers if k.lower() not in _DROPPED_HEADERS}
    conditional = any(k.lower() in ("if-none-match", "if-modified-since") for k in headers)
    info: dict[str, Any] = {"url": redact_url(ctx.url)}

    def result(status: str, reason: str, **fields: Any) -> StreamResult:
        return StreamResult(status=status, reason=reason, elapsed_ms=round((time.perf_counter() - started) * 1000, 3), **{**info, **fields})

    try:
        response = ctx.http.get(ctx.url, headers, timeout=ctx.options.timeout)
    except JobAbort:
        raise
    except (*_TRANSPORT_ERRORS, ValueError) as exc:
        status, reason = request_failure(exc)
        return result(status, reason)
    with response:
        code = response.status_code
        info.update(
            http_status=code, final_url=redact_url(response.url), content_type=response.headers.get("Content-Type"),
            content_encoding=content_encoding(response), etag=response.headers.get("ETag"),
            last_modified=response.headers.get("Last-Modified"), ttfb_ms=round((time.perf_counter() - started) * 1000, 3),
        )
        if code == 304:
            return result("not_modified", "not_modified") if conditional else result("failed", "http_304")
        if code == 412:
            ctx.paths.part.unlink(missing_ok=True)
            return result("retry", "precondition_failed")
        if code == 416:
            ctx.paths.part.unlink(missing_ok=True)
            return result("retry", "range_not_satisfiable")
        if code == 206:  # no Range was sent: a partial answer cannot be trusted as the whole body
            ctx.paths.part.unlink(missing_ok=True)
            return result("retry", "bad_content_range")
        if code in RETRY_STATUSES or code == 408:
            return result("retry", f"http_{code}", retry_after=parse_retry_after(response.headers.get("Retry-After")))
        if code not in (200, 203):
            return result("failed", f"http_{code}")

        if not decodable(content_encoding(response)):
            return result("failed", "unsupported_encoding")
        announced = content_length(response)
        encoded = content_encoding(response) is not None
        max_bytes = ctx.options.max_bytes
        if max_bytes is not None and announced is not None and not encoded and announced > max_bytes:
            return result("failed", "too_large")
        digest = hashlib.sha256()
        received = 0
        ctx.paths.part.parent.mkdir(parents=True, exist_ok=True)
        with open(ctx.paths.part, "wb") as fh:
            try:
                for chunk in response.iter_content(ctx.options.chunk_size):
                    if max_bytes is not None and received + len(chunk) > max_bytes:
                        fh.close()
                        ctx.paths.part.unlink(missing_ok=True)
                        return result("failed", "too_large", bytes_written=received)
                    ctx.effects.wrote(len(chunk))
                    digest.update(chunk)
                    fh.write(chunk)
                    received += len(chunk)
                    if ctx.progress is not None:
                        ctx.progress(len(chunk))
            except _TRANSPORT_ERRORS as exc:
                _, reason = request_failure(exc)
                if reason == "connection_lost" and announced is not None:
                    reason = "short_body"
                return result("retry", reason, bytes_written=received, total_size=received)
        fields = {"bytes_written": received, "total_size": received}
        raw_received = received if not encoded else response.raw.tell()
        if announced is not None and raw_received != announced:
            return result("retry", "short_body", **fields)
        return result("complete", "complete", sha256=digest.hexdigest(), **fields)
