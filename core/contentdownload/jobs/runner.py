"""``contentdownload run``: a job list, a bounded pool of workers, one record per outcome.

The run plans the list into the job store, then worker threads claim jobs one at a
time (with leases when idempotency is on, so several processes or machines can share a
store) and process them. Every outcome becomes one manifest row; the metrics file is
written at the end, also when jobs failed or the run was interrupted.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
import uuid
from collections import defaultdict, deque
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

import attrs

from contentdownload.errors import Cancelled, LeaseLostError
from contentdownload.transfer.http import HttpClient
from contentdownload.jobs.inputs import BadLine
from contentdownload.jobs.keys import operation_key
from contentdownload.records.log import EVENTS, get_logger
from contentdownload.records.manifest import ManifestWriter, iter_rows, read_manifest, result_row
from contentdownload.records.metrics import DECISION_EVENT, build_metrics, write_metrics
from contentdownload.hooks.model import Job, JobResult, TransferOptions
from contentdownload.jobs.pipeline import Pipeline
from contentdownload.jobs.planner import Plan, item_for_claim, plan_jobs, remaining
from contentdownload.cli.progress import Progress
from contentdownload.store import open_store
from contentdownload.jobs.worker import JobWorker, make_owner
from contentdownload.jobs.workspace import Workspace

log = get_logger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130


@attrs.frozen
class RunReport:
    """What a run did: results in completion order, the metrics written, the exit code."""

    results: Sequence[JobResult]
    metrics: dict
    exit_code: int
    workspace: Workspace


def manifest_op(job_key: str, outcome: str, reason: str, run_id: str) -> str:
    """The ledger key of a manifest row: a success once per job, a revalidation once per run, a failure once per reason."""
    kind = {"not_modified": f"manifest:not_modified:{run_id}", "failed": f"manifest:failed:{reason}"}.get(outcome, "manifest")
    return operation_key(job_key, kind)


def rows_on_disk(path: Path) -> frozenset[str]:
    """Ledger keys of the rows the manifest already holds (the file is the truth when the ledger lags)."""
    if not path.is_file():
        return frozenset()
    return frozenset(
        manifest_op(row["job_key"], row.get("outcome", ""), row.get("reason", ""), row.get("run_id", ""))
        for row in iter_rows(path)
        if row.get("job_key")
    )


class HostGate:
    """At most ``limit`` concurrent transfers per host."""

    def __init__(self, limit: int):
        self.limit = limit
        self._lock = threading.Lock()
        self._gates: dict[str, threading.Semaphore] = defaultdict(lambda: threading.Semaphore(limit))

    def __call__(self, url: str) -> threading.Semaphore:
        host = (urlsplit(url).hostname or "").lower()
        with self._lock:
            return self._gates[host]


def transfer_options(settings: Any) -> TransferOptions:
    return TransferOptions(
        max_bytes=settings.max_bytes,
        chunk_size=settings.chunk_size,
        timeout=(settings.connect_timeout, settings.timeout),
        revalidate=settings.revalidate,
    )


def make_http(settings: Any) -> HttpClient:
    return HttpClient(
        timeout=(settings.connect_timeout, settings.timeout),
        retries=settings.retries,
        backoff_factor=settings.backoff_factor,
        verify=settings.verify_tls,
        pool_maxsize=max(settings.workers, settings.per_host),
    )


def open_job_store(runtime: Any, ws: Workspace) -> Any:
    """The persistent store (``--db`` or SQLite in the output folder), or memory when the schema flag is off."""
    if not runtime.policy.streaming_schema.enabled:
        return open_store("memory:")
    return open_store(runtime.settings.db or ws.default_db, retry_s=runtime.settings.store_retry_s)


class Run:
    """One execution of ``contentdownload run`` over a list of jobs."""

    def __init__(
        self,
        runtime: Any,
        out: str | Path,
        entries: Sequence[Job | BadLine],
        *,
        resume_from: str | Path | None = None,
        show_progress: bool | None = None,
        install_signal_handlers: bool = False,
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
        self.run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
        self.cancel = threading.Event()
        self.owner = make_owner()
        self._results: list[JobResult] = []
        self._lock = threading.Lock()

    # -- entry point ----------------------------------------------------------------

    def execute(self) -> RunReport:
        started = time.monotonic()
        decisions_before = EVENTS.get(DECISION_EVENT)
        jobs = [e for e in self.entries if isinstance(e, Job)]
        bad = [e for e in self.entries if isinstance(e, BadLine)]
        if self.settings.max_jobs is not None:
            jobs = jobs[: self.settings.max_jobs]
        store = open_job_store(self.runtime, self.ws)
        manifest = ManifestWriter(self.ws.manifest)
        self._rows_on_disk = rows_on_disk(self.ws.manifest)
        http = make_http(self.settings)
        interrupted = False
        previous_handler = self._install_sigint() if self.install_signal_handlers else None
        try:
            leasing = self.runtime.policy.idempotency.enabled
            plan = plan_jobs(
                self.runtime, store, self.ws, jobs,
                revalidate=self.settings.revalidate, retry_failed=self.settings.retry_failed,
                resume_from=self.resume_from,
            )
            for line in bad:
                self._emit(JobResult(outcome="failed", job=Job(urls=(line.text or "-",), line=line.line),
                                     reason=f"bad_input: line {line.line}: {line.reason}"), manifest, store, leasing=False)
            for result in plan.settled:
                self._emit(result, manifest, store, leasing)
            progress = Progress(total=len(plan.items) + len(plan.settled) + len(bad), enabled=self.show_progress)
            progress.done_many(plan.settled, bad=len(bad))
            worker = JobWorker(
                self.runtime,
                Pipeline(self.runtime, http, transfer_options(self.settings), retries=self.settings.retries,
                         backoff_factor=self.settings.backoff_factor),
                store, self.ws, transfer_options(self.settings),
                owner=self.owner, lease_ttl=self.settings.lease_ttl, leasing=leasing, cancel=self.cancel,
                host_gate=HostGate(self.settings.per_host), progress=progress.bytes,
                on_result=lambda result: self._emit(result, manifest, store, leasing),
            )
            threads = [
                threading.Thread(target=self._work, args=(worker, plan, store, manifest, progress, leasing), name=f"worker-{i}", daemon=True)
                for i in range(min(self.settings.workers, max(1, len(plan.items))))
            ]
            self._queue = deque(plan.order) if not leasing else deque()
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():
                    t.join(timeout=0.2)
            interrupted = self.cancel.is_set()
            progress.close()
        except KeyboardInterrupt:
            self.cancel.set()
            interrupted = True
        finally:
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)
            manifest.close()
            metrics = build_metrics(
                self._results, self.runtime.telemetry, run_id=self.run_id, elapsed_s=time.monotonic() - started,
                decisions_logged=EVENTS.get(DECISION_EVENT) - decisions_before,
                extra={"interrupted": interrupted, "store": store.url if hasattr(store, "url") else None,
                       "idempotency": self.runtime.policy.idempotency.enabled,
                       "streaming_schema": self.runtime.policy.streaming_schema.enabled},
            )
            write_metrics(self.ws.metrics, metrics)
            store.close()
            http.close()
        failed = any(r.outcome == "failed" for r in self._results)
        code = EXIT_INTERRUPTED if interrupted else EXIT_FAILED if failed else EXIT_OK
        return RunReport(results=list(self._results), metrics=metrics, exit_code=code, workspace=self.ws)

    # -- workers --------------------------------------------------------------------

    def _next_item(self, plan: Plan, store: Any, leasing: bool) -> Any:
        """The next claim (leasing) or queued key; ``None`` when this run has nothing left to do."""
        if not leasing:
            with self._lock:
                return plan.items[self._queue.popleft()] if self._queue else None
        while not self.cancel.is_set():
            claim = store.claim(self.owner, self.settings.lease_ttl, keys=plan.keys)
            if claim is not None:
                return item_for_claim(plan, claim)
            if not remaining(store, plan.keys):
                return None
            self.cancel.wait(min(1.0, self.settings.lease_ttl / 4))  # another worker holds the rest
        return None

    def _work(self, worker: JobWorker, plan: Plan, store: Any, manifest: ManifestWriter, progress: Progress, leasing: bool) -> None:
        while not self.cancel.is_set():
            item = self._next_item(plan, store, leasing)
            if item is None:
                return
            try:
                progress.done(worker.process(item))  # the worker emits the row before recording
                continue
            except Cancelled:
                if leasing:
                    store.release(item.key.key, item.epoch)
                return
            except LeaseLostError as exc:
                log.warning("lease taken over by another worker; not finalizing", job_key=item.key.key, error=str(exc))
                continue
            except Exception as exc:  # a bug must cost one job, not the run
                log.error("job crashed", job_key=item.key.key, error=f"{type(exc).__name__}: {exc}", exc_info=True)
                result = JobResult(outcome="failed", job=item.job, job_key=item.key.key, reason=f"internal_error: {type(exc).__name__}", url=item.job.url)
                if leasing:
                    try:
                        store.fail(item.key.key, item.epoch, result.reason, retryable=False, max_attempts=1)
                    except Exception:  # the store may be what failed
                        pass
            self._emit(result, manifest, store, leasing)
            progress.done(result)

    def _emit(self, result: JobResult, manifest: ManifestWriter, store: Any, leasing: bool) -> None:
        """Record one outcome: a manifest row written once per job (the ledger's manifest op), counted in metrics."""
        with self._lock:
            self._results.append(result)
        if leasing and result.job_key:
            op = manifest_op(result.job_key, result.outcome, result.reason, self.run_id)
            if store.op_begin(op, result.job_key, "manifest", 0) == "done":
                return
            if op in self._rows_on_disk:  # written before a crash that came before the ledger update
                store.op_done(op, {"run_id": self.run_id, "outcome": result.outcome, "reconciled": True})
                return
            manifest.write(result_row(result, self.run_id, self.ws.out))
            store.op_done(op, {"run_id": self.run_id, "outcome": result.outcome})
        else:
            manifest.write(result_row(result, self.run_id, self.ws.out))

    # -- Ctrl-C ---------------------------------------------------------------------

    def _install_sigint(self) -> Callable | None:
        def handler(signum: int, frame: Any) -> None:
            if self.cancel.is_set():
                sys.stderr.write("contentdownload: second interrupt, stopping now\n")
                sys.stderr.flush()
                import os

                os._exit(EXIT_INTERRUPTED)
            sys.stderr.write("contentdownload: interrupted, finishing the current chunk and saving state (Ctrl-C again to stop at once)\n")
            sys.stderr.flush()
            self.cancel.set()

        return signal.signal(signal.SIGINT, handler)
