"""One job from claim to record: leases, the operation ledger, recovery, the pipeline.

:class:`JobWorker` is shared by ``contentdownload run`` and :class:`Downloader`. It owns
everything between the job store and the pipeline:

- a :class:`StoreLease` that heartbeats while the transfer streams and fences the
  finalize (a worker whose lease was taken over cannot promote its part);
- the operation ledger (:mod:`~contentdownload.jobs.ledger`): the transfer op, and the
  finalize intent recorded before the rename, so a crash between the rename and the store
  update is recovered from the file on disk instead of downloading it again;
- the files on disk are the truth: a finished record whose file is gone or changed is
  reopened, a part is resumed.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import attrs

from contentdownload.errors import Cancelled, LeaseLostError, UnsafePathError
from contentdownload.transfer.files import file_matches, sha256_file
from contentdownload.jobs import ledger
from contentdownload.transfer.urls import redact_url
from contentdownload.records.log import debug_line, get_logger
from contentdownload.hooks.model import NO_LEASE, Job, JobKey, JobResult, Lease, PriorRecord, TransferOptions
from contentdownload.jobs.workspace import Workspace
from contentdownload.transfer import durability
from contentdownload.transfer.parts import PartStore, PromoteRequest

log = get_logger(__name__)
log_debug = debug_line(__name__)  # per-job lines

#: Failure reasons a rerun does not retry on its own (``--retry-failed`` does).
PERMANENT_REASONS = ("http_4", "sha256_mismatch", "size_mismatch", "too_large", "unsafe_redirect", "bad_input", "no_plugin")



def is_permanent(reason: str) -> bool:
    return reason.startswith(PERMANENT_REASONS)


def log_outcome(result: JobResult) -> None:
    """One ``job_outcome`` line per job: a failure at INFO, anything else at DEBUG (cheap on large runs)."""
    level = log.info if result.outcome == "failed" else log_debug
    level("job_outcome", outcome=result.outcome, reason=result.reason, http_status=result.http_status, attempts=result.attempts,
          url=result.url, line=result.job.line, job_key=result.job_key, path=str(result.path) if result.path else None,
          size=result.size, bytes_downloaded=result.bytes_downloaded)


def make_owner() -> str:
    """A lease owner id naming this host and process: ``host:pid:random``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_is_dead_local_process(owner: str | None) -> bool:
    """Whether ``owner`` is a process on this host that no longer runs (its leases can be released at once)."""
    if not owner:
        return False
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def job_payload(job: Job, relative_path: str, identity: str) -> dict:
    """What the store keeps of a job: URLs without credentials or signatures (a rerun takes them from the job list)."""
    return {
        "urls": [redact_url(url) for url in job.urls],
        "work_id": job.work_id,
        "artifact_id": job.artifact_id,
        "filename": job.filename,
        "sha256": job.sha256,
        "size": job.size,
        "expected_type": job.expected_type,
        "line": job.line,
        "relative_path": relative_path,
        "identity": identity,
    }


def job_from_payload(payload: Mapping[str, Any]) -> Job:
    return Job(
        urls=tuple(payload["urls"]),
        work_id=payload.get("work_id"),
        artifact_id=payload.get("artifact_id"),
        filename=payload.get("filename"),
        sha256=payload.get("sha256"),
        size=payload.get("size"),
        expected_type=payload.get("expected_type"),
        line=payload.get("line"),
    )


def record_of(rec: Any) -> PriorRecord | None:
    """The :class:`PriorRecord` in a store record, when it describes a finished file."""
    if rec is None or not rec.sha256:
        return None
    return PriorRecord(
        path=rec.path,
        size=rec.size,
        sha256=rec.sha256,
        etag=rec.etag,
        last_modified=rec.last_modified,
        final_url=rec.final_url,
        content_type=rec.content_type,
        mtime_ns=rec.mtime_ns,
    )


class StoreLease(Lease):
    """A claim in the job store: heartbeats at most every ``ttl/3`` seconds, fenced by epoch."""

    def __init__(self, store: Any, key: str, epoch: int, owner: str, ttl: float):
        self.store, self.key, self.epoch, self.owner, self.ttl = store, key, epoch, owner, ttl
        self._next = time.monotonic() + ttl / 3
        self._lock = threading.Lock()

    def heartbeat(self) -> None:
        with self._lock:
            if time.monotonic() < self._next:
                return
            self.store.heartbeat(self.key, self.epoch, self.ttl)
            self._next = time.monotonic() + self.ttl / 3

    def due(self) -> bool:
        return time.monotonic() >= self._next

    def assert_held(self) -> None:
        with self._lock:
            self.store.heartbeat(self.key, self.epoch, self.ttl)
            self._next = time.monotonic() + self.ttl / 3

    @classmethod
    def lost_of(cls, leases: Sequence[Lease]) -> set[Lease]:
        """:meth:`assert_held` for many leases: one ``heartbeat_many`` per store (and ttl); returns the leases lost."""
        groups: dict[tuple[int, float], list[StoreLease]] = {}
        for lease in leases:
            groups.setdefault((id(lease.store), lease.ttl), []).append(lease)
        lost: set[Lease] = set()
        for (_, ttl), group in groups.items():
            refused = group[0].store.heartbeat_many([(lease.key, lease.epoch) for lease in group], ttl)
            next_beat = time.monotonic() + ttl / 3
            for lease in group:
                if lease.key in refused:
                    lost.add(lease)
                else:
                    lease._next = next_beat
        return lost


@attrs.frozen
class WorkItem:
    """A job ready to process: what to fetch, where, and the claim (when leasing)."""

    job: Job
    key: JobKey
    identity: str  # the job's content identity: places it in the canary share
    relative_path: str
    record: PriorRecord | None = None
    epoch: int | None = None
    revalidate: bool = False
    job_key_answer: Any = None  # the dispatcher's Answer for job_key
    adopt_from: str | None = None  # a finished file elsewhere (``--resume-from``) to revalidate


class JobWorker:
    """Processes :class:`WorkItem` s against one store, workspace and pipeline; thread-safe.

    ``progress(item)``, when given, returns the job's byte sink: called with the size of each
    body block, and its ``expect(size, start)`` (when it has one) with each response's sizes.
    ``on_result(result)`` gets each job's result before its store record (the manifest row);
    ``on_results(results, then)`` does the same for a batch (:meth:`record_many`), calling ``then()`` (the store
    records) in the transaction that records the rows written.
    """

    def __init__(
        self,
        runtime: Any,
        pipeline: Any,
        store: Any,
        workspace: Workspace,
        options: TransferOptions,
        *,
        owner: str,
        lease_ttl: float,
        leasing: bool,
        cancel: threading.Event | None = None,
        host_gate: Callable[[str], Any] | None = None,
        progress: Callable[["WorkItem"], Any] | None = None,
        on_result: Callable[[JobResult], None] | None = None,
        on_results: Callable[[Sequence[JobResult], Callable[[], Any]], None] | None = None,
    ):
        self.runtime = runtime
        self.pipeline = pipeline
        self.store = store
        self.ws = workspace
        self.options = options
        self.owner = owner
        self.lease_ttl = lease_ttl
        self.leasing = leasing
        self.cancel = cancel or threading.Event()
        self.host_gate = host_gate
        self.progress = progress
        self.on_result = on_result
        self.on_results = on_results
        # finalize intents of jobs finishing together, recorded in one transaction (group commit)
        self._intents = durability.Committer(self._record_intents, window=durability.BATCH_WINDOW_S)
        self._loop_intents = durability.LoopCommitter(self._record_intents)  # the same, for jobs on the event-loop lane

    # -- crash recovery -------------------------------------------------------------

    def recover_finalized(self, item: WorkItem) -> JobResult | None:
        """A crash after the rename, before the store update: the file on disk finishes the job.

        Only a job claimed before can have one: at the first claim (epoch 1) no worker has
        recorded a finalize intent for it, so the final path is not looked at.
        """
        if not self.leasing or item.revalidate or (item.epoch or 0) <= 1:
            return None  # a reopened job (revalidation) was finished on record: nothing to recover
        final = self.ws.final_path(item.relative_path)
        if not final.is_file():
            return None
        sha = sha256_file(final)
        intent = ledger.finalize_intent(self.store, item.key.key, sha)
        if intent is None:
            return None
        st = final.stat()
        log.info("recovered a finished file after a crash", job_key=item.key.key, path=str(final))
        return JobResult(
            outcome="downloaded", job=item.job, job_key=item.key.key, reason="recovered_after_crash",
            url=intent.get("url"), final_url=intent.get("final_url"), path=final, size=st.st_size, sha256=sha,
            content_type=intent.get("content_type"), etag=intent.get("etag"), last_modified=intent.get("last_modified"),
        )

    def _finish(self, item: WorkItem, *, path: Path, size: int, sha256: str, mtime_ns: int, info: Mapping[str, Any]) -> None:
        self.store.finish(
            item.key.key, item.epoch or 0, path=str(path), size=size, sha256=sha256,
            etag=info.get("etag"), last_modified=info.get("last_modified"), final_url=info.get("final_url"),
            content_type=info.get("content_type"), mtime_ns=mtime_ns,
        )

    # -- one job --------------------------------------------------------------------

    def process(self, item: WorkItem) -> JobResult:
        """Run one job to a result and record it in the store, at the run's durability. Raises ``Cancelled`` and ``LeaseLostError``."""
        with durability.using(self.runtime.settings.durability):
            return self._process(item)

    def _process(self, item: WorkItem) -> JobResult:
        key = item.key.key
        lease: Lease = StoreLease(self.store, key, item.epoch or 0, self.owner, self.lease_ttl) if self.leasing else NO_LEASE
        if self.leasing:
            self.store.mark_streaming(key, item.epoch)
            ledger.begin_transfer(self.store, key, item.epoch)
            recovered = self.recover_finalized(item)
            if recovered is not None:
                self._report_and_record(item, recovered)
                return recovered
        paths = self.ws.stage_paths(item.relative_path, key, epoch=item.epoch if self.leasing else None)
        parts = PartStore(self.ws.staging, root=self.ws.out)
        # With leases, each epoch has its own part, and taking the job over fences the older ones.
        with parts.claim(key, item.epoch, self.cancel) if self.leasing else parts.exclusive(key, self.cancel):
            result = self._unsafe_paths(item, paths) or self._attempt(item, paths, lease)
        self._report_and_record(item, result)
        return result

    def _record_intents(self, items: Sequence[tuple[str, int | None, Any]]) -> list[None]:
        ledger.record_intents(self.store, items)
        return [None] * len(items)

    # -- one job on the event-loop lane -------------------------------------------------

    def start_first_claim(self, item: WorkItem) -> Any:
        """For the event-loop lane: the pipeline run of a job claimed for the first time, or its ``failed`` result.

        The job must be leased, marked streaming and its transfer op begun (the lane does
        that for a whole batch of claims at once). A first claim has nothing to recover
        (no earlier holder renamed a part or recorded an intent) and no older part to fence
        or adopt; the lane still holds its epoch's part lock (:meth:`part_claim`) while it runs.
        """
        lease = StoreLease(self.store, item.key.key, item.epoch or 0, self.owner, self.lease_ttl)
        paths = self.ws.stage_paths(item.relative_path, item.key.key, epoch=item.epoch)
        return self._unsafe_paths(item, paths) or self._job_run(item, paths, lease)

    async def intend(self, item: WorkItem, stream: Any) -> None:
        """Record ``item``'s finalize intent from the event loop, in one transaction with the jobs finishing together."""
        if self.leasing:
            await self._loop_intents.submit((item.key.key, item.epoch, stream))

    def part_claim(self, item: WorkItem) -> Any:
        """The context holding ``item``'s epoch of its part (:meth:`PartStore.claim`)."""
        return PartStore(self.ws.staging, root=self.ws.out).claim(item.key.key, item.epoch or 0, self.cancel)

    def first_part_lock(self, item: WorkItem) -> Any:
        """A first claim's epoch lock taken at once without blocking, or ``None`` (then :meth:`part_claim`, in a thread)."""
        return PartStore(self.ws.staging, root=self.ws.out).claim_first(item.key.key, item.epoch or 0)

    def record_many(self, done: Sequence[tuple[WorkItem, JobResult]]) -> None:
        """Hand on and record a batch of results: their manifest rows first (one fsync), then their store records (in one
        transaction with the rows' ledger ops done).

        A job whose lease was taken over meanwhile is left to its new owner (as a worker
        thread's job is); the others are recorded.
        """
        for _, result in done:
            log_outcome(result)
        def records() -> None:  # one transaction, or a part of the one recording the rows' ledger ops (a nested batch joins it)
            self.store.batched(lambda: [self._record_held(item, result) for item, result in done])

        if self.on_results is not None:
            self.on_results([result for _, result in done], records)
        else:
            records()

    def _record_held(self, item: WorkItem, result: JobResult) -> None:
        try:
            self._record(item, result)
        except LeaseLostError as exc:
            log.warning("lease taken over by another worker; not recording", job_key=item.key.key, error=str(exc))

    def _unsafe_paths(self, item: WorkItem, paths: Any) -> JobResult | None:
        """A failed result when a staging path of the job is a planted symlink."""
        try:
            PartStore.check_paths(paths)
        except UnsafePathError as exc:
            log.error("job refused", job_key=item.key.key, reason=exc.reason, error=str(exc))
            return JobResult(outcome="failed", job=item.job, job_key=item.key.key, reason=exc.reason, url=item.job.url)
        return None

    def _attempt(self, item: WorkItem, paths: Any, lease: Lease) -> JobResult:
        if item.adopt_from and item.record is not None and not paths.final.exists():
            self._adopt(Path(item.adopt_from), item, paths, lease)
        return self._transfer(item, paths, lease)

    def _report_and_record(self, item: WorkItem, result: JobResult) -> None:
        """Hand the result on (the manifest row) first, then record it in the store.

        In this order, a job the store calls finished always has its manifest row, so
        another process planning the same list never writes a second one; a crash in
        between is recovered from the finalize intent and the row already on disk.
        """
        log_outcome(result)
        if self.on_result is not None:
            self.on_result(result)
        self._record(item, result)

    def _transfer(self, item: WorkItem, paths: Any, lease: Lease) -> JobResult:
        return self._job_run(item, paths, lease).run()

    def _job_run(self, item: WorkItem, paths: Any, lease: Lease) -> Any:
        """The pipeline's run of ``item`` (not started)."""
        selections = self.runtime.policy.plan(item.identity)
        options = attrs.evolve(self.options, revalidate=self.options.revalidate or item.revalidate)
        sink = self.progress(item) if self.progress is not None else None
        return self.pipeline.start(
            item.job, item.key, paths, selections,
            record=item.record, lease=lease, progress=sink, expect=getattr(sink, "expect", None), cancel=self.cancel,
            job_key_answer=item.job_key_answer, options=options,
            before_finalize=(lambda stream: self._intents.submit((item.key.key, item.epoch, stream))) if self.leasing else None,
            host_slot=(lambda url: self._host_slot(url, lease)) if self.host_gate else None,
        )

    @contextlib.contextmanager
    def _host_slot(self, url: str, lease: Lease) -> Iterator[None]:
        """Hold one of ``url``'s host's connection slots; wait heartbeating the lease and honouring Ctrl-C."""
        gate = self.host_gate(url)
        while not gate.acquire(timeout=0.5):
            if self.cancel.is_set():
                raise Cancelled("interrupted while waiting for a connection slot")
            lease.heartbeat()
        try:
            yield
        finally:
            gate.release()

    def _adopt(self, source: Path, item: WorkItem, paths: Any, lease: Lease) -> None:
        """Copy a finished file from an earlier output folder into place (through the part store) so it can be revalidated.

        Only a file that still is what the earlier manifest recorded (size and SHA-256) is copied.
        """
        record = item.record
        if record is None or not record.sha256 or not source.is_file() or not file_matches(source, record.size, record.sha256):
            log.info("earlier file is gone or changed, not reusing it", path=str(source))
            return
        parts = PartStore(self.ws.staging, root=self.ws.out)
        with source.open("rb") as src, parts.open(paths, expected_size=record.size) as part:
            while block := src.read(1 << 20):
                part.append(block)
            sha256 = part.close()
        parts.promote(PromoteRequest(paths=paths, job=item.job, size=record.size, sha256=sha256, lease=lease))

    def _record(self, item: WorkItem, result: JobResult) -> None:
        """The job's state in the store (and, when leasing, its transfer op) from its result."""
        if self.leasing:  # the ledger follows a success and precedes a failure, as the store's state does
            finished = result.ok and result.path is not None
            if not finished:
                ledger.end_transfer(self.store, item.key.key, result)
            self._record_claimed(item, result)
            if finished:
                ledger.end_transfer(self.store, item.key.key, result)
            return
        claim = self.store.claim_key(item.key.key, self.owner, self.lease_ttl)
        if claim is not None:
            self._record_claimed(attrs.evolve(item, epoch=claim.epoch), result)

    def _record_claimed(self, item: WorkItem, result: JobResult) -> None:
        if result.ok and result.path is not None:
            final = Path(result.path)
            if result.mtime_ns is not None and result.size is not None:  # as the part store saw the file it promoted
                size, mtime_ns = result.size, result.mtime_ns
            else:
                st = final.stat()
                size, mtime_ns = st.st_size, st.st_mtime_ns
            info = {"etag": result.etag, "last_modified": result.last_modified, "final_url": result.final_url, "content_type": result.content_type}
            self._finish(item, path=final, size=size, sha256=result.sha256 or sha256_file(final), mtime_ns=mtime_ns, info=info)
        else:
            self.store.fail(item.key.key, item.epoch, result.reason or "failed", retryable=False, max_attempts=1)
