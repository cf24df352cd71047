"""Planning a job list against a store: names, keys, what is done, what to do.

Shared by ``contentdownload run`` and :class:`~contentdownload.Downloader`. Planning is
idempotent: the same list planned twice, or by several processes at once, yields each
job key once in the store.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import attrs

from contentdownload.errors import NoPluginAnsweredError
from contentdownload.jobs.keys import identity_key
from contentdownload.records.log import get_logger
from contentdownload.records.manifest import ManifestRecords
from contentdownload.hooks.model import Job, JobKey, JobKeyContext, JobResult, PriorRecord
from contentdownload.jobs.naming import FOREIGN, NameOwners, base_name, plan_names
from contentdownload.jobs.rebuild import requeue_lost
from contentdownload.transfer.urls import redact_url
from contentdownload.transfer.files import file_matches
from contentdownload.jobs.worker import WorkItem, is_permanent, job_from_payload, job_payload, owner_is_dead_local_process, record_of
from contentdownload.jobs.workspace import Workspace

log = get_logger(__name__)

@attrs.frozen
class Plan:
    """The result of planning: items to process (by key), results already known (those not handed to
    ``on_settled``), how many jobs were settled in all, and the keys of this run."""

    items: Mapping[str, WorkItem]
    settled: Sequence[JobResult]
    keys: frozenset[str]
    order: Sequence[str]
    settled_count: int = 0


def _state(record: Any) -> str:
    state = record.state
    return state.value if hasattr(state, "value") else str(state)


#: jobs planned per round trip to the store: memory follows the page, not the list
PLAN_PAGE = 1000


def plan_jobs(
    runtime: Any,
    store: Any,
    ws: Workspace,
    jobs: Iterable[Job],
    *,
    revalidate: bool = False,
    retry_failed: bool = False,
    resume_from: ManifestRecords | None = None,
    dry_run: bool = False,
    on_settled: Callable[[list[JobResult]], None] | None = None,
) -> Plan:
    """Key and name every job, record them in ``store``, and sort out what needs doing.

    The list is read in pages of :data:`PLAN_PAGE` jobs; each page costs a few indexed
    lookups in the store (records by key, content identity and output name), never a read
    of the whole store or a listing of the output folder. ``dry_run``: change nothing in
    the store, only classify. ``on_settled``: called with each page's settled results (kept out
    of the plan, so memory follows the page even when every job of a long list is done).
    """
    items: dict[str, WorkItem] = {}
    settled: list[JobResult] = []
    count = 0
    names = _StoreNames(store, ws, resume_from, keep_given=dry_run)
    for page in _pages(jobs):
        page_items, page_settled, planned, history = _key_page(runtime, store, page, names, resume_from, revalidate)
        page_items = {key: item for key, item in page_items.items() if key not in items}
        if not dry_run:
            store.plan(planned)
        page_settled += _settle_from_manifest(store, ws, page_items, revalidate, dry_run)
        page_settled += _settle_from_store(store, ws, page_items, history.records, retry_failed, dry_run)
        items.update(page_items)
        count += len(page_settled)
        if on_settled is None:
            settled += page_settled
        elif page_settled:
            on_settled(page_settled)
    return Plan(items=items, settled=settled, keys=frozenset(items), order=list(items), settled_count=count)


Page = Sequence[tuple[str, tuple[Job, str]]]  # (identity, (job, canonical URL)) in list order


def _pages(jobs: Iterable[Job]) -> Iterator[Page]:
    """The jobs with their content identity (canonical URL, work and artifact ids), duplicates dropped, in pages."""
    seen: set[str] = set()
    page: list[tuple[str, tuple[Job, str]]] = []
    for job in jobs:
        identity, url = identity_key(job)
        if identity in seen:
            continue
        seen.add(identity)
        page.append((identity, (job, url)))
        if len(page) >= PLAN_PAGE:
            yield page
            page = []
    if page:
        yield page


class _StoreNames:
    """The names of one plan: a name on record (store, earlier manifest) stays with its job; a new
    one is held by no other identity in the store, by no file in the folder, by no other job of the plan."""

    def __init__(self, store: Any, ws: Workspace, resume_from: ManifestRecords | None, keep_given: bool):
        self.store, self.ws, self.keep_given = store, ws, keep_given
        self.resumed = {identity: Path(owned).name for identity, owned in (resume_from.names.items() if resume_from else ())
                        if Path(owned).parent == ws.out}
        self.given = _Owners(store, ws, {name.casefold(): identity for identity, name in self.resumed.items()})

    def assign(self, page: Page, known: Sequence[Any], bases: Sequence[str]) -> list[str]:
        """A relative path per job of ``page``; ``known``: the store's records of the page's identities and
        of its jobs' ``bases`` (the names they ask for)."""
        if not self.keep_given:
            self.given.forget()  # the names given so far are in the store now
        recorded: dict[str, str] = {}
        for rec in known:
            identity, path = rec.payload.get("identity"), rec.payload.get("relative_path")
            if identity and path:
                recorded.setdefault(identity, path)
        for identity, _ in page:
            if identity in self.resumed:
                recorded.setdefault(identity, self.resumed[identity])
        self.given.start_page(known, bases)
        return plan_names([(job, identity) for identity, (job, _) in page], recorded, owners=self.given)


class _Owners(NameOwners):
    """Who holds a name: this plan's choices, the store's records (the page's prefetched, others
    asked one by one), and, for a name no job recorded, a file of that name in the folder."""

    def __init__(self, store: Any, ws: Workspace, resumed: dict[str, str]):
        super().__init__()
        self.store, self.ws, self.resumed = store, ws, resumed
        self.known: dict[str, str | None] = {}  # casefolded name -> identity on record (None: asked, none)

    def forget(self) -> None:
        """Drop this plan's choices (once they are in the store)."""
        self._owner.clear()

    def start_page(self, records: Sequence[Any], asked: Sequence[str]) -> None:
        """What the store says of a new page's names (what it said of earlier pages may be stale now)."""
        self.known = {}
        self.know(records, asked)

    def know(self, records: Sequence[Any], asked: Sequence[str]) -> None:
        """Note who holds the names ``asked``, from ``records`` (the store's records of them)."""
        for name in asked:
            self.known.setdefault(name.casefold(), None)
        for rec in records:
            identity, path = rec.payload.get("identity"), rec.payload.get("relative_path")
            if identity and path and self.known.get(path.casefold()) is None:
                self.known[path.casefold()] = identity

    def owner(self, name: str) -> str | None:
        folded = name.casefold()
        holder = self._owner.get(folded) or self.resumed.get(folded)
        if holder is None:
            if folded not in self.known:
                self.know([*self.store.lookup(names=[name])], [name])
            holder = self.known[folded]
        if holder is None and os.path.lexists(self.ws.out / name):
            return FOREIGN
        return holder


def _key_page(
    runtime: Any, store: Any, page: Page, names: _StoreNames, resume_from: ManifestRecords | None, revalidate: bool,
) -> tuple[dict[str, WorkItem], list[JobResult], list[Any], "_History"]:
    """Name and key the jobs of one page: work items, failures, the store's planned rows, and what the store holds of them."""
    from contentdownload.store import PlannedJob  # the store package imports drivers lazily

    bases = [base_name(job, identity) for identity, (job, _) in page]
    known = store.lookup(identities=[identity for identity, _ in page], names=bases)
    relatives = names.assign(page, known, bases)
    answers, settled = _answers(runtime, page, relatives)
    asked = [a.result.key for a in answers if a is not None] + [identity for identity, _ in page]
    history = _History.of([*known, *_unseen(store, known, bases, asked, relatives)])
    items: dict[str, WorkItem] = {}
    planned = []
    by_key = resume_from.by_key if resume_from else {}
    by_url = resume_from.by_url if resume_from else {}
    for (identity, (job, canonical)), relative, answer in zip(page, relatives, answers):
        if answer is None:
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
        if key.key not in history.records:  # a job on record is planned already
            planned.append(PlannedJob(key=key.key, scheme=key.scheme, payload=job_payload(job, relative, identity)))
    return items, settled, planned, history


def _unseen(store: Any, known: Sequence[Any], asked_names: Sequence[str], keys: Sequence[str], names: Sequence[str]) -> list[Any]:
    """The records of ``keys`` and ``names`` the page's first lookup (``known``, by identity and ``asked_names``) did not find."""
    found = {rec.key for rec in known}
    folded = {name.casefold() for name in asked_names}
    return store.lookup(keys=[key for key in dict.fromkeys(keys) if key not in found],
                        names=[name for name in names if name.casefold() not in folded])


def _answers(runtime: Any, page: Page, relatives: Sequence[str]) -> tuple[list[Any], list[JobResult]]:
    """The ``job_key`` chain's answer per job (``None`` where no plugin keyed it, with its failure)."""
    answers: list[Any] = []
    settled: list[JobResult] = []
    for (identity, (job, _)), relative in zip(page, relatives):
        selection = runtime.policy.plan(identity)["job_key"]
        try:
            answers.append(runtime.dispatcher.call(selection, JobKeyContext(job=job, relative_path=relative)))
        except NoPluginAnsweredError as exc:
            answers.append(None)
            settled.append(JobResult(outcome="failed", job=job, reason="no_plugin", url=job.url))
            log.error("no plugin keyed the job", url=redact_url(job.url), error=str(exc))
    return answers, settled


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


def _settle_from_store(store: Any, ws: Workspace, items: dict[str, WorkItem], records: Mapping[str, Any],
                       retry_failed: bool, dry_run: bool) -> list[JobResult]:
    """What earlier runs left: finished files, failures, leases of dead processes (settled ones leave ``items``)."""
    settled = []
    existing = {key: rec for key in items if (rec := records.get(key)) is not None}
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
    ours = path is not None and _inside(str(path), str(ws.out))
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


def _inside(path: str, folder: str) -> bool:
    """Whether the normalised absolute ``path`` is ``folder`` or lies under it (by its text: no walk up its parents)."""
    return path == folder or path.startswith(os.path.join(folder, ""))


@attrs.frozen
class _History:
    """What the store holds of one page of jobs, reduced to what planning needs: records by key, keys by identity."""

    records: Mapping[str, Any]  # key -> record
    keys_by_ref: Mapping[str, JobKey]  # identity (or "path:" + relative path) -> first recorded key

    @classmethod
    def of(cls, records: Iterable[Any]) -> "_History":
        by_key = {rec.key: rec for rec in records}
        refs: dict[str, JobKey] = {}
        for key in sorted(by_key):
            rec = by_key[key]
            identity, path = rec.payload.get("identity"), rec.payload.get("relative_path")
            ref = identity or (f"path:{path}" if path else None)  # a path only for records without identity
            if ref and ref != rec.key:  # a record keyed by its identity is found by its key
                refs.setdefault(ref, JobKey(key=rec.key, scheme=rec.scheme))
        return cls(by_key, refs)

    def key_of(self, answered: JobKey, identity: str, relative: str) -> JobKey:
        """The key of a job: the one its record already has, whichever plugin keys it now.

        A job keeps the key it was first recorded under (found by its content identity,
        else by its output path), so switching the ``job_key`` winner (a canary ramp, a
        rollback) finds the finished file instead of planning a new job.
        """
        if answered.key in self.records:
            return answered
        if identity in self.records:
            return JobKey(key=identity, scheme=self.records[identity].scheme, canonical_url=answered.canonical_url)
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


def remaining(store: Any, keys: frozenset[str]) -> int:
    """How many of ``keys`` are not finished or failed yet (someone may still hold them): one count in the store."""
    return store.count_active(keys)


def finished_elsewhere(store: Any, keys: Iterable[str]) -> set[str]:
    """Keys among ``keys`` the store calls finished (another process may have done them)."""
    return {rec.key for rec in store.lookup(keys=keys) if _state(rec) == "finalized"}


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
