"""``contentdownload run``: a job list, a bounded pool of workers, one record per outcome.

The run plans the list into the job store, then worker threads claim jobs one at a
time (with leases when idempotency is on, so several processes or machines can share a
store) and process them; on a persistent store, in several processes forked after
planning (:mod:`~contentdownload.jobs.processes`). Every outcome becomes one manifest row; the metrics file is
written at the end, also when jobs failed or the run was interrupted.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import attrs

from contentdownload.errors import Cancelled, DamagedStoreError, DiskError, DiskIOError, LeaseLostError, StoreError, StoreUnavailableError
from contentdownload.transfer import durability
from contentdownload.transfer.http import HttpClient
from contentdownload.transfer.options import client_options
from contentdownload.jobs.inputs import BadLine
from contentdownload.jobs.ledger import ManifestLedger
from contentdownload.records.guard import write_problem
from contentdownload.records.log import EVENTS, get_logger
from contentdownload.records.manifest import ManifestWriter, read_manifest
from contentdownload.records.tally import Tally
from contentdownload.records.metrics import DECISION_EVENT, build_metrics, previous_totals, with_folder_totals, write_metrics
from contentdownload.hooks.model import Job, JobResult, TransferOptions
from contentdownload.jobs import fastlane
from contentdownload.jobs.hosts import HostSlots
from contentdownload.jobs.pipeline import Pipeline
from contentdownload.jobs.processes import Channel, Children, process_count
from contentdownload.jobs.planner import PLAN_PAGE, Plan, item_for_claim, plan_jobs, remaining, finished_elsewhere
from contentdownload.jobs.rebuild import damaged, rebuild_from_manifest
from contentdownload.cli.progress import Progress
from contentdownload.store import open_store
from contentdownload.store.memory import MemoryStore
from contentdownload.transfer.urls import redact_url
from contentdownload.jobs.worker import JobWorker, log_outcome, make_owner
from contentdownload.jobs.workspace import Workspace

log = get_logger(__name__)

EXIT_OK, EXIT_FAILED = 0, 1


@attrs.frozen
class RunReport:
    """What a run did: the results kept, the metrics written, the exit code.

    ``results``: the results kept whole (:class:`~contentdownload.records.tally.Tally`: the
    first failures, then the first results of other outcomes, each in completion order);
    ``dropped``: the results of the run not kept (the metrics count every one). ``planned``: jobs of the list (after ``--max``); ``left``: how many of them did not end
    finished, skipped or failed (by this process or another), and ``left_reason`` why;
    ``error``: the one line naming an infrastructure failure (the job store, a full or
    read-only disk) that stopped the run; ``record_errors``: one line per record file
    (manifest, metrics) that could not be written.
    """

    results: Sequence[JobResult]
    metrics: dict
    exit_code: int
    workspace: Workspace
    planned: int = 0
    left: int = 0
    left_reason: str | None = None
    error: str | None = None
    record_errors: Sequence[str] = ()
    dropped: int = 0


def transfer_options(settings: Any) -> TransferOptions:
    return TransferOptions(
        max_bytes=settings.max_bytes,
        chunk_size=settings.chunk_size,
        timeout=(settings.connect_timeout, settings.timeout),
        revalidate=settings.revalidate,
        accept_any_content=settings.accept_any_content,
        low_speed_limit=settings.low_speed_limit,
        low_speed_time=settings.low_speed_time,
        max_time=settings.max_time,
    )


def make_http(settings: Any, environ: Mapping[str, str] | None = None) -> HttpClient:
    """The client of a run: timeouts and retries, and the request options of :mod:`contentdownload.transfer.options`."""
    return HttpClient(
        timeout=(settings.connect_timeout, settings.timeout),
        retries=settings.retries,
        backoff_factor=settings.backoff_factor,
        pool_maxsize=max(settings.workers, settings.per_host),
        **client_options(settings, os.environ if environ is None else environ),
    )


def open_job_store(runtime: Any, ws: Workspace) -> Any:
    """The persistent store (``--db`` or SQLite in the output folder), or memory when the schema flag is off.

    A store created now for a folder that has a manifest (its ``jobs.db`` was deleted or
    emptied) gets the folder's records back from the manifest and the files on disk first.
    """
    if not runtime.policy.streaming_schema.enabled:
        return open_store("memory:")
    try:
        store = open_store(runtime.settings.db or ws.default_db, retry_s=runtime.settings.store_retry_s)
    except DamagedStoreError as exc:
        raise damaged(exc, ws.out, runtime.settings.db) from None
    store.location = ws.location
    if store.created and ws.manifest.is_file():
        try:
            rebuilt = rebuild_from_manifest(store, ws)
        except BaseException:
            store.close()
            raise
        log.warning(f"{rebuilt.line()}: the job store {redact_url(store.url)} was new")
    return store


class Run:
    """One execution of ``contentdownload run`` over a list of jobs.

    ``store_factory(runtime, workspace)`` opens the job store (default :func:`open_job_store`).
    Nothing a job raises ends a worker thread: it becomes that job's result, or, for an
    error of the job store, stops the run cleanly (parts kept, records written, exit 1).
    The exit code comes from the plan: 0 only when every planned job ended finished or
    skipped, by this process or another.
    """

    def __init__(
        self,
        runtime: Any,
        out: str | Path,
        entries: Sequence[Job | BadLine],
        *,
        resume_from: str | Path | None = None,
        show_progress: bool | None = None,
        install_signal_handlers: bool = False,
        store_factory: Callable[[Any, Workspace], Any] = open_job_store,
    ):
        self.runtime = runtime
        self.settings = runtime.settings
        self.ws = Workspace.open(out)
        self.entries = list(entries)
        if resume_from is None and not runtime.policy.streaming_schema.enabled and self.ws.manifest.is_file():
            resume_from = self.ws.manifest  # without the store, the manifest is the only record
        self.resume_from = read_manifest(resume_from) if resume_from else None
        self.show_progress = self.settings.progress if show_progress is None else show_progress
        self.install_signal_handlers = install_signal_handlers
        self.store_factory = store_factory
        self.leasing = runtime.policy.idempotency.enabled
        self.run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
        self.cancel = threading.Event()
        self.owner = make_owner()
        self._tally = Tally()  # every outcome of this run counted; whole results only the first few
        self._ended: set[str] = set()  # job keys with an outcome recorded by this run
        self._lock = threading.Lock()
        self._signal: int | None = None
        self._store_error: str | None = None
        self._disk_error: DiskError | None = None
        self._disk_failed: set[str] = set()  # job keys stopped by the disk: left for a rerun
        self._record_errors: list[str] = []
        self._http: HttpClient | None = None
        self._children: Children | None = None  # the worker processes this one forked
        self._channel: Channel | None = None  # in a forked worker process: the pipe to the parent
        self._unsent: list[str] = []  # in a forked worker process: keys of the jobs ended since the last report
        self._per_host = self.settings.per_host  # this process's share of --per-host
        self._processes = 1  # worker processes of the run, this one included
        self._job_ended = threading.Condition()  # notified when a job of this process (or of a worker process) ends
        self._ended_count = 0
        self._child_decisions = 0  # decision lines the worker processes logged
        self._by_process: dict[int, int] = {}  # pid -> jobs it ended after planning
        self._batches: list[int] = []  # sizes of the commit batches of the worker processes
        self._child_throttled: list[dict] = []  # each worker process's hosts that asked for a pause
        self.jobs_on_loop = 0  # jobs this process (and its worker processes) ran on the event-loop lane

    # -- entry point ----------------------------------------------------------------

    def execute(self) -> RunReport:
        started = time.monotonic()
        decisions_before = EVENTS.get(DECISION_EVENT)
        self._batches_before = len(durability.commit_batches())
        jobs = [e for e in self.entries if isinstance(e, Job)][: self.settings.max_jobs]
        store = self.store_factory(self.runtime, self.ws)
        manifest = ManifestWriter(self.ws.manifest)
        self._ledger = ManifestLedger(store, manifest, self.run_id, self.ws.out)
        self._http = http = make_http(self.settings)
        previous_handlers = self._install_signals() if self.install_signal_handlers else {}
        plan: Plan | None = None
        try:
            plan = self._plan(store, jobs)
            self._drive(plan, store, http)
        except KeyboardInterrupt:
            self._on_signal(signal.SIGINT, None)
        except (StoreError, StoreUnavailableError) as exc:  # while planning or recording what planning settled
            self._store_down(store, exc)
        except OSError as exc:  # the disk, while planning or recording what planning settled
            disk = DiskError.of(exc)
            if disk is None:
                raise
            self._disk_down(disk)
        finally:
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
            self._save(self.ws.manifest, manifest.close)
            left = self._left(store, plan, len(jobs))
            metrics = self._metrics(store, started, decisions_before, planned=len(jobs), left=left)
            metrics = with_folder_totals(metrics, previous_totals(self.ws.metrics))
            self._save(self.ws.metrics, lambda: write_metrics(self.ws.metrics, metrics))
            store.close()
            http.close()
        return RunReport(results=self._tally.results, dropped=self._tally.dropped, metrics=metrics, exit_code=self._exit_code(left), workspace=self.ws,
                         planned=len(jobs), left=left, left_reason=metrics["left_reason"],
                         error=self._stop_line(left, len(jobs)), record_errors=tuple(self._record_errors))

    def _save(self, path: Path, write: Callable[[], None]) -> None:
        """Write one record file; its failure (a full or read-only disk...) is one line of the report, not an exception."""
        try:
            write()
        except OSError as exc:
            line = f"could not write {path}: {exc.strerror or exc}"
            self._record_errors.append(line)
            log.info(line)  # the report carries the line (the CLI prints it)

    def _plan(self, store: Any, jobs: Sequence[Job]) -> Plan:
        """Plan the jobs into the store and record what is settled already (and the bad input lines), page by page."""
        bad = [e for e in self.entries if isinstance(e, BadLine)]
        self._settle_many([JobResult(outcome="failed", job=Job(urls=(line.text or "-",), line=line.line),
                                     reason=f"bad_input: line {line.line}: {line.reason}") for line in bad], leasing=False)
        settled = [0, 0, 0]  # jobs, failed, bytes

        def on_settled(results: list[JobResult]) -> None:
            self._settle_many(results, self.leasing)
            settled[0] += len(results)
            settled[1] += sum(r.outcome == "failed" for r in results)
            settled[2] += sum(r.size or 0 for r in results)

        plan = plan_jobs(
            self.runtime, store, self.ws, jobs, on_settled=on_settled,
            revalidate=self.settings.revalidate, retry_failed=self.settings.retry_failed, resume_from=self.resume_from,
        )
        self._progress = Progress(total=len(plan.items) + plan.settled_count + len(bad), enabled=self.show_progress)
        self._progress.done_counts(settled[0] + len(bad), settled[1] + len(bad), settled[2])
        return plan

    def _drive(self, plan: Plan, store: Any, http: HttpClient) -> None:
        """Fork the worker processes (see :mod:`~contentdownload.jobs.processes`), work, and wait for them."""
        count = process_count(self.settings.processes, len(plan.items), shared_store=self.leasing and not isinstance(store, MemoryStore))
        self._per_host = max(1, self.settings.per_host // count)  # --per-host, --host-rate, --limit-rate count for all processes together
        self._processes = count
        http.share_rates(count)
        if count > 1:
            self._children = Children()
            self._children.fork(count - 1, lambda channel: self._child(channel, plan), self._on_child_message)
            log.info("worker_processes_started", processes=count, pids=[os.getpid(), *self._children.pids])
        self._by_process = {os.getpid(): 0, **dict.fromkeys(self._children.pids if self._children else (), 0)}
        before = self._tally.jobs
        self._drive_threads(plan, store, http)
        if self._children is not None:
            self._children.wait()
        with self._lock:
            self._by_process[os.getpid()] = self._tally.jobs - before - sum(self._by_process.values())
        self._progress.close()

    def _drive_threads(self, plan: Plan, store: Any, http: HttpClient) -> None:
        """Work this process's share of the plan until it is done, the run is interrupted or the store is lost.

        On the event-loop lane (:mod:`~contentdownload.jobs.fastlane`) when ``transport`` is
        ``auto`` and jobs are leased, else in ``--workers`` threads. Either runs in threads of
        its own, so that this one answers signals and forwards a worker process's results.
        """
        if not plan.items:
            return  # planning settled every job: no lane, no threads, no claim
        worker = self._worker(store, http)
        self._queue = deque(plan.order) if not self.leasing else deque()
        if self.settings.transport == "auto" and self.leasing:
            threads = [threading.Thread(target=self._lane, args=(worker, plan, store, http), name="contentdownload-lane", daemon=True)]
        else:
            threads = self._worker_threads(worker, plan, store, min(self.settings.workers, max(1, len(plan.items))))
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(timeout=0.2)
                self._send_results()

    def _worker_threads(self, worker: JobWorker, plan: Plan, store: Any, count: int) -> list[threading.Thread]:
        """``count`` worker threads (not started), each claiming and processing jobs until none is left."""
        return [threading.Thread(target=self._work, args=(worker, plan, store), name=f"worker-{i}", daemon=True) for i in range(count)]

    def _worker(self, store: Any, http: HttpClient) -> JobWorker:
        options = transfer_options(self.settings)
        return JobWorker(
            self.runtime,
            Pipeline(self.runtime, http, options, retries=self.settings.retries, backoff_factor=self.settings.backoff_factor),
            store, self.ws, options,
            owner=self.owner, lease_ttl=self.settings.lease_ttl, leasing=self.leasing, cancel=self.cancel,
            host_gate=HostSlots(self._per_host),
            progress=lambda item: self._progress.job(item.key.key, item.relative_path, item.job.size),
            on_result=lambda result: self._emit(result, self.leasing),
            on_results=lambda results, then: self._emit_many(results, self.leasing, then),
        )

    def _lane(self, worker: JobWorker, plan: Plan, store: Any, http: HttpClient) -> None:
        """The event-loop lane; should it fail, worker threads take over what is left (never raises)."""
        try:
            fastlane.FastLane(self, worker, plan, store, http).drive()
        except Exception as exc:  # a bug of the lane must not cost the run: the threads do the rest
            log.error("the event-loop lane failed; worker threads go on with the jobs left",
                      error=f"{type(exc).__name__}: {exc}", exc_info=True)
            threads = self._worker_threads(worker, plan, store, self.settings.workers)
            for t in threads:
                t.start()
            for t in threads:
                t.join()

    # -- worker processes -----------------------------------------------------------

    def _child(self, channel: Channel, plan: Plan) -> None:
        """A forked worker process: its own store connection, client, manifest writer and lease owner; reports to the parent."""
        self._channel, self._children = channel, None
        self._tally, self._ended, self._unsent, self._record_errors = Tally(), set(), [], []
        self._job_ended = threading.Condition()  # a fresh one: a thread of the parent may have held the old one's lock
        self.owner = make_owner()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._on_child_signal)
        telemetry_before, decisions_before = self.runtime.telemetry.state(), EVENTS.get(DECISION_EVENT)
        self._batches_before = 0  # a forked process starts with no committer
        store = self.store_factory(self.runtime, self.ws)
        manifest = ManifestWriter(self.ws.manifest)
        self._ledger = ManifestLedger(store, manifest, self.run_id, self.ws.out)
        self._http = http = make_http(self.settings)
        http.share_rates(self._processes)
        self._progress = Progress(total=0, enabled=False)
        try:
            self._drive_threads(plan, store, http)
        finally:
            self._save(self.ws.manifest, manifest.close)
            store.close()
            http.close()
            self._send_results()
            channel.send(("done", os.getpid(), {"telemetry": (self.runtime.telemetry.state(), telemetry_before),
                                   "decisions": EVENTS.get(DECISION_EVENT) - decisions_before, "store_error": self._store_error,
                                   "disk_error": self._disk_error, "disk_failed": sorted(self._disk_failed),
                                   "throttled": http.pacer.throttled(), "record_errors": self._record_errors,
                                   "batches": durability.commit_batches(), "jobs_on_loop": self.jobs_on_loop}))

    def _send_results(self) -> None:
        """In a worker process: send the tally of the results not sent yet, and their job keys, to the parent."""
        if self._channel is None:
            return
        with self._lock:
            tally, ended, self._unsent = self._tally.take(), self._unsent, []
        if tally.jobs:
            self._channel.send(("results", os.getpid(), {"tally": tally, "ended": ended}))

    def _on_child_message(self, message: tuple[str, int, Any]) -> None:
        """In the parent: count a worker process's results, hook counters and store error as this run's."""
        kind, pid, body = message
        if kind == "results":
            tally = body["tally"]
            with self._lock:
                self._tally.merge(tally)
                self._by_process[pid] = self._by_process.get(pid, 0) + tally.jobs
                self._ended.update(body["ended"])
            self._progress.done_tally(tally)
            self._notify_job_end()
        elif kind == "done":
            self.runtime.telemetry.merge(*body["telemetry"])
            with self._lock:
                self._child_decisions += body["decisions"]
                self.jobs_on_loop += body["jobs_on_loop"]
                self._batches.extend(body["batches"])
                self._store_error = self._store_error or body["store_error"]
                self._disk_failed.update(body["disk_failed"])
                self._child_throttled.append(body["throttled"])
                self._record_errors.extend(body["record_errors"])
            if body["store_error"]:
                self.cancel.set()
            if body["disk_error"] is not None:  # the same output folder: the run stops as if this process had met it
                self._disk_down(body["disk_error"])
        else:
            log.error("a worker process failed; its jobs are left for a rerun", pid=pid, error=body)

    def _on_child_signal(self, signum: int, frame: Any) -> None:
        """In a worker process: stop as the parent does (the parent alone answers a second signal)."""
        self._signal = signum
        self.cancel.set()
        if self._http is not None:
            self._http.abort()

    # -- the end: what is left, metrics, exit code ----------------------------------

    def _left(self, store: Any, plan: Plan | None, planned: int) -> int:
        """Planned jobs that did not end finished, skipped or failed (by this run or, per the store, another)."""
        if plan is None:
            return planned
        undone = (set(plan.keys) - self._ended) | self._disk_failed
        if undone and self.leasing and self._store_error is None:
            try:
                undone -= finished_elsewhere(store, undone)
            except Exception as exc:  # the store may be what failed; then the count stays as this run knows it
                log.warning("could not ask the job store what other processes finished", error=f"{type(exc).__name__}: {exc}")
        return len(undone)

    def _left_reason(self, left: int) -> str | None:
        if not left:
            return None
        if self._signal is not None:
            return f"interrupted ({signal.Signals(self._signal).name})"
        if self._disk_error is not None:
            return f"{self._disk_error.what} under {self.ws.out}"
        if self._store_error is not None:
            return "the job store is unavailable"
        return "not finished (see the log)"

    def _stop_line(self, left: int, planned: int) -> str | None:
        """The one line naming the infrastructure failure that stopped the run (``None``: none did)."""
        disk = self._disk_error
        if disk is None:
            return self._store_error
        return (f"{disk.reason}: {disk.what} under {self.ws.out}: {left} of {planned} planned jobs left; "
                f"{disk.advice} and run the same command again")

    def _metrics(self, store: Any, started: float, decisions_before: int, *, planned: int, left: int) -> dict:
        return build_metrics(
            self._tally, self.runtime.telemetry, run_id=self.run_id, elapsed_s=time.monotonic() - started,
            decisions_logged=EVENTS.get(DECISION_EVENT) - decisions_before + self._child_decisions,
            extra={"interrupted": self._signal is not None, "store": redact_url(store.url) if hasattr(store, "url") else None,
                   "idempotency": self.runtime.policy.idempotency.enabled,
                   "streaming_schema": self.runtime.policy.streaming_schema.enabled,
                   "durability": self.settings.durability, "commit_batches": self._commit_batches(),
                   "transport": self.settings.transport, "jobs_on_loop": self.jobs_on_loop,
                   "processes": max(1, len(self._by_process)), "jobs_per_process": sorted(self._by_process.values(), reverse=True),
                   "jobs_planned": planned, "jobs_left": left, "left_reason": self._left_reason(left),
                   "store_error": self._store_error, "disk_error": self._disk_error.reason if self._disk_error else None,
                   "throttled_hosts": self._throttled_hosts()},
        )

    def _throttled_hosts(self) -> dict[str, dict[str, float]]:
        """The hosts that asked this run's processes for a pause: responses and seconds asked, summed over the processes."""
        every = [self._http.pacer.throttled() if self._http is not None else {}, *self._child_throttled]
        total: dict[str, dict[str, float]] = {}
        for throttled in every:
            for host, seen in throttled.items():
                into = total.setdefault(host, {"responses": 0, "paused_s": 0.0})
                into["responses"] += seen["responses"]
                into["paused_s"] = round(into["paused_s"] + seen["paused_s"], 3)
        return total

    def _commit_batches(self) -> dict:
        """How many commit batches promoted files at durability ``batch``, and how large they were."""
        sizes = durability.commit_batches()[self._batches_before:] + self._batches
        return {"count": len(sizes), "files": sum(sizes), "largest": max(sizes, default=0)}

    def _exit_code(self, left: int) -> int:
        if self._signal is not None:
            return 128 + self._signal
        return EXIT_FAILED if self._tally.failed or left or self._store_error or self._disk_error else EXIT_OK

    # -- workers --------------------------------------------------------------------

    def _next_item(self, plan: Plan, store: Any) -> Any:
        """The next claim (leasing) or queued key; ``None`` when this run has nothing left to do."""
        if not self.leasing:
            with self._lock:
                return plan.items[self._queue.popleft()] if self._queue else None
        while not self.cancel.is_set():
            seen = self._ended_count
            claim = store.claim(self.owner, self.settings.lease_ttl, keys=plan.keys)
            if claim is not None:
                return item_for_claim(plan, claim)
            if not remaining(store, plan.keys):
                return None
            self._await_job_end(seen, min(1.0, self.settings.lease_ttl / 4))  # another worker holds the rest
        return None

    def _await_job_end(self, seen: int, timeout: float) -> None:
        """Wait until a job ends after the ``seen``-th (then the rest may be done), the run is cancelled, or ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._job_ended:
            while self._ended_count == seen and not self.cancel.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._job_ended.wait(min(left, 0.1))  # a signal sets cancel without notifying: look at it often

    def _notify_job_end(self) -> None:
        with self._job_ended:
            self._ended_count += 1
            self._job_ended.notify_all()

    def _work(self, worker: JobWorker, plan: Plan, store: Any) -> None:
        """A worker thread: claim and process jobs until none is left; never raises."""
        while not self.cancel.is_set():
            try:
                item = self._next_item(plan, store)
            except Exception as exc:  # claiming is the store's work: whatever it raises, the store (or its disk) failed
                disk = DiskError.of(exc)
                if disk is not None:
                    self._disk_down(disk)
                else:
                    self._store_down(store, exc)
                return
            if item is None:
                return
            self._process(worker, item, store)
            self._notify_job_end()

    def _process(self, worker: JobWorker, item: Any, store: Any) -> None:
        """One job to its record (the worker emits the row before recording); never raises."""
        try:
            self._progress.done(worker.process(item))
        except Exception as exc:
            self._job_stopped(item, store, exc)

    def _job_stopped(self, item: Any, store: Any, exc: Exception) -> None:
        """A job that raised instead of ending with a result: interrupted, taken over, stopped by the store or the disk,
        or a bug (which costs that job, as an ``internal_error``, not the run); never raises."""
        if isinstance(exc, Cancelled):
            log.info("job_interrupted", job_key=item.key.key, url=redact_url(item.job.url), part_kept=bool(self.ws.parts_of(item.key.key)))
            self._release(store, item)
            return
        if isinstance(exc, LeaseLostError):
            log.warning("lease taken over by another worker; not finalizing", job_key=item.key.key, error=str(exc))
            return
        if isinstance(exc, (StoreError, StoreUnavailableError)):  # parts and the finalize intent are kept: a rerun resumes or recovers
            self._store_down(store, exc)
            self._release(store, item)
            return
        disk = DiskError.of(exc)
        if disk is not None:
            self._disk_stopped(store, item, disk)
            return
        log.error("job crashed", job_key=item.key.key, error=f"{type(exc).__name__}: {exc}", exc_info=exc)
        result = JobResult(outcome="failed", job=item.job, job_key=item.key.key, reason=f"internal_error: {type(exc).__name__}", url=item.job.url)
        try:
            if self.leasing:
                store.fail(item.key.key, item.epoch, result.reason, retryable=False, max_attempts=1)
            self._settle(result, self.leasing)
            self._progress.done(result)
        except (StoreError, StoreUnavailableError) as exc:
            self._store_down(store, exc)
        except Exception as exc:  # the manifest could not take the row: the job is left for a rerun
            log.error("could not record a job's outcome", job_key=item.key.key, error=f"{type(exc).__name__}: {exc}")
            disk = DiskError.of(exc)
            if disk is not None:
                self._disk_down(disk)

    def _release(self, store: Any, item: Any) -> None:
        """Give the job's lease back so a rerun can take it at once (best effort: the store may be away)."""
        if not self.leasing:
            return
        try:
            store.release(item.key.key, item.epoch)
        except Exception as exc:  # expected once the disk is full or read-only: no warning each time
            (log.info if self._disk_error else log.warning)(
                "could not release a lease; it expires on its own", job_key=item.key.key, error=f"{type(exc).__name__}: {exc}")

    def _disk_stopped(self, store: Any, item: Any, disk: DiskError) -> None:
        """A job the disk stopped: the run stops, the job's part and lease are left for a rerun, its row written if it fits.

        A job whose outcome row is written already (the disk failed the store's record of
        it) keeps that outcome: a rerun finds its file and finalize intent and recovers it.
        """
        disk = self._disk_down(disk)
        self._release(store, item)
        result = JobResult(outcome="failed", job=item.job, job_key=item.key.key, reason=disk.reason, url=item.job.url)
        with self._lock:
            if item.key.key in self._ended:
                return
            self._tally.add(result)
            self._disk_failed.add(item.key.key)
        self._progress.done(result)
        try:
            self._ledger.write(result, leasing=self.leasing)
        except Exception as exc:  # the same disk, most likely: the summary and the stop line still say it
            log.info("could not write a job's row", job_key=item.key.key, reason=disk.reason, error=f"{type(exc).__name__}: {exc}")

    def _disk_down(self, disk: DiskError) -> DiskError:
        """The output folder's filesystem is full, read-only or failing: stop claiming, let the other workers stop, keep every part.

        An I/O error is looked at again: when the folder now refuses to create a file for
        another reason (ext4 turns read-only after an error), that reason is the error. Returns it.
        """
        if isinstance(disk, DiskIOError):
            disk = DiskError.of(write_problem(self.ws.out) or disk) or disk
        with self._lock:
            first = self._disk_error is None
            if first:
                self._disk_error = disk
        if first:
            log.error(f"stopping the run: {disk.what} under {self.ws.out}", reason=disk.reason, error=str(disk))
        self.cancel.set()
        return disk

    def _store_down(self, store: Any, exc: BaseException) -> None:
        """An infrastructure error: stop claiming, let the other workers stop, keep every part."""
        where = redact_url(store.url) if hasattr(store, "url") else type(store).__name__
        line = f"the job store {where} is unavailable: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
        with self._lock:
            first = self._store_error is None
            if first:
                self._store_error = line
        if first:
            log.error("stopping the run: " + line, exc_info=not isinstance(exc, (StoreError, StoreUnavailableError)))
        self.cancel.set()

    def _settle(self, result: JobResult, leasing: bool) -> None:
        """Log and record an outcome the worker did not produce (input errors, planning, a crash)."""
        log_outcome(result)
        self._emit(result, leasing)

    def _settle_many(self, results: Sequence[JobResult], leasing: bool) -> None:
        """:meth:`_settle` for many outcomes: their rows and ledger ops in batches of a planning page."""
        for start in range(0, len(results), PLAN_PAGE):
            page = results[start:start + PLAN_PAGE]
            for result in page:
                log_outcome(result)
            self._emit_many(page, leasing)

    def _emit_many(self, results: Sequence[JobResult], leasing: bool, then: Callable[[], Any] | None = None) -> None:
        """Record a batch of outcomes: their manifest rows with one fsync (``then()`` in the transaction that
        records the rows written), each counted as :meth:`_emit` does."""
        self._ledger.write_many(results, leasing=leasing, then=then)
        with self._lock:
            for result in results:
                self._count(result)

    def _emit(self, result: JobResult, leasing: bool) -> None:
        """Record one outcome: a manifest row written once per job (the ledger's manifest op), counted in metrics."""
        self._ledger.write(result, leasing=leasing)
        with self._lock:
            self._count(result)

    def _count(self, result: JobResult) -> None:
        """An outcome recorded by this process: in the tally, among the ended jobs (and those to report to the parent)."""
        self._tally.add(result)
        if result.job_key:
            self._ended.add(result.job_key)
            if self._channel is not None:
                self._unsent.append(result.job_key)

    # -- signals --------------------------------------------------------------------

    def _install_signals(self) -> dict[int, Any]:
        return {signum: signal.signal(signum, self._on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}

    def _on_signal(self, signum: int, frame: Any) -> None:
        """First SIGINT/SIGTERM: stop every worker (blocked reads too) and save state; a second: stop at once."""
        if self._signal is not None:
            sys.stderr.write("contentdownload: second signal, stopping now\n")
            sys.stderr.flush()
            os._exit(128 + self._signal)
        self._signal = signum
        log.warning("run_interrupted", signal=signal.Signals(signum).name)
        sys.stderr.write("contentdownload: interrupted, saving state (send it again to stop at once)\n")
        sys.stderr.flush()
        self.cancel.set()
        if self._children is not None:
            self._children.signal(signum)
        if self._http is not None:
            self._http.abort()
