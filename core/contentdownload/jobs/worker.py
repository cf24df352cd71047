"""One job from claim to record: leases, the operation ledger, recovery, the pipeline.

:class:`JobWorker` is shared by ``contentdownload run`` and :class:`Downloader`. It owns
everything between the job store and the pipeline:

- a :class:`StoreLease` that heartbeats while the transfer streams and fences the
  finalize (a worker whose lease was taken over cannot promote its part);
- the operation ledger: the finalize of a part is recorded (with its SHA-256) before the
  rename, so a crash between the rename and the store update is recovered from the
  file on disk instead of downloading it again; the manifest row of a job is written once;
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
from typing import Any, Callable, Iterator, Mapping

import attrs

from filelock import FileLock, Timeout

from contentdownload.errors import Cancelled
from contentdownload.transfer.files import file_matches, sha256_file
from contentdownload.transfer.urls import redact_url
from contentdownload.jobs.keys import operation_key
from contentdownload.records.log import get_logger
from contentdownload.hooks.model import NO_LEASE, Job, JobKey, JobResult, Lease, PriorRecord, StreamResult, TransferOptions
from contentdownload.jobs.workspace import Workspace

log = get_logger(__name__)

#: Failure reasons a rerun does not retry on its own (``--retry-failed`` does).
PERMANENT_REASONS = ("http_4", "sha256_mismatch", "size_mismatch", "too_large", "unsafe_redirect", "bad_input", "no_plugin")



def is_permanent(reason: str) -> bool:
    return reason.startswith(PERMANENT_REASONS)


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


def adopt_previous_part(ws: Workspace, key: str, epoch: int, paths: Any) -> None:
    """Carry the newest part of an earlier epoch over to this epoch's name, if its owner is gone.

    Each epoch writes its own part (``KEY.EPOCH.part``) under a lock file held for the
    whole job. A part whose lock can be taken belongs to a dead worker and is renamed
    (with its sidecar) to this epoch's name so the transfer resumes. A part whose lock
    is held belongs to a worker that is alive but lost its lease (paused, say): it is
    left alone, since that worker may still write to it, and this epoch starts afresh.
    """
    if paths.part.exists():
        return
    for tag, part in ws.parts_of(key):
        if tag is None or tag >= epoch:
            continue
        lock = FileLock(str(ws.lock_path(key, tag)))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.warning("an earlier owner of this job is still alive; not reusing its part", job_key=key, epoch=tag)
            continue
        try:
            sidecar = part.with_name(part.name + ".json")
            if sidecar.exists():
                os.replace(sidecar, paths.sidecar)
            os.replace(part, paths.part)
            log.info("resuming the part of an earlier attempt", job_key=key, from_epoch=tag, to_epoch=epoch)
        finally:
            lock.release()
            Path(lock.lock_file).unlink(missing_ok=True)
        return


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

    def assert_held(self) -> None:
        with self._lock:
            self.store.heartbeat(self.key, self.epoch, self.ttl)
            self._next = time.monotonic() + self.ttl / 3


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
    """Processes :class:`WorkItem` s against one store, workspace and pipeline; thread-safe."""

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
        progress: Callable[[int], None] | None = None,
        on_result: Callable[[JobResult], None] | None = None,
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

    # -- the operation ledger -------------------------------------------------------

    def _intent_key(self, key: str, sha256: str) -> str:
        """The finalize op of one content: its key names the SHA-256, so a file on disk finds its own record."""
        return operation_key(key, f"finalize:{sha256}")

    def _record_intent(self, item: WorkItem, stream: StreamResult) -> None:
        """Before the rename: record that this content is being promoted (the crash-recovery evidence)."""
        op = self._intent_key(item.key.key, stream.sha256 or "")
        self.store.op_begin(op, item.key.key, "finalize", item.epoch or 0)
        self.store.op_done(op, {
            "sha256": stream.sha256, "size": stream.total_size, "etag": stream.etag,
            "last_modified": stream.last_modified, "final_url": stream.final_url,
            "content_type": stream.content_type, "url": stream.url,
        })

    def recover_finalized(self, item: WorkItem) -> JobResult | None:
        """A crash after the rename, before the store update: the file on disk finishes the job."""
        final = self.ws.final_path(item.relative_path)
        if not self.leasing or item.revalidate or not final.is_file():
            return None  # a reopened job (revalidation) was finished on record: nothing to recover
        sha = sha256_file(final)
        op = self.store.op_get(self._intent_key(item.key.key, sha))
        if not op or op["status"] != "done" or not op.get("result"):
            return None
        intent = op["result"]
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
        """Run one job to a result and record it in the store. Raises ``Cancelled`` and ``LeaseLostError``."""
        key = item.key.key
        lease: Lease = StoreLease(self.store, key, item.epoch or 0, self.owner, self.lease_ttl) if self.leasing else NO_LEASE
        if self.leasing:
            self.store.mark_streaming(key, item.epoch)
            self.store.op_begin(operation_key(key, "transfer"), key, "transfer", item.epoch)
            recovered = self.recover_finalized(item)
            if recovered is not None:
                self._report_and_record(item, recovered)
                return recovered
        if self.leasing:
            part_lock = FileLock(str(self.ws.lock_path(key, item.epoch)))
            part_lock.acquire(timeout=0)  # the epoch is ours alone: this cannot be held
            paths = self.ws.stage_paths(item.relative_path, key, epoch=item.epoch)
            adopt_previous_part(self.ws, key, item.epoch, paths)
        else:
            part_lock, paths = None, self.ws.stage_paths(item.relative_path, key)
        try:
            if item.adopt_from and item.record is not None and not paths.final.exists():
                self._adopt(Path(item.adopt_from), item.record, paths)
            result = self._transfer(item, paths, lease)
        finally:
            if part_lock is not None:
                part_lock.release()
                Path(part_lock.lock_file).unlink(missing_ok=True)
        self._report_and_record(item, result)
        return result

    def _report_and_record(self, item: WorkItem, result: JobResult) -> None:
        """Hand the result on (the manifest row) first, then record it in the store.

        In this order, a job the store calls finished always has its manifest row, so
        another process planning the same list never writes a second one; a crash in
        between is recovered from the finalize intent and the row already on disk.
        """
        if self.on_result is not None:
            self.on_result(result)
        self._record(item, result)

    def _transfer(self, item: WorkItem, paths: Any, lease: Lease) -> JobResult:
        selections = self.runtime.policy.plan(item.identity)
        options = attrs.evolve(self.options, revalidate=self.options.revalidate or item.revalidate)
        return self.pipeline.run(
            item.job, item.key, paths, selections,
            record=item.record, lease=lease, progress=self.progress, cancel=self.cancel,
            job_key_answer=item.job_key_answer, options=options,
            before_finalize=(lambda stream: self._record_intent(item, stream)) if self.leasing else None,
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

    def _adopt(self, source: Path, record: PriorRecord, paths: Any) -> None:
        """Copy a finished file from an earlier output folder into place (atomically) so it can be revalidated.

        Only a file that still is what the earlier manifest recorded (size and SHA-256) is copied.
        """
        if not record.sha256 or not source.is_file() or not file_matches(source, record.size, record.sha256):
            log.info("earlier file is gone or changed, not reusing it", path=str(source))
            return
        tmp = paths.part.with_name(paths.part.name + ".adopt")
        try:
            with source.open("rb") as src, tmp.open("wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
                dst.flush()
                os.fsync(dst.fileno())
            paths.final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, paths.final)
        finally:
            tmp.unlink(missing_ok=True)

    def _record(self, item: WorkItem, result: JobResult) -> None:
        key = item.key.key
        transfer_op = operation_key(key, "transfer")
        if result.ok and result.path is not None:
            final = Path(result.path)
            st = final.stat()
            info = {"etag": result.etag, "last_modified": result.last_modified, "final_url": result.final_url, "content_type": result.content_type}
            if self.leasing:
                self._finish(item, path=final, size=st.st_size, sha256=result.sha256 or sha256_file(final), mtime_ns=st.st_mtime_ns, info=info)
                self.store.op_done(transfer_op, {"outcome": result.outcome, "bytes": result.bytes_downloaded})
            else:
                claim = self.store.claim_key(key, self.owner, self.lease_ttl)
                if claim is not None:
                    self.store.finish(key, claim.epoch, path=str(final), size=st.st_size, sha256=result.sha256 or sha256_file(final),
                                      mtime_ns=st.st_mtime_ns, **info)
            return
        reason = result.reason or "failed"
        if self.leasing:
            self.store.op_failed(transfer_op, reason)
            self.store.fail(key, item.epoch, reason, retryable=False, max_attempts=1)
        else:
            claim = self.store.claim_key(key, self.owner, self.lease_ttl)
            if claim is not None:
                self.store.fail(key, claim.epoch, reason, retryable=False, max_attempts=1)
