"""The event-loop lane (``--transport auto``): this process's jobs on one asyncio loop, claimed and recorded in batches.

::

    claim_many                     one store transaction for a batch of claims, then one to mark them
                                   streaming and begin their transfer ops
    per job, a task on the loop:
      resume_decision              the policy's chain, as in the pipeline
      stream_io                    a plugin's stream_io_async on the loop, or its stream_io in a thread
      finalize                     a plugin's finalize_async on the loop, or its finalize in a thread: the
                                   finalize intents of the jobs finishing together in one transaction, then
                                   (--durability batch) the staging folder's committer checks their parts,
                                   fsyncs them together, renames them and fsyncs each folder once
    records                        a batch of results: manifest rows with one fsync, then the store
                                   records (finished states, ledger ops) in one transaction

Blocking work (the store, fsyncs, a synchronous plugin's transfer) runs in the lane's
thread pool, never on the loop. Only a job claimed for the first time takes the road through
the loop (:meth:`~contentdownload.jobs.worker.JobWorker.start_first_claim`): a job claimed
before (a part may wait to be resumed, an older holder's part to be fenced) or with a
record (revalidation, ``--resume-from``) runs the synchronous worker in the pool, as every
job does with ``--transport sync``. A first attempt that does not complete goes on in the
pool through the same pipeline (retries, backoff, the next candidate URL).

``--workers`` bounds the transfers at once (a job past its transfer, finalizing or waiting
for its record, does not count, unless a refused body could send it on to another of its URLs), ``--per-host`` the transfers per host, in the same
:class:`~contentdownload.jobs.hosts.HostSlots` the threads use. A claimed job waiting for a
transfer slot heartbeats its lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable, Sequence, TYPE_CHECKING

from contentdownload.errors import Cancelled, DiskError
from contentdownload.hooks.model import JobResult, Lease
from contentdownload.jobs import ledger
from contentdownload.jobs.planner import Plan, item_for_claim, remaining
from contentdownload.jobs.worker import JobWorker, StoreLease, WorkItem
from contentdownload.transfer import durability, engine

if TYPE_CHECKING:  # pragma: no cover
    from contentdownload.jobs.runner import Run

#: The most claims taken in one transaction.
BATCH = 64
#: The most results recorded in one batch (their rows with one fsync, their records in one transaction).
RECORD_BATCH = 256
#: Claim about this many seconds of work at once (so a process never sits on jobs others could take).
CLAIM_AHEAD_S = 1.0


class FastLane:
    """The event-loop lane of one process of a run (see the module); :meth:`drive` blocks until it is done."""

    def __init__(self, run: "Run", worker: JobWorker, plan: Plan, store: Any, http: Any):
        self.run, self.worker, self.plan, self.store, self.http = run, worker, plan, store, http
        self.settings = run.settings
        self.job_seconds = 0.0  # moving average of a job's time on the lane (sizes the claims)
        self.records = durability.LoopCommitter(self.record, max_batch=RECORD_BATCH)  # one batch written while the next gathers

    # -- the loop ---------------------------------------------------------------------

    def drive(self) -> None:
        """Run the lane's loop until this process has nothing left to claim, the run is cancelled or its store lost."""
        loop = engine.new_event_loop()
        pool = ThreadPoolExecutor(max_workers=max(8, 2 * self.settings.workers), thread_name_prefix="contentdownload-lane")
        loop.set_default_executor(pool)
        try:
            with durability.using(self.settings.durability):
                loop.run_until_complete(self._main())
        finally:
            pool.shutdown(wait=True)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def in_thread(self, fn: Callable[..., Any], *args: Any) -> "asyncio.Future[Any]":
        """``fn(*args)`` in the lane's pool, with this task's context (the durability level)."""
        return asyncio.get_running_loop().run_in_executor(None, contextvars.copy_context().run, fn, *args)

    async def _main(self) -> None:
        self.transfers = asyncio.Semaphore(self.settings.workers)
        self.http.engine = self.http.new_engine(per_host=self.run._per_host)
        jobs: set[asyncio.Task[None]] = set()
        try:
            await self._claim_loop(jobs)
            if jobs:
                await asyncio.wait(set(jobs))
            await self.records.drain()
        finally:
            running, self.http.engine = self.http.engine, None
            await running.aclose()

    async def _claim_loop(self, jobs: set["asyncio.Task[None]"]) -> None:
        """Claim batches and start a task per job, keeping about :data:`CLAIM_AHEAD_S` of work claimed ahead."""
        while not self.run.cancel.is_set():
            room = self._room(len(jobs))
            if room <= 0:
                await asyncio.wait(set(jobs), return_when=asyncio.FIRST_COMPLETED)
                continue
            seen = self.run._ended_count
            claimed = await self.in_thread(self._claim, room)
            if claimed is None:
                return
            if not claimed:  # another process holds what is left: wait for a job to end somewhere
                await self.in_thread(self.run._await_job_end, seen, min(1.0, self.settings.lease_ttl / 4))
                continue
            for item, first_claim in claimed:
                task = asyncio.ensure_future(self._job(item, first_claim))
                jobs.add(task)
                task.add_done_callback(jobs.discard)

    def _room(self, in_flight: int) -> int:
        """How many jobs to claim now (0: wait): the transfers' worth until one has ended, then about
        :data:`CLAIM_AHEAD_S` of work beyond them, in batches of at least half that (at most :data:`BATCH`)."""
        workers = self.settings.workers
        ahead = 0 if self.job_seconds <= 0 else min(BATCH, int(workers * CLAIM_AHEAD_S / self.job_seconds))
        room = workers + ahead - in_flight
        return room if room >= max(1, ahead // 2) else 0

    def _claim(self, limit: int) -> list[tuple[WorkItem, bool]] | None:
        """Up to ``limit`` claims (``None``: nothing left), first claims marked streaming with their transfer op begun; in a thread."""
        store = self.store
        try:
            claims = store.claim_many(self.run.owner, self.settings.lease_ttl, keys=self.plan.keys, limit=limit)
            if not claims:
                return None if not remaining(store, self.plan.keys) else []
            items = [(item_for_claim(self.plan, claim), claim.record.claims == 1) for claim in claims]
            claimed = [(item, first_claim and _fresh(item)) for item, first_claim in items]
            starting = [(item.key.key, item.epoch) for item, first_claim in claimed if first_claim]
            store.batched(lambda: ([store.mark_streaming(key, epoch) for key, epoch in starting], ledger.begin_transfers(store, starting)))
        except Exception as exc:  # the store's (or its disk's) failure: this process stops claiming
            disk = DiskError.of(exc)
            if disk is not None:
                self.run._disk_down(disk)
            else:
                self.run._store_down(store, exc)
            return None
        return claimed

    # -- one job ----------------------------------------------------------------------

    async def _job(self, item: WorkItem, first_claim: bool) -> None:
        """One job to its record; never raises. Its time sizes the claims (a moving average)."""
        started = time.monotonic()
        try:
            await self._one_job(item, first_claim)
        finally:
            took = time.monotonic() - started
            self.job_seconds = 0.9 * self.job_seconds + 0.1 * took if self.job_seconds else took

    async def _one_job(self, item: WorkItem, first_claim: bool) -> None:
        try:
            if not first_claim:
                lease = StoreLease(self.store, item.key.key, item.epoch or 0, self.run.owner, self.settings.lease_ttl)
                async with self._transfer_slot(lease):
                    await self.in_thread(self.run._process, self.worker, item, self.store)
                self.run._notify_job_end()
                return
            with self.run._lock:
                self.run.jobs_on_loop += 1
            result = await self._first_claim(item)
        except Exception as exc:  # as a worker thread's job would: interrupted, taken over, the store or the disk
            await self.in_thread(self.run._job_stopped, item, self.store, exc)
            self.run._notify_job_end()
            return
        self.records.add((item, result))

    async def _first_claim(self, item: WorkItem) -> JobResult:
        job_run = self.worker.start_first_claim(item)
        if isinstance(job_run, JobResult):
            return job_run
        async with self._part_held(item):  # the epoch's part lock: how a later epoch tells this writer is alive
            async with self._transfer_slot(job_run.lease):
                attempt = await self._first_attempt(job_run, item.job.urls[0])
                if isinstance(attempt, JobResult):
                    return attempt
                if attempt.stream.status != "complete" or len(item.job.urls) > 1:
                    # retries, backoff, or a refused body's next candidate: more transfers, within the slot
                    return await self.in_thread(job_run.run, attempt)
            # finalize, outside the transfer slot, on the loop: intents and promotions in batches
            return await job_run.finish_first(attempt, self.in_thread, functools.partial(self.worker.intend, item))

    @contextlib.asynccontextmanager
    async def _part_held(self, item: WorkItem) -> AsyncIterator[None]:
        """Hold ``item``'s epoch lock: taken on the loop when it is free at once (nothing to fence at a first claim), else in a thread."""
        lock = self.worker.first_part_lock(item)
        if lock is not None:
            release = functools.partial(lock.release, remove=True)
        else:
            part_claim = self.worker.part_claim(item)
            await self.in_thread(part_claim.__enter__)
            release = functools.partial(part_claim.__exit__, None, None, None)
        try:
            yield
        finally:
            release()

    async def _first_attempt(self, job_run: Any, url: str) -> Any:
        slots = self.worker.host_gate(url)
        await self._waiting(slots.acquire_async, job_run.lease)
        try:
            return await job_run.first_attempt(self.in_thread)
        finally:
            slots.release()

    async def _waiting(self, acquire: Callable[[], Any], lease: Lease) -> None:
        """``await acquire()``, heart-beating ``lease`` every third of its ttl meanwhile; ``Cancelled`` when the run is."""
        while True:
            if self.run.cancel.is_set():
                raise Cancelled("the run was interrupted while the job waited for a transfer slot")
            try:
                await asyncio.wait_for(acquire(), timeout=self.settings.lease_ttl / 3)
                return
            except asyncio.TimeoutError:
                await self.in_thread(lease.heartbeat)

    @contextlib.asynccontextmanager
    async def _transfer_slot(self, lease: Lease) -> AsyncIterator[None]:
        """One of the ``--workers`` transfers; the lease heart-beaten while waiting for it."""
        await self._waiting(self.transfers.acquire, lease)
        try:
            yield
        finally:
            self.transfers.release()

    # -- records ----------------------------------------------------------------------

    def record(self, batch: Sequence[tuple[WorkItem, JobResult]]) -> list[None]:
        """Record a batch of results (rows, then store records); in a thread. A failure stops the run as a job's would."""
        try:
            self.worker.record_many(batch)
        except Exception as exc:
            for item, _ in batch:
                self.run._job_stopped(item, self.store, exc)
        else:
            for _, result in batch:
                self.run._progress.done(result)
        finally:
            for _ in batch:
                self.run._notify_job_end()
        return [None] * len(batch)


def _fresh(item: WorkItem) -> bool:
    """Whether a first claim can take the loop's road: nothing recorded to revalidate or adopt."""
    return item.record is None and not item.revalidate and not item.adopt_from
