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

The body is read with ``response.raw.read`` in blocks of ``options.chunk_size``, at most
64 KiB (decoded for gzip/deflate, which makes the part not resumable), hashed with SHA-256
(in a second thread for large bodies) and written; every ``options.checkpoint_bytes`` (at
most 16 MiB) the part is fsynced in the background, the sidecar's committed count updated
and the lease heart-beaten. A transfer that stops early (timeout, lost connection, short
body, cancellation) leaves the part and an up-to-date sidecar behind.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import queue
import threading
import time
from typing import Any, BinaryIO

import attrs
import requests
import urllib3

from contentdownload import StreamContext, StreamResult, hookimpl
from contentdownload.errors import JobAbort
from contentdownload.transfer.http import (
    ACCEPT_ENCODING,
    RETRY_STATUSES,
    content_encoding,
    content_length,
    decodable,
    http_date,
    is_strong_etag,
    parse_content_range,
    parse_retry_after,
    request_failure,
)
from contentdownload.records.log import get_logger
from contentdownload.transfer.urls import redact_url

from . import sidecar as sidecars
from .finalize import fsync_directory
from .resume import drop_part

log = get_logger("contentdownload.streaming")

_HASH_BLOCK = 1 << 20
#: Bodies at least this large (or of unknown length) are hashed in a second thread.
_THREADED_HASH_MIN = 8 << 20
_TRANSPORT_ERRORS = (urllib3.exceptions.HTTPError, requests.exceptions.RequestException, http.client.HTTPException, OSError)


def _elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000.0, 3)


def _hash_prefix(fh: BinaryIO, length: int, digest: Any) -> None:
    """Feed the first ``length`` bytes of ``fh`` to ``digest``; ``ValueError`` if the file is shorter."""
    fh.seek(0)
    remaining = length
    buffer = bytearray(min(_HASH_BLOCK, max(length, 1)))
    view = memoryview(buffer)
    while remaining > 0:
        n = fh.readinto(view[: min(len(buffer), remaining)])
        if not n:
            raise ValueError("part shorter than its committed bytes")
        digest.update(view[:n])
        remaining -= n


def _is_incomplete_read(exc: BaseException) -> bool:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, http.client.IncompleteRead):
            return True
        if any(isinstance(a, http.client.IncompleteRead) for a in getattr(exc, "args", ())):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


class _Transfer:
    """One ``stream_io`` call."""

    def __init__(self, ctx: StreamContext):
        self.ctx = ctx
        self.started = time.perf_counter()
        decision = ctx.decision
        self.headers = {name: value for name, value in decision.headers}
        self.ranged = any(name.lower() == "range" for name in self.headers)
        self.offset = decision.offset if (decision.mode == "resume" and self.ranged) else 0
        if decision.mode == "resume" and not self.ranged and decision.offset > 0:
            self.headers["Range"] = f"bytes={decision.offset}-"
            self.ranged, self.offset = True, decision.offset
        if self.ranged and not any(name.lower() == "if-range" for name in self.headers):
            # A range without a validator could splice two versions of a file: add one, or fetch it whole.
            validator = decision.etag if is_strong_etag(decision.etag) else http_date(decision.last_modified)
            if validator:
                self.headers["If-Range"] = validator
            else:
                for name in [n for n in self.headers if n.lower() == "range"]:
                    del self.headers[name]
                self.ranged, self.offset = False, 0
        if self.ranged:
            for name in [n for n in self.headers if n.lower() == "accept-encoding"]:
                del self.headers[name]
            self.headers["Accept-Encoding"] = "identity"
        elif not any(name.lower() == "accept-encoding" for name in self.headers):
            self.headers["Accept-Encoding"] = ACCEPT_ENCODING
        self.conditional = any(n.lower() in ("if-none-match", "if-modified-since") for n in self.headers)
        self.info: dict[str, Any] = {"url": redact_url(ctx.url), "resumed_from": 0}

    # -- results ------------------------------------------------------------------------

    def result(self, status: str, reason: str, **fields: Any) -> StreamResult:
        values = {**self.info, **fields}
        return StreamResult(status=status, reason=reason, elapsed_ms=_elapsed_ms(self.started), **values)

    # -- the request --------------------------------------------------------------------

    def run(self) -> StreamResult:
        ctx = self.ctx
        try:
            response = ctx.http.get(ctx.url, self.headers, timeout=ctx.options.timeout)
        except JobAbort:
            raise
        except (*_TRANSPORT_ERRORS, ValueError) as exc:
            status, reason = request_failure(exc)
            log.info("request failed", url=redact_url(ctx.url), reason=reason, error=type(exc).__name__)
            return self.result(status, reason)
        self.info.update(
            http_status=response.status_code,
            final_url=redact_url(response.url),
            content_type=response.headers.get("Content-Type"),
            content_encoding=content_encoding(response),
            etag=response.headers.get("ETag"),
            last_modified=response.headers.get("Last-Modified"),
            ttfb_ms=_elapsed_ms(self.started),
        )
        try:
            return self.judge(response)
        finally:
            response.close()

    def judge(self, response: requests.Response) -> StreamResult:
        """Decide from the status line and headers; stream the body only for 200/206."""
        ctx, paths, status = self.ctx, self.ctx.paths, response.status_code
        if status == 304:
            if self.conditional:
                return self.result("not_modified", "not_modified")
            return self.result("failed", "http_304")
        if status == 412:
            drop_part(paths.part, paths.sidecar)
            return self.result("retry", "precondition_failed")
        if status == 416:
            return self.range_not_satisfiable(response)
        if status in RETRY_STATUSES or status == 408:
            return self.result("retry", f"http_{status}", retry_after=parse_retry_after(response.headers.get("Retry-After")))
        if status == 206:
            return self.partial(response)
        if status in (200, 203):
            if not decodable(content_encoding(response)):
                return self.result("failed", "unsupported_encoding")
            if self.ranged:
                log.info("full body to a ranged request, restarting the part", url=redact_url(ctx.url), offset=self.offset)
            return self.body(response, offset=0, total=content_length(response) if content_encoding(response) is None else None)
        return self.result("failed", f"http_{status}")

    def range_not_satisfiable(self, response: requests.Response) -> StreamResult:
        ctx, paths = self.ctx, self.ctx.paths
        announced = parse_content_range(response.headers.get("Content-Range"))
        total = announced.total if announced is not None else None
        expected = ctx.decision.expected_total
        try:
            part_size = os.stat(paths.part).st_size
        except FileNotFoundError:
            part_size = -1
        if (
            self.ranged
            and total is not None
            and self.offset == total
            and part_size >= total
            and (expected is None or expected == total)
        ):
            digest = hashlib.sha256()
            with open(paths.part, "r+b") as fh:
                fh.truncate(total)
                _hash_prefix(fh, total, digest)
            log.info("part already complete", url=redact_url(ctx.url), size=total)
            return self.result("complete", "already_complete", sha256=digest.hexdigest(), total_size=total, resumed_from=self.offset)
        drop_part(paths.part, paths.sidecar)
        return self.result("retry", "range_not_satisfiable")

    def partial(self, response: requests.Response) -> StreamResult:
        ctx, paths = self.ctx, self.ctx.paths
        announced = parse_content_range(response.headers.get("Content-Range"))
        expected = ctx.decision.expected_total
        length = content_length(response)
        sent_etag = response.headers.get("ETag")
        known_etag = ctx.decision.etag
        ok = (
            self.ranged
            and (not sent_etag or not known_etag or sent_etag.strip() == known_etag.strip())
            and announced is not None
            and announced.start == self.offset
            and announced.total is not None
            and announced.end == announced.total - 1
            and (expected is None or announced.total == expected)
            and (length is None or length == announced.length)
            and content_encoding(response) is None
        )
        if not ok:
            log.warning(
                "rejected a 206 whose Content-Range does not continue the part",
                url=redact_url(ctx.url), content_range=response.headers.get("Content-Range"),
                offset=self.offset, expected_total=expected,
            )
            drop_part(paths.part, paths.sidecar)
            return self.result("retry", "bad_content_range")
        assert announced is not None and announced.total is not None
        try:
            part_size = os.stat(paths.part).st_size
        except FileNotFoundError:
            part_size = -1
        if part_size < self.offset:
            drop_part(paths.part, paths.sidecar)
            return self.result("retry", "part_changed")
        return self.body(response, offset=self.offset, total=announced.total)

    # -- the body -----------------------------------------------------------------------

    def body(self, response: requests.Response, *, offset: int, total: int | None) -> StreamResult:
        """Write the body to the part from ``offset`` (appending to a hashed prefix when > 0)."""
        ctx, paths, options = self.ctx, self.ctx.paths, self.ctx.options
        encoding = content_encoding(response)
        max_bytes = options.max_bytes
        if max_bytes is not None and total is not None and total > max_bytes:
            drop_part(paths.part, paths.sidecar)
            return self.result("failed", "too_large", total_size=None)
        if ctx.job.size is not None and total is not None and total != ctx.job.size:
            drop_part(paths.part, paths.sidecar)
            log.warning("server announces another size than the job expects", url=redact_url(ctx.url), announced=total, expected=ctx.job.size)
            return self.result("failed", "size_mismatch")
        expected_body = (total - offset) if total is not None else None
        etag = response.headers.get("ETag") or (ctx.decision.etag if offset else None)
        last_modified = http_date(response.headers.get("Last-Modified")) or (ctx.decision.last_modified if offset else None)
        accept_ranges = (response.headers.get("Accept-Ranges") or "").strip().lower()
        meta = sidecars.Sidecar(
            url=sidecars.url_identity(ctx.url),
            committed=offset,
            etag=etag,
            last_modified=last_modified,
            expected_total=total,
            content_encoding=encoding,
            resumable=encoding is None and accept_ranges != "none",
            final_url=redact_url(response.url),
        )
        paths.part.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        if offset > 0:
            fh = open(paths.part, "r+b")
            try:
                _hash_prefix(fh, offset, digest)
                fh.seek(offset)
                fh.truncate(offset)
            except BaseException:
                fh.close()
                raise
        else:
            if paths.sidecar.exists():
                # The old sidecar describes bytes about to be overwritten: make its removal
                # durable first, so a power cut can never pair it with the new bytes.
                sidecars.remove(paths.sidecar)
                fsync_directory(paths.sidecar.parent)
            fh = open(paths.part, "wb")
        self.info["resumed_from"] = offset
        with fh:
            # The count it records (``offset``) is already on disk; checkpoints make later ones durable.
            sidecars.save(paths.sidecar, meta, durable=False)
            return self.stream(response, fh, digest, meta, offset=offset, expected_body=expected_body, decode=encoding is not None)

    def stream(self, response: requests.Response, fh: BinaryIO, digest: Any, meta: sidecars.Sidecar, *,
               offset: int, expected_body: int | None, decode: bool) -> StreamResult:
        ctx, paths, options = self.ctx, self.ctx.paths, self.ctx.options
        chunk = max(4096, int(options.chunk_size))
        checkpoint_every = max(chunk, int(options.checkpoint_bytes))
        max_bytes = options.max_bytes
        wrote, progress, effects, lease = ctx.effects.wrote, ctx.progress, ctx.effects, ctx.lease
        read = response.raw.read
        write = fh.write
        hasher = _Hasher(digest, threaded=expected_body is None or expected_body >= _THREADED_HASH_MIN)
        update = hasher.feed
        checkpoints = _Checkpoints(fh, paths.sidecar, meta)
        position = offset
        since_checkpoint = 0
        error: BaseException | None = None
        try:
            while True:
                try:
                    data = read(chunk, decode_content=decode)
                except _TRANSPORT_ERRORS as exc:
                    error = exc
                    break
                if not data:
                    break
                n = len(data)
                if max_bytes is not None and position + n > max_bytes:
                    checkpoints.wait(raise_errors=False)
                    fh.close()
                    drop_part(paths.part, paths.sidecar)
                    log.warning("body larger than max_bytes, aborted", url=redact_url(ctx.url), max_bytes=max_bytes)
                    return self.result("failed", "too_large", bytes_written=effects.bytes_written)
                wrote(n)
                write(data)
                update(data)
                position += n
                since_checkpoint += n
                if progress is not None:
                    progress(n)
                if since_checkpoint >= checkpoint_every:
                    checkpoints.request(position)
                    since_checkpoint = 0
                    lease.heartbeat()
        except BaseException:
            # Cancelled, lease lost, disk full...: leave a part the next attempt can trust.
            hasher.abandon()
            if not fh.closed:
                try:
                    checkpoints.commit(position)
                except OSError:
                    pass
            raise

        received = position - offset
        fields = {"bytes_written": received, "resumed_from": offset, "total_size": position}
        if error is not None:
            hasher.abandon()
            checkpoints.commit(position)
            _, reason = request_failure(error)
            if _is_incomplete_read(error) or (expected_body is not None and received < expected_body and reason == "connection_lost"):
                reason = "short_body"
            log.info("transfer interrupted", url=redact_url(ctx.url), reason=reason, committed=position, error=repr(error)[:200])
            return self.result("retry", reason, **fields)
        raw_length = content_length(response)
        if (expected_body is not None and received != expected_body) or (
            decode and raw_length is not None and response.raw.tell() != raw_length
        ):
            hasher.abandon()
            checkpoints.commit(position)
            log.info("body shorter than announced", url=redact_url(ctx.url), received=received, expected=expected_body)
            return self.result("retry", "short_body", **fields)
        sha256 = hasher.hexdigest()
        checkpoints.commit(position, durable=False)  # finalize fsyncs the part
        return self.result("complete", "complete", sha256=sha256, **fields)


class _Hasher:
    """SHA-256 of the body: ``feed(block)`` hashes inline, or hands the block to a thread for large bodies.

    ``hashlib`` releases the GIL while it hashes, so a hashing thread runs next to the
    socket reads and file writes; the queue is bounded, so at most ``depth`` chunks wait.
    """

    def __init__(self, digest: Any, threaded: bool, depth: int = 4):
        self.digest = digest
        self.thread: threading.Thread | None = None
        if threaded:
            self.queue: queue.Queue[bytes | None] = queue.Queue(depth)
            self.feed: Any = self.queue.put
            self.thread = threading.Thread(target=self._run, name="contentdownload-sha256", daemon=True)
            self.thread.start()
        else:
            self.feed = digest.update

    def _run(self) -> None:
        update, get = self.digest.update, self.queue.get
        while (block := get()) is not None:
            update(block)

    def _stop(self) -> None:
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join()
            self.thread = None

    def hexdigest(self) -> str:
        """The digest once every queued chunk is hashed."""
        self._stop()
        return self.digest.hexdigest()

    def abandon(self) -> None:
        """Stop the thread (the digest is not used)."""
        self._stop()


class _Checkpoints:
    """Make the part's bytes durable and record the committed count in the sidecar.

    :meth:`request` flushes the file and fsyncs it in a background thread, then writes the
    sidecar with the count the fsync covered, so the transfer does not wait for the disk;
    a request while one is in flight is skipped. :meth:`commit` waits, then does it in
    line (at the end, or when the transfer stops).
    """

    def __init__(self, fh: BinaryIO, path: Any, meta: sidecars.Sidecar):
        self.fh, self.path, self.meta = fh, path, meta
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def _sync(self, position: int) -> None:
        try:
            os.fsync(self.fh.fileno())
            sidecars.save(self.path, attrs.evolve(self.meta, committed=position))
        except BaseException as exc:  # reported by wait()
            self.error = exc

    def request(self, position: int) -> None:
        """Checkpoint ``position`` in the background, unless a checkpoint is still running."""
        if self.thread is not None and self.thread.is_alive():
            return
        self.wait()
        self.fh.flush()
        self.thread = threading.Thread(target=self._sync, args=(position,), name="contentdownload-checkpoint", daemon=True)
        self.thread.start()

    def wait(self, raise_errors: bool = True) -> None:
        """Wait for a running checkpoint; raise its error (``raise_errors``)."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        error, self.error = self.error, None
        if error is not None and raise_errors:
            raise error

    def commit(self, position: int, durable: bool = True) -> None:
        """Flush (and fsync when ``durable``) now, and record ``position`` as committed."""
        self.wait()
        self.fh.flush()
        if durable:
            os.fsync(self.fh.fileno())
        sidecars.save(self.path, attrs.evolve(self.meta, committed=position), durable=durable)


@hookimpl
def stream_io(ctx: StreamContext) -> StreamResult:
    """Carry out the decision: one request, the status line judged first, the body streamed to the part."""
    return _Transfer(ctx).run()

