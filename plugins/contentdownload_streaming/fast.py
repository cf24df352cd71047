"""``stream_io_async`` of the streaming plugin: the regular download on the process's event loop.

It takes a fresh download (offset 0) whose URL the worker's client lets its event-loop
engine fetch (:meth:`~contentdownload.transfer.http.HttpClient.engine_for`: no proxy,
cookies, netrc credentials or pacing in the way), sends the request ``stream_io`` would
send, and, for a ``200`` with a ``Content-Length`` within ``max_bytes`` and the job's size,
no content coding, writes the body to the part through the part store exactly as
``stream_io`` does (same sidecar, digests, speed limits, checkpoints every
``checkpoint_bytes``, effects, progress and result fields). A status that ends the attempt as ``failed`` (``404``, ``403``, ``410``...) is
answered here too, as ``stream_io`` would, without a body read or a second request.
Everything else goes to the plugin's own ``stream_io``, which the dispatcher runs in a
thread when the coroutine ends with ``None``: a resume or a revalidation, redirects,
retryable statuses (``429``, ``5xx``: the client's retries; a ``Retry-After`` pauses the host
at the pacer first), an encoded or unsized body, and a request that got no response (which
``stream_io`` sends again with its retries).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Awaitable
from urllib.parse import urlsplit

from contentdownload import StreamContext, StreamResult, hookimpl
from contentdownload.errors import NOT_PLUGIN_FAULTS, DiskError, TooSlowError, TransportError, UnsafePathError
from contentdownload.transfer.engine import Engine, Exchange
from contentdownload.transfer.headers import PAUSE_STATUSES, content_encoding, content_length, parse_retry_after
from contentdownload.transfer.parts import BodyOutcome, Part
from contentdownload.transfer.status import classify

from . import stream


@hookimpl
def stream_io_async(ctx: StreamContext) -> Awaitable[StreamResult] | None:
    """The regular fresh download on the event loop; ``None`` (the synchronous ``stream_io`` does it) for anything else."""
    if ctx.decision.mode != "fresh":
        return None
    engine = ctx.http.engine_for(ctx.url)
    if engine is None:
        return None
    return _Fast(ctx, engine).run()


class _Fast:
    """One ``stream_io_async`` call: ``stream_io``'s bookkeeping (:class:`stream._Transfer`), the engine's request."""

    def __init__(self, ctx: StreamContext, engine: Engine):
        self.ctx, self.engine = ctx, engine
        self.transfer = stream._Transfer(ctx)
        self.attempt = self.transfer.attempt

    async def run(self) -> StreamResult | None:
        ctx, attempt = self.ctx, self.attempt
        connect, read = ctx.options.timeout
        try:
            exchange = await self.engine.open(ctx.url, attempt.headers, timeout=(attempt.guard.timeout(connect, body=False),
                                                                                 attempt.guard.timeout(read, body=False)),
                                              block_size=ctx.options.chunk_size)
        except (TransportError, ValueError):
            return None  # nothing written: the dispatcher hands the decision to stream_io, in a thread
        if exchange.status in PAUSE_STATUSES:  # the host's pause, as the client's retry would note it, before stream_io asks again
            _pause_host(ctx.http, exchange)
        if _final_failure(exchange.status):  # a 404, 403, 410...: nothing to retry or follow, no body read
            exchange.abandon()
            attempt.took(exchange)
            return attempt.stopped(attempt.verdict(exchange, ranged=False))
        total = self.regular_length(exchange)
        if total is None:
            exchange.abandon()
            return None
        attempt.took(exchange)
        return await self.body(exchange, total)

    def regular_length(self, exchange: Exchange) -> int | None:
        """The body's length when this is the regular case (see the module), else ``None``."""
        options, size = self.ctx.options, self.ctx.job.size
        total = content_length(exchange)
        if exchange.status != 200 or content_encoding(exchange) is not None or total is None:
            return None
        if options.max_bytes is not None and total > options.max_bytes:
            return None
        return total if size is None or total == size else None

    async def body(self, exchange: Exchange, total: int) -> StreamResult:
        ctx, transfer = self.ctx, self.transfer
        try:
            part = self.attempt.open_part(transfer.parts, ctx.paths, offset=0, meta=transfer.sidecar(exchange, 0, total),
                                          expected_size=total)
        except UnsafePathError as exc:
            exchange.abandon()
            return transfer.result("failed", exc.reason)
        try:
            outcome = await self.receive(exchange, part)
        except BaseException:
            exchange.abandon()
            part.abandon()  # cancelled, lease lost, disk full...: leave a part the next attempt can trust
            raise
        if outcome.error is not None or outcome.too_large or outcome.overlap_mismatch:
            exchange.abandon()
        return self.attempt.body_result(part, outcome, exchange, offset=0, expected_body=total)

    async def receive(self, exchange: Exchange, part: Part) -> BodyOutcome:
        """The body into ``part`` block by block, within the read timeout and the speed limits (``Part.receive``'s rules)."""
        ctx, guard, read_timeout = self.ctx, self.attempt.guard, self.ctx.options.timeout[1]
        waited: list[float | None] = [read_timeout]  # the last wait asked for

        def wait() -> float | None:
            waited[0] = guard.timeout(read_timeout)
            return waited[0]

        checkpoint_every, since = max(int(ctx.options.chunk_size), int(ctx.options.checkpoint_bytes)), 0
        guard.start_body()
        blocks: Any = exchange.blocks(timeout=wait)
        async with contextlib.aclosing(blocks):
            try:
                async for block, give_back in blocks:  # a reused buffer, given back once written and hashed
                    guard.received(len(block))
                    taken = part.take(block, ctx.effects, ctx.options.max_bytes, give_back)
                    if isinstance(taken, BodyOutcome):
                        return taken
                    if ctx.progress is not None:
                        ctx.progress(taken)
                    since += taken
                    if since >= checkpoint_every:  # fsynced in a thread, then the sidecar's count (as Part.receive does)
                        part.checkpoint(background=True)
                        since = 0
                part.flush()  # the writer thread's last writes (a full disk is raised here)
            except NOT_PLUGIN_FAULTS:  # the store given up on (an OSError too), raised by a block's heartbeat: the run's, not the attempt's
                raise
            except OSError as exc:  # the engine's errors (TransportError), a speed limit's, or the part's disk
                disk = DiskError.of(exc)
                if disk is not None:  # the part's disk, not the connection: the run stops, nothing is asked again
                    raise disk from exc
                slow = await _slow(guard, waited[0] != read_timeout) if isinstance(exc, TimeoutError) else None
                return BodyOutcome(error=slow or exc)
        return BodyOutcome()


def _pause_host(http: Any, exchange: Exchange) -> None:
    """A ``429``/``503`` with ``Retry-After``: the host's pacer pauses it (capped as the client caps it)."""
    delay = parse_retry_after(exchange.headers.get("Retry-After"))
    if delay is not None:
        http.pacer.pause(urlsplit(exchange.url).hostname, min(delay, http.max_retry_after))


def _final_failure(status: int) -> bool:
    """A status ``stream_io`` would end the attempt with as ``failed`` at once: no redirect, no retry by the client or the pipeline."""
    return classify(status, ranged=False, conditional=False).action == "failed" and not 300 <= status < 400


async def _slow(guard: Any, guard_deadline: bool) -> TooSlowError | None:
    """The speed limit a timed-out read broke: when the wait ended at the guard's deadline (``guard_deadline``),
    the loop's timer may have fired a little before the guard's clock got there."""
    left = guard.remaining() if guard_deadline else None
    if left is not None and left > 0:
        await asyncio.sleep(left)
    try:
        guard.check()
    except TooSlowError as exc:
        return exc
    return None
