"""Planning a job list against a store: names, keys, what is done, what to do.

Shared by ``contentdownload run`` and :class:`~contentdownload.Downloader`. Planning is
idempotent: the same list planned twice, or by several processes at once, yields each
job key once in the store.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import attrs

from contentdownload.errors import NoPluginAnsweredError
from contentdownload.jobs.keys import identity_key
from contentdownload.records.log import get_logger
from contentdownload.records.manifest import ManifestRecords
from contentdownload.hooks.model import Job, JobKey, JobKeyContext, JobResult, PriorRecord
from contentdownload.jobs.naming import plan_names
from contentdownload.jobs.rebuild import requeue_lost
from contentdownload.transfer.urls import redact_url
from contentdownload.transfer.files import file_matches
from contentdownload.jobs.worker import WorkItem, is_permanent, job_from_payload, job_payload, owner_is_dead_local_process, record_of
from contentdownload.jobs.workspace import Workspace

log = get_logger(__name__)

ACTIVE_STATES = ("planned", "leased", "streaming")


@attrs.frozen
class Plan:
    """The result of planning: items to process (by key), results already known, and the keys of this run."""

    items: Mapping[str, WorkItem]
    settled: Sequence[JobResult]
    keys: frozenset[str]
    order: Sequence[str]


def _state(record: Any) -> str:
    state = record.state
    return state.value if hasattr(state, "value") else str(state)


def plan_jobs(
    runtime: Any,
    store: Any,
    ws: Workspace,
    jobs: Sequence[Job],
    *,
    revalidate: bool = False,
    retry_failed: bool = False,
    resume_from: ManifestRecords | None = None,
    dry_run: bool = False,
) -> Plan:
    """Key and name every job, record them in ``store``, and sort out what needs doing.

    ``dry_run``: change nothing in the store, only classify.
    """
    # Content identity of each job (canonical URL, work and artifact ids); duplicates collapse.
    identified: dict[str, tuple[Job, str]] = {}
    for job in jobs:
        identity, url = identity_key(job)
        identified.setdefault(identity, (job, url))
    ordered = list(identified.items())
    history = _History.read(store)
    names = _names(history, ws, ordered, resume_from)
    items, settled, planned = _key_jobs(runtime, ordered, names, resume_from, revalidate, history)
    if not dry_run:
        store.plan(planned)
    settled += _settle_from_manifest(store, ws, items, revalidate, dry_run)
    settled += _settle_from_store(store, ws, items, retry_failed, dry_run)
    return Plan(items=items, settled=settled, keys=frozenset(items), order=[k for k in items])


def _names(history: "_History", ws: Workspace, ordered: Sequence[tuple[str, tuple[Job, str]]], resume_from: ManifestRecords | None) -> list[str]:
    """A relative path per job: the name on record (store, earlier manifest) or a new one no other file has."""
    recorded_names = history.names
    for identity, owned in (resume_from.names.items() if resume_from else ()):
        if Path(owned).parent == ws.out:
            recorded_names.setdefault(identity, Path(owned).name)
    mine = {name.casefold() for name in recorded_names.values()}
    foreign = [p.name for p in ws.out.iterdir() if p.is_file() and p.name.casefold() not in mine] if ws.out.is_dir() else []
    return plan_names([(job, identity) for identity, (job, _) in ordered], recorded_names, taken=foreign)


def _key_jobs(
    runtime: Any, ordered: Sequence[tuple[str, tuple[Job, str]]], names: Sequence[str],
    resume_from: ManifestRecords | None, revalidate: bool, history: "_History",
) -> tuple[dict[str, WorkItem], list[JobResult], list[Any]]:
    """The job key of each job (through the ``job_key`` chain): work items, failures, and the store's planned rows."""
    from contentdownload.store import PlannedJob  # the store package imports drivers lazily

    items: dict[str, WorkItem] = {}
    settled: list[JobResult] = []
    planned = []
    by_key = resume_from.by_key if resume_from else {}
    by_url = resume_from.by_url if resume_from else {}
    for (identity, (job, canonical)), relative in zip(ordered, names):
        selection = runtime.policy.plan(identity)["job_key"]
        try:
            answer = runtime.dispatcher.call(selection, JobKeyContext(job=job, relative_path=relative))
        except NoPluginAnsweredError as exc:
            settled.append(JobResult(outcome="failed", job=job, reason="no_plugin", url=job.url))
            log.error("no plugin keyed the job", url=redact_url(job.url), error=str(exc))
            continue
        key: JobKey = history.key_of(answer.result, identity, relative)
        if key.key in items:
            continue  # two jobs with one key (legacy keys are paths): the first one stands
        prior = by_key.get(key.key) or by_url.get(canonical)
        items[key.key] = WorkItem(
            job=job, key=key, identity=identity, relative_path=relative, record=prior,
            job_key_answer=answer, revalidate=revalidate,
            adopt_from=prior.path if prior is not None and prior.path else None,
        )
        planned.append(PlannedJob(key=key.key, scheme=key.scheme, payload=job_payload(job, relative, identity)))
    return items, settled, planned


def _settle_from_manifest(store: Any, ws: Workspace, items: dict[str, WorkItem], revalidate: bool, dry_run: bool) -> list[JobResult]:
    """A finished file an earlier manifest recorded at this very path: done, record it as such (removed from ``items``)."""
    settled = []
    for key, item in list(items.items()):
        prior = item.record
        if prior is None or not prior.path or not prior.sha256 or revalidate:
            continue
        final = ws.final_path(item.relative_path)
        if Path(prior.path) == final and file_matches(final, prior.size, prior.sha256, prior.mtime_ns):
            if not dry_run:
                _record_finished(store, key, final, prior)
            settled.append(_skipped(item, final, prior.size, prior.sha256, prior))
            del items[key]
    return settled


def _settle_from_store(store: Any, ws: Workspace, items: dict[str, WorkItem], retry_failed: bool, dry_run: bool) -> list[JobResult]:
    """What earlier runs left: finished files, failures, leases of dead processes (settled ones leave ``items``)."""
    settled = []
    existing = {key: rec for key in items if (rec := store.get(key)) is not None}
    for key, rec in existing.items():
        item = items[key]
        state = _state(rec)
        if state == "finalized":
            outcome = _finalized(store, ws, item, rec, dry_run)
            if isinstance(outcome, JobResult):
                settled.append(outcome)
                del items[key]
            else:
                items[key] = outcome
        elif state == "failed":
            if retry_failed or not is_permanent(rec.last_error or ""):
                if not dry_run:
                    store.requeue(key)
            else:
                settled.append(JobResult(outcome="failed", job=item.job, job_key=key, reason=rec.last_error or "failed", url=item.job.url))
                del items[key]
        elif state in ("leased", "streaming") and owner_is_dead_local_process(rec.lease_owner) and not dry_run:
            store.release(key, rec.epoch)
            log.info("released the lease of a process that is gone", job_key=key, owner=rec.lease_owner)
    return settled


def _finalized(store: Any, ws: Workspace, item: WorkItem, rec: Any, dry_run: bool) -> WorkItem | JobResult:
    """A job the store calls finished: skipped, or reopened (file gone or changed, or revalidation asked).

    A file another folder holds is checked too when that folder is on this machine (a file
    found nowhere is fetched into this folder); a folder of another machine is trusted.
    """
    key = item.key.key
    path = Path(rec.path) if rec.path else None
    ours = path is not None and (path == ws.out or ws.out in path.parents)
    visible = ours or (path is not None and ws.on_this_host(getattr(rec, "location", None)))  # another folder here
    if visible and not file_matches(path, rec.size, rec.sha256, rec.mtime_ns):
        log.warning("finished file is gone or changed, fetching it again", job_key=key, path=str(path))
        if not dry_run:
            requeue_lost(store, rec)
        return attrs.evolve(item, record=None, adopt_from=None)
    if ours and item.revalidate:
        if not dry_run:
            store.reopen(key)
        return attrs.evolve(item, record=record_of(rec), adopt_from=None)
    return _skipped(item, path, rec.size, rec.sha256, rec)


@attrs.frozen
class _History:
    """What the store already holds, reduced to what planning needs: keys, names, keys by identity."""

    keys: Mapping[str, str]  # key -> scheme
    names: dict[str, str]  # identity -> relative path
    keys_by_ref: Mapping[str, JobKey]  # identity (or "path:" + relative path) -> first recorded key

    @classmethod
    def read(cls, store: Any) -> "_History":
        keys: dict[str, str] = {}
        names: dict[str, str] = {}
        refs: dict[str, JobKey] = {}
        for rec in store.records():
            keys[rec.key] = sys.intern(rec.scheme)
            identity, path = rec.payload.get("identity"), rec.payload.get("relative_path")
            if identity and path:
                names.setdefault(identity, path)
            ref = identity or (f"path:{path}" if path else None)  # a path only for records without identity
            if ref and ref != rec.key:  # a record keyed by its identity is found by its key
                refs.setdefault(ref, JobKey(key=rec.key, scheme=rec.scheme))
        return cls(keys, names, refs)

    def key_of(self, answered: JobKey, identity: str, relative: str) -> JobKey:
        """The key of a job: the one its record already has, whichever plugin keys it now.

        A job keeps the key it was first recorded under (found by its content identity,
        else by its output path), so switching the ``job_key`` winner (a canary ramp, a
        rollback) finds the finished file instead of planning a new job.
        """
        if answered.key in self.keys:
            return answered
        if identity in self.keys:
            return JobKey(key=identity, scheme=self.keys[identity], canonical_url=answered.canonical_url)
        found = self.keys_by_ref.get(identity) or self.keys_by_ref.get(f"path:{relative}")
        return attrs.evolve(found, canonical_url=answered.canonical_url) if found else answered


def _skipped(item: WorkItem, path: Path | None, size: int | None, sha256: str | None, info: Any) -> JobResult:
    return JobResult(
        outcome="skipped", job=item.job, job_key=item.key.key, reason="already_done", path=path,
        size=size, sha256=sha256, etag=info.etag, last_modified=info.last_modified,
        final_url=info.final_url, content_type=info.content_type, url=item.job.url,
        plugins={"job_key": item.job_key_answer.plugin}, fallbacks={"job_key": item.job_key_answer.fallback},
    )


def _record_finished(store: Any, key: str, final: Path, prior: PriorRecord) -> None:
    """Note in the store a job an earlier manifest already finished (so later runs need no manifest)."""
    claim = store.claim_key(key, "planner", 30.0)
    if claim is None:
        return  # someone holds it or it is already finished
    st = final.stat()
    store.finish(key, claim.epoch, path=str(final), size=st.st_size, sha256=prior.sha256 or "",
                 etag=prior.etag, last_modified=prior.last_modified, final_url=prior.final_url,
                 content_type=prior.content_type, mtime_ns=st.st_mtime_ns)


def remaining(store: Any, keys: Iterable[str]) -> set[str]:
    """Keys among ``keys`` that are not finished or failed yet (someone may still hold them)."""
    wanted = set(keys)  # only active records are read: the cost follows the run, not the store's history
    return {rec.key for state in ACTIVE_STATES for rec in store.records(state) if rec.key in wanted}


def finished_elsewhere(store: Any, keys: Iterable[str]) -> set[str]:
    """Keys among ``keys`` the store calls finished (another process may have done them)."""
    wanted = set(keys)
    return {rec.key for rec in store.records() if rec.key in wanted and _state(rec) == "finalized"}


def item_for_claim(plan: Plan, claim: Any) -> WorkItem:
    """The work item of a claim (planned by this process, or rebuilt from the store's payload)."""
    item = plan.items.get(claim.key)
    if item is None:
        payload = claim.record.payload
        job = job_from_payload(payload)
        item = WorkItem(job=job, key=JobKey(key=claim.key, scheme=claim.record.scheme), identity=payload.get("identity", claim.key),
                        relative_path=payload["relative_path"])
    record = item.record or record_of(claim.record)
    return attrs.evolve(item, epoch=claim.epoch, record=record)
