"""One job through the stages: for each candidate URL, attempts of decision, stream and finalize.

::

    for url in job.urls:                      # candidates, in order
        attempt:                              # up to 1 + retries (plus a few free protocol steps)
            resume_decision  -> fresh | resume | revalidate | discard
            stream_io        -> complete | not_modified | retry | failed
            complete         -> finalize -> downloaded / resumed
            not_modified     -> not_modified (the finished file stays)
            retry            -> wait (backoff, Retry-After), then back to resume_decision
            failed           -> next candidate

A retry goes back through ``resume_decision``, so an interrupted transfer continues from
its part instead of starting over. Which plugin answers each hook comes from the
selections the policy made for the job; the dispatcher asks them in order.

Retries are counted once: the :class:`~contentdownload.transfer.http.HttpClient` already retried
connection failures and retryable statuses answered before any body byte, so a
``retry`` of that kind (no byte written, no response or a status in
``HttpClient.retry_statuses``) ends the candidate instead of starting another round of
client retries. Failures during the body (cut connections, short bodies, timeouts) and
protocol steps (``412``, ``416``, a rejected ``Content-Range``) are retried here.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Any, Awaitable, Callable, ContextManager, Mapping, TYPE_CHECKING

import attrs

from contentdownload.machinery.dispatch import Answer, StageFailed
from contentdownload.errors import Cancelled, NoPluginAnsweredError
from contentdownload.transfer.headers import DEFAULT_MAX_RETRY_AFTER, content_length, parse_content_range
from contentdownload.transfer.http import HttpClient
from contentdownload.records.log import debug_line, get_logger
from contentdownload.hooks.model import (
    NO_LEASE,
    Effects,
    FinalizeContext,
    Job,
    JobKey,
    JobResult,
    Lease,
    PriorRecord,
    ResumeContext,
    StagePaths,
    StreamContext,
    StreamResult,
    TransferOptions,
)
from contentdownload.machinery.policy import Selection
from contentdownload.transfer.urls import redact_url
from contentdownload.jobs.workspace import check_same_filesystem

if TYPE_CHECKING:  # pragma: no cover
    from contentdownload.machinery.runtime import Runtime

log = get_logger(__name__)
log_debug = debug_line(__name__)  # per-job lines

__all__ = ["Pipeline", "check_same_filesystem", "backoff_delay", "PROTOCOL_STEPS"]

#: ``retry`` reasons that are steps of the protocol (validators dropped, part dropped,
#: restart); each may happen a few times per candidate without using the retry budget.
PROTOCOL_STEPS = frozenset({"precondition_failed", "range_not_satisfiable", "bad_content_range", "part_changed",
                            "validator_changed", "overlap_mismatch"})
_FREE_STEPS = 3
#: ``retry`` reasons of a transport failure before any response.
_NO_RESPONSE = frozenset({"connection_error", "connect_timeout", "connection_refused", "connection_reset", "read_timeout"})
#: :meth:`_JobRun.after`: another attempt on the same candidate.
_AGAIN = object()


def backoff_delay(retry_number: int, backoff_factor: float, retry_after: float | None = None,
                  cap: float = DEFAULT_MAX_RETRY_AFTER) -> float:
    """Seconds to wait before retry number ``retry_number`` (1 for the first retry).

    urllib3's exponential backoff (``Retry.get_backoff_time``: 0 before the first retry,
    then ``backoff_factor * 2 ** (n - 1)``), or the server's ``Retry-After`` when
    longer, all capped at ``cap``.
    """
    from urllib3.util.retry import RequestHistory, Retry  # a retry's wait: the run's first one pays the import

    history = tuple(RequestHistory("GET", None, None, None, None) for _ in range(max(0, retry_number)))
    backoff = Retry(total=None, backoff_factor=backoff_factor, backoff_max=cap, history=history).get_backoff_time()
    if retry_after is not None:
        backoff = max(backoff, float(retry_after))
    return max(0.0, min(backoff, cap))


@attrs.define
class _Candidate:
    """Book-keeping of one candidate URL's attempts."""

    url: str
    attempts: int = 0
    retries_used: int = 0
    free_steps: int = 0
    resumed_from: int = 0  # offset the current chain of transfers continued from (0: from scratch)
    previous: StreamResult | None = None


@attrs.frozen(kw_only=True)
class FirstAttempt:
    """An attempt made before :meth:`Pipeline.run` took the job over: its candidate and what ``stream_io`` returned."""

    cand: _Candidate
    stream: StreamResult


class Pipeline:
    """Runs jobs through ``resume_decision``, ``stream_io`` and ``finalize``; thread-safe, one per run.

    ``runtime`` gives the dispatcher; ``http`` is handed to ``stream_io``; ``options``
    are the default transfer options (``run(options=...)`` overrides them per job).
    ``retries``: retries per candidate URL after the first attempt; ``backoff_factor``:
    urllib3-style exponential backoff between them; ``max_retry_after``: cap on any wait;
    ``sleep``: the wait function (tests pass a fake).
    """

    def __init__(
        self,
        runtime: "Runtime",
        http: HttpClient,
        options: TransferOptions,
        retries: int = 5,
        backoff_factor: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
        max_retry_after: float = DEFAULT_MAX_RETRY_AFTER,
    ):
        self.runtime = runtime
        self.http = http
        self.options = options
        self.retries = max(0, int(retries))
        self.backoff_factor = float(backoff_factor)
        self.sleep = sleep
        self.max_retry_after = float(max_retry_after)

    # -- the job --------------------------------------------------------------------------

    def run(self, job: Job, job_key: JobKey, paths_for_url: Callable[[str], StagePaths] | StagePaths,
            selections: Mapping[str, Selection], **kwargs: Any) -> JobResult:
        """Fetch ``job`` and return its :class:`JobResult` (the arguments are :meth:`start`'s)."""
        return self.start(job, job_key, paths_for_url, selections, **kwargs).run()

    def start(
        self,
        job: Job,
        job_key: JobKey,
        paths_for_url: Callable[[str], StagePaths] | StagePaths,
        selections: Mapping[str, Selection],
        *,
        record: PriorRecord | None = None,
        lease: Lease = NO_LEASE,
        progress: Callable[[int], None] | None = None,
        cancel: threading.Event | None = None,
        job_key_answer: Answer | None = None,
        options: TransferOptions | None = None,
        before_finalize: Callable[[StreamResult], None] | None = None,
        host_slot: Callable[[str], ContextManager[Any]] | None = None,
        expect: Callable[[int | None, int], None] | None = None,
    ) -> "_JobRun":
        """The run of ``job``: its :meth:`~_JobRun.run` fetches it and returns its :class:`JobResult`.

        ``paths_for_url`` gives the final/part/sidecar paths (one :class:`StagePaths` for
        every candidate, or a function of the candidate URL). ``selections`` maps each
        hook to the chain of plugins to ask (``Policy.plan``). ``record`` is what an
        earlier run recorded, ``lease`` the job's lease (heart-beaten while waiting and
        streaming, asserted before the rename). ``progress(n)`` is called with new body
        bytes. ``cancel``: when set, the job stops between chunks or attempts with
        :class:`~contentdownload.errors.Cancelled` (the part is kept). ``job_key_answer``
        is the dispatcher's answer for ``job_key``, recorded in ``plugins``/``fallbacks``.
        ``before_finalize(stream)`` runs right before ``finalize`` (the runner records its
        finalize intent there). ``host_slot(url)`` is entered around the attempts on each
        candidate URL (the runner's per-host connection limit, counted for the host
        actually fetched). ``expect(size, start)`` is told, for every response with a body,
        the file's expected size (``None`` when unknown) and the offset the body starts at.

        Raises :class:`~contentdownload.errors.JobAbort` (``Cancelled``, ``LeaseLostError``);
        every other failure is a ``failed`` result with a reason.
        """
        return _JobRun(self, job, job_key, paths_for_url, selections, record=record, lease=lease, progress=progress,
                       cancel=cancel, job_key_answer=job_key_answer, options=options or self.options,
                       before_finalize=before_finalize, host_slot=host_slot, expect=expect)

    # -- waiting ----------------------------------------------------------------------------

    def wait(self, seconds: float, lease: Lease, cancel: threading.Event | None) -> None:
        """Wait ``seconds``, heart-beating ``lease`` and stopping with ``Cancelled`` when ``cancel`` is set."""
        if seconds <= 0:
            return
        if self.sleep is not time.sleep:
            self.sleep(seconds)
            _check_cancel(cancel)
            return
        deadline = time.monotonic() + seconds
        while True:
            _check_cancel(cancel)
            lease.heartbeat()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            step = min(remaining, 0.5)
            if cancel is not None:
                cancel.wait(step)
            else:
                time.sleep(step)


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("the run was interrupted; the part is kept for a later resume")


def _retrieved(future: "asyncio.Future[Any]") -> None:
    if not future.cancelled():
        future.exception()


class HeartbeatOffLoop:
    """The lease's heartbeat for a transfer on the event loop: the loop never waits on the job store.

    On the loop, a due beat runs through ``to_thread`` (one at a time) and what it raised (the
    lease lost, the store given up on) is raised by the next call, so the transfer still stops;
    a beat that is not due costs no thread. Off the loop (an attempt handed over to a thread)
    it is the lease's own heartbeat, which may wait.
    """

    def __init__(self, lease: Lease, to_thread: Callable[..., Awaitable[Any]]):
        self.lease, self.to_thread = lease, to_thread
        self._beat: Awaitable[Any] | None = None

    def __call__(self) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self.lease.heartbeat()
            return
        beat = self._beat
        if beat is not None:
            if not beat.done():
                return
            self._beat = None
            beat.result()
        if self.lease.due():
            self._beat = asyncio.ensure_future(self.to_thread(self.lease.heartbeat))
            self._beat.add_done_callback(_retrieved)  # a beat still under way when the attempt ends warns of nothing

    async def settled(self) -> None:
        """Wait for the beat under way, if any (what it raised is kept for the next call)."""
        if self._beat is not None:
            await asyncio.wait([self._beat])


class _JobRun:
    """The state of one ``Pipeline.run`` call."""

    def __init__(self, pipeline: Pipeline, job: Job, job_key: JobKey, paths_for_url: Any, selections: Mapping[str, Selection], *,
                 record: PriorRecord | None, lease: Lease, progress: Callable[[int], None] | None,
                 cancel: threading.Event | None, job_key_answer: Answer | None, options: TransferOptions,
                 before_finalize: Callable[[StreamResult], None] | None,
                 host_slot: Callable[[str], ContextManager[Any]] | None = None,
                 expect: Callable[[int | None, int], None] | None = None):
        self.p = pipeline
        self.dispatcher = pipeline.runtime.dispatcher
        self.job, self.job_key, self.paths_for_url, self.selections = job, job_key, paths_for_url, selections
        self.record, self.lease, self.cancel, self.options = record, lease, cancel, options
        self.user_progress, self.before_finalize, self.expect = progress, before_finalize, expect
        self.host_slot = host_slot or (lambda url: contextlib.nullcontext())
        self.started = time.monotonic()
        self.plugins: dict[str, str] = {}
        self.fallbacks: dict[str, bool] = {}
        if job_key_answer is not None:
            self.note("job_key", job_key_answer)
        self.attempts = 0
        self.bytes_downloaded = 0
        self.decisions: list[str] = []
        self.detected_type: str | None = None
        self.last: StreamResult | None = None
        self.failure = ""
        self.failure_url: str | None = None

    # -- helpers ----------------------------------------------------------------------------

    def note(self, hook: str, answer: Answer) -> None:
        self.plugins[hook] = answer.plugin
        self.fallbacks[hook] = answer.fallback

    def paths(self, url: str) -> StagePaths:
        return self.paths_for_url if isinstance(self.paths_for_url, StagePaths) else self.paths_for_url(url)

    def progress(self, heartbeat: Callable[[], None] | None = None) -> Callable[[int], None] | None:
        """The per-chunk callback: stop on Ctrl-C, keep the lease alive, hold ``--limit-rate``, report bytes.

        The lease heartbeat runs on every chunk (the lease itself limits it to one store
        write per third of its TTL), so a slow transfer never loses its job between
        checkpoints, whatever the plugin's checkpoint spacing.
        """
        cancel, heartbeat = self.cancel, heartbeat or self.lease.heartbeat
        pace = self.p.http.received if isinstance(self.p.http, HttpClient) and self.p.http.byte_rate else None
        sinks = tuple(f for f in (pace, self.user_progress) if f is not None)  # --limit-rate, then the progress display

        def report(n: int) -> None:
            if cancel is not None and cancel.is_set():
                raise Cancelled("the run was interrupted; the part is kept for a later resume")
            heartbeat()
            for sink in sinks:
                sink(n)

        return report

    def on_response(self, response: Any) -> None:
        """Tell ``expect`` the size a response's body completes the file to, and where it starts."""
        if self.expect is None:
            return
        if response.status_code == 206:
            span = parse_content_range(response.headers.get("Content-Range"))
            if span is not None and span.start is not None:
                self.expect(span.total, span.start)
        elif response.status_code == 200:
            self.expect(content_length(response), 0)

    def on_wait(self) -> None:
        _check_cancel(self.cancel)
        self.lease.heartbeat()

    def result(self, outcome: str, **fields: Any) -> JobResult:
        last = self.last
        base: dict[str, Any] = {
            "outcome": outcome,
            "job": self.job,
            "job_key": self.job_key.key,
            "attempts": self.attempts,
            "elapsed_ms": round((time.monotonic() - self.started) * 1000.0, 3),
            "bytes_downloaded": self.bytes_downloaded,
            "plugins": dict(self.plugins),
            "fallbacks": dict(self.fallbacks),
            "decisions": tuple(self.decisions),
            "detected_type": self.detected_type,
        }
        if last is not None:
            base.update(http_status=last.http_status, final_url=last.final_url, content_type=last.content_type,
                        etag=last.etag, last_modified=last.last_modified)
        base.update(fields)
        return JobResult(**base)

    def failed(self, reason: str, url: str | None) -> JobResult:
        return self.result("failed", reason=reason, url=redact_url(url) if url else None)

    # -- the loop ---------------------------------------------------------------------------

    def run(self, first: "FirstAttempt | None" = None) -> JobResult:
        """Every candidate in order until one ends the job; ``first``: the first candidate's first attempt, made already."""
        for index, url in enumerate(self.job.urls):
            if index == 0 and first is not None:
                # a complete first attempt is only finalized: it sends nothing, so it takes no connection slot
                with self.host_slot(url) if first.stream.status != "complete" else contextlib.nullcontext():
                    outcome = self.candidate(first.cand, first.stream)
            else:
                with self.host_slot(url):
                    outcome = self.candidate(_Candidate(url))
            if outcome is not None:
                return outcome
        return self.failed(self.failure or "failed", self.failure_url)

    def candidate(self, cand: _Candidate, stream: StreamResult | None = None) -> JobResult | None:
        """Attempts on one URL: a final result, or ``None`` to go on with the next candidate.

        ``stream``: the result of an attempt already made on it (the loop goes on from there).
        """
        paths = self.paths(cand.url)
        while True:
            if stream is None:
                decision = self.decide(cand, paths)
                if isinstance(decision, JobResult):
                    return decision
                stream = self.transfer(cand, paths, decision)
                if stream is None:
                    return self.failed("no_plugin", cand.url)
            outcome = self.after(cand, paths, stream)
            if outcome is not _AGAIN:
                return outcome
            stream = None

    def decide(self, cand: _Candidate, paths: StagePaths, heartbeat: Callable[[], None] | None = None) -> Any:
        """Count a new attempt and dispatch ``resume_decision``: the decision, or a ``failed`` result when no plugin answered."""
        _check_cancel(self.cancel)
        (heartbeat or self.lease.heartbeat)()
        cand.attempts += 1
        self.attempts += 1
        rctx = ResumeContext(job=self.job, job_key=self.job_key, url=cand.url, paths=paths, options=self.options,
                             record=self.record, attempt=cand.attempts, previous=cand.previous)
        try:
            answer = self.dispatcher.call(self.selections["resume_decision"], rctx)
        except NoPluginAnsweredError as exc:
            log.error("no plugin answered resume_decision", error=str(exc), job_key=self.job_key.key)
            return self.failed("no_plugin", cand.url)
        self.note("resume_decision", answer)
        decision = answer.result
        self.decisions.append(decision.mode)
        plain = decision.mode == "fresh" and decision.reason == "no_part"  # every new job's: DEBUG, cheap on large runs
        (log_debug if plain else log.info)(
            "streaming_resume_decision",
            plugin=answer.plugin, fallback=answer.fallback, mode=decision.mode, reason=decision.reason,
            url=redact_url(cand.url), offset=decision.offset, attempt=rctx.attempt, job_key=self.job_key.key,
        )
        if decision.mode == "discard":
            paths.part.unlink(missing_ok=True)
            paths.sidecar.unlink(missing_ok=True)
        return decision

    def after(self, cand: _Candidate, paths: StagePaths, stream: StreamResult) -> Any:
        """What an attempt's ``stream`` leads to: the job's result, ``None`` (next candidate) or ``_AGAIN`` (after the wait)."""
        self.account(cand, stream)
        if stream.status == "complete":
            return self.finish(cand, paths, stream)
        if stream.status == "not_modified":
            return self.not_modified(cand, paths, stream)
        if stream.status == "failed":
            self.failure, self.failure_url = stream.reason or "failed", cand.url
            return None
        cand.previous = stream  # retry
        if not self.may_retry(cand, stream):
            self.failure, self.failure_url = stream.reason or "retries_exhausted", cand.url
            log.info("giving up on a candidate", url=redact_url(cand.url), reason=stream.reason, attempts=cand.attempts)
            return None
        delay = 0.0 if stream.reason in PROTOCOL_STEPS else backoff_delay(
            cand.retries_used, self.p.backoff_factor, stream.retry_after, self.p.max_retry_after)
        log.info("retrying", url=redact_url(cand.url), reason=stream.reason, delay_s=round(delay, 3),
                 attempt=cand.attempts, committed=stream.total_size)
        self.p.wait(delay, self.lease, self.cancel)
        return _AGAIN

    def account(self, cand: _Candidate, stream: StreamResult) -> None:
        """Count an attempt's bytes, and where the candidate's chain of transfers now starts."""
        self.last = stream
        self.bytes_downloaded += stream.bytes_written
        if stream.status in ("complete", "retry"):
            if stream.resumed_from > 0:
                cand.resumed_from = stream.resumed_from
            elif stream.bytes_written > 0 or stream.status == "complete":
                cand.resumed_from = 0  # the transfer started over from byte 0

    def may_retry(self, cand: _Candidate, stream: StreamResult) -> bool:
        """Whether another attempt is allowed after ``stream`` (a ``retry``); counts it."""
        if stream.reason in PROTOCOL_STEPS and cand.free_steps < _FREE_STEPS:
            cand.free_steps += 1
            return True
        http = self.p.http
        if isinstance(http, HttpClient) and http.retries > 0 and stream.bytes_written == 0:
            retried_by_client = stream.http_status in http.retry_statuses or (
                stream.http_status is None and stream.reason in _NO_RESPONSE
            )
            if retried_by_client:
                return False
        if cand.retries_used >= self.p.retries:
            return False
        cand.retries_used += 1
        return True

    def stream_context(self, cand: _Candidate, paths: StagePaths, decision: Any,
                       heartbeat: Callable[[], None] | None = None) -> StreamContext:
        return StreamContext(job=self.job, job_key=self.job_key, url=cand.url, paths=paths, decision=decision,
                             http=self.p.http, options=self.options, record=self.record, lease=self.lease,
                             effects=Effects(), progress=self.progress(heartbeat))

    def in_client(self, fn: Callable[[StreamContext], Any]) -> Callable[[StreamContext], Any]:
        """``fn(ctx)`` (a ``stream_io``) with this job's retry-wait and response callbacks in force in the calling thread,
        the client's retries counted as attempts."""
        client = self.p.http if isinstance(self.p.http, HttpClient) else None
        if client is None:
            return fn

        def call(ctx: StreamContext) -> Any:
            retries_before = client.retries_made()
            try:
                with client.waiting(self.on_wait, self.on_response):
                    return fn(ctx)
            finally:  # the requests the client sent again on its own are attempts too
                self.attempts += client.retries_made() - retries_before

        return call

    def transfer(self, cand: _Candidate, paths: StagePaths, decision: Any) -> StreamResult | None:
        """Dispatch ``stream_io``; ``None`` when no plugin answered."""
        sctx = self.stream_context(cand, paths, decision)
        try:
            answer = self.in_client(lambda ctx: self.dispatcher.call(self.selections["stream_io"], ctx))(sctx)
        except (StageFailed, NoPluginAnsweredError) as exc:
            return self.stream_failed(exc, cand, sctx)
        self.note("stream_io", answer)
        return answer.result

    async def first_attempt(self, to_thread: Callable[..., Awaitable[Any]]) -> "FirstAttempt | JobResult":
        """The first attempt on the first candidate, ``stream_io`` on the event loop (see ``Dispatcher.call_async``).

        ``to_thread(fn, *args)`` runs ``fn(*args)`` in a worker thread: a synchronous ``stream_io``, a due lease heartbeat. Returns the
        attempt for :meth:`run` to go on from, or the job's ``failed`` result.
        """
        cand = _Candidate(self.job.urls[0])
        paths = self.paths(cand.url)
        heartbeat = HeartbeatOffLoop(self.lease, to_thread)
        decision = self.decide(cand, paths, heartbeat)
        if isinstance(decision, JobResult):
            return decision
        sctx = self.stream_context(cand, paths, decision, heartbeat)

        def in_thread(fn: Callable[[StreamContext], Any], ctx: StreamContext) -> Awaitable[Any]:
            _check_cancel(self.cancel)  # handed over after Ctrl-C aborted the loop's request: no new one
            return to_thread(self.in_client(fn), ctx)

        try:
            answer = await self.dispatcher.call_async(self.selections["stream_io"], sctx, to_thread=in_thread)
        except (StageFailed, NoPluginAnsweredError) as exc:
            stream = self.stream_failed(exc, cand, sctx)
            return FirstAttempt(cand=cand, stream=stream) if stream is not None else self.failed("no_plugin", cand.url)
        self.note("stream_io", answer)
        return FirstAttempt(cand=cand, stream=answer.result)

    def stream_failed(self, exc: Exception, cand: _Candidate, sctx: StreamContext) -> StreamResult | None:
        """A ``stream_io`` that raised after writing is a ``retry`` from the resume decision; ``None``: no plugin answered."""
        if isinstance(exc, NoPluginAnsweredError):
            log.error("no plugin answered stream_io", error=str(exc), job_key=self.job_key.key)
            return None
        assert isinstance(exc, StageFailed)
        effects = sctx.effects
        log.warning("stream_io failed after writing; retrying from the resume decision",
                    plugin=exc.plugin, error=repr(exc.error), bytes_written=effects.bytes_written)
        self.plugins["stream_io"], self.fallbacks["stream_io"] = exc.plugin, False
        return StreamResult(status="retry", reason="stage_failed", url=redact_url(cand.url),
                            bytes_written=effects.bytes_written, resumed_from=sctx.decision.offset)

    def finish(self, cand: _Candidate, paths: StagePaths, stream: StreamResult) -> JobResult | None:
        """Dispatch ``finalize`` for a complete ``stream``: the job's result, or ``None`` when the part was refused (next candidate)."""
        if self.before_finalize is not None:
            self.before_finalize(stream)
        try:
            answer = self.dispatcher.call(self.selections["finalize"], self.finalize_context(paths, stream))
        except (NoPluginAnsweredError, StageFailed) as exc:
            return self.finalize_failed(exc, cand)
        return self.finalized(cand, answer)

    async def finish_first(self, first: FirstAttempt, to_thread: Callable[..., Awaitable[Any]],
                           before_finalize: Callable[[StreamResult], Awaitable[None]]) -> JobResult:
        """The job's result from its complete first attempt, ``finalize`` on the event loop (see ``Dispatcher.call_async``).

        For a job with one candidate URL: a refused part ends it. ``before_finalize(stream)`` is
        awaited first, in place of the run's own (the lane records the finalize intents of the jobs
        finishing together in one transaction); ``to_thread(fn, ctx)`` runs a synchronous ``finalize``.
        """
        cand, stream = first.cand, first.stream
        self.account(cand, stream)
        paths = self.paths(cand.url)
        await before_finalize(stream)
        try:
            answer = await self.dispatcher.call_async(self.selections["finalize"], self.finalize_context(paths, stream), to_thread=to_thread)
        except (NoPluginAnsweredError, StageFailed) as exc:
            return self.finalize_failed(exc, cand)
        return self.finalized(cand, answer) or self.failed(self.failure or "failed", self.failure_url)

    def finalize_context(self, paths: StagePaths, stream: StreamResult) -> FinalizeContext:
        return FinalizeContext(job=self.job, job_key=self.job_key, paths=paths, stream=stream, lease=self.lease, effects=Effects(),
                               options=self.options)

    def finalize_failed(self, exc: Exception, cand: _Candidate) -> JobResult:
        """The ``failed`` result of a ``finalize`` no plugin answered, or that raised after the rename."""
        if isinstance(exc, NoPluginAnsweredError):
            log.error("no plugin answered finalize", error=str(exc), job_key=self.job_key.key)
            return self.failed("no_plugin", cand.url)
        assert isinstance(exc, StageFailed)
        log.error("finalize failed after the rename", plugin=exc.plugin, error=repr(exc.error))
        self.plugins["finalize"], self.fallbacks["finalize"] = exc.plugin, False
        return self.failed("stage_failed", cand.url)

    def finalized(self, cand: _Candidate, answer: Answer) -> JobResult | None:
        """The result ``finalize``'s ``answer`` gives the job (``None``: the part was refused, the next candidate is tried)."""
        self.note("finalize", answer)
        done = answer.result
        self.detected_type = done.detected_type or self.detected_type
        if not done.ok:
            self.failure, self.failure_url = done.reason or "finalize_failed", cand.url
            log.warning("finalize refused the part", url=redact_url(cand.url), reason=done.reason)
            return None
        outcome = "resumed" if cand.resumed_from > 0 else "downloaded"
        return self.result(outcome, url=redact_url(cand.url), path=done.path, size=done.size, sha256=done.sha256,
                           resumed_from=cand.resumed_from, verified_by=done.verified_by, mtime_ns=done.mtime_ns)

    def not_modified(self, cand: _Candidate, paths: StagePaths, stream: StreamResult) -> JobResult:
        record = self.record
        path = paths.final
        size = record.size if record is not None else None
        sha256 = record.sha256 if record is not None else None
        if size is None:
            try:
                size = path.stat().st_size
            except OSError:
                size = None
        return self.result(
            "not_modified", url=redact_url(cand.url), path=path, size=size, sha256=sha256,
            etag=stream.etag or (record.etag if record else None),
            last_modified=stream.last_modified or (record.last_modified if record else None),
            content_type=stream.content_type or (record.content_type if record else None),
        )

