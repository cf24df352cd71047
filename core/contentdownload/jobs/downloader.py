"""The library API: :class:`Downloader`.

    from contentdownload import Downloader, Job

    with Downloader(workers=4) as dl:
        result = dl.download("https://example.org/paper.pdf", "papers/")
        print(result.outcome, result.path, result.sha256)

A ``Downloader`` is configured from the same sources as the CLI (config file, env
flags, keyword overrides for ``[run]`` settings, plugin pins through the config or
``pins=``). ``download`` is safe to call from several threads at once; each destination
folder keeps its own job store, so calling it again for a finished file makes no
request, and an interrupted file resumes.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Mapping

import attrs

from contentdownload.errors import DiskError
from contentdownload.machinery.config import check_option
from contentdownload.machinery.flags import FlagLayer
from contentdownload.transfer.urls import canonical_url
from contentdownload.records.log import get_logger
from contentdownload.hooks.model import Job, JobResult
from contentdownload.jobs.pipeline import Pipeline
from contentdownload.jobs.planner import item_for_claim, plan_jobs
from contentdownload.jobs.runner import make_http, open_job_store, transfer_options
from contentdownload.machinery.runtime import Runtime
from contentdownload.jobs.worker import JobWorker, make_owner
from contentdownload.jobs.workspace import Workspace

log = get_logger(__name__)


class Downloader:
    """Downloads jobs into folders, one call per job, with the product's guarantees.

    ``config``: a config file path (default: ``./contentdownload.toml`` or
    ``pyproject.toml``). ``environ``: the environment to read flags from (default
    ``os.environ``). ``pins``: ``{hook: plugin}`` choices that beat env and config, like
    ``--plugin``. ``plugins``: extra plugin objects to register by name. Any other keyword
    is a ``[run]`` setting (``retries``, ``timeout``, ``max_bytes``, ``revalidate``,
    ``headers``, ``cookie_jar``, ``ca_bundle`` ...), checked as the CLI checks its flags: an
    unknown name or a bad value raises :class:`~contentdownload.errors.UsageError`.
    """

    def __init__(
        self,
        *,
        config: str | Path | None = None,
        environ: Mapping[str, str] | None = None,
        pins: Mapping[str, str] | None = None,
        plugins: Mapping[str, object] | None = None,
        **settings: Any,
    ):
        for key, value in settings.items():
            check_option(key, value, key)  # the CLI's checks and messages: UsageError (a ValueError)
        cli = FlagLayer(source="cli", pins=dict(pins or {}), origin={f"pin:{h}": f"Downloader(pins={{{h!r}: {n!r}}})" for h, n in (pins or {}).items()})
        self.runtime = Runtime.from_options(config_path=config, cli=cli, environ=environ, extra_plugins=plugins,
                                            run_overrides=settings, override_label=lambda key: f"Downloader({key}=...)")
        self.settings = self.runtime.settings
        self._http = make_http(self.settings, self.runtime.environ)
        self._pipeline = Pipeline(self.runtime, self._http, transfer_options(self.settings), retries=self.settings.retries, backoff_factor=self.settings.backoff_factor)
        self._owner = make_owner()
        self._lock = threading.Lock()
        self._folders: dict[Path, tuple[Workspace, Any, threading.Lock]] = {}

    def _folder(self, dest_dir: str | Path) -> tuple[Workspace, Any, threading.Lock]:
        resolved = Path(dest_dir).expanduser().resolve()
        with self._lock:
            if resolved not in self._folders:
                ws = Workspace.open(resolved)
                self._folders[resolved] = (ws, open_job_store(self.runtime, ws), threading.Lock())
            return self._folders[resolved]

    def download(self, job_or_url: Job | str, dest_dir: str | Path) -> JobResult:
        """Fetch one job (or URL) into ``dest_dir``; returns its :class:`~contentdownload.hooks.model.JobResult`."""
        job = Job(urls=(job_or_url,)) if isinstance(job_or_url, str) else job_or_url
        for url in job.urls:
            canonical_url(url)  # a malformed URL is a UsageError, as on the command line
        ws, store, plan_lock = self._folder(dest_dir)
        with plan_lock:  # naming and planning see each other's choices
            plan = plan_jobs(self.runtime, store, ws, [job], revalidate=self.settings.revalidate, retry_failed=True)
        if plan.settled:
            return plan.settled[0]
        item = next(iter(plan.items.values()))
        leasing = self.runtime.policy.idempotency.enabled
        worker = JobWorker(self.runtime, self._pipeline, store, ws, transfer_options(self.settings), owner=self._owner,
                           lease_ttl=self.settings.lease_ttl, leasing=leasing)
        if not leasing:
            return worker.process(item)
        while True:
            claim = store.claim_key(item.key.key, self._owner, self.settings.lease_ttl)
            if claim is not None:
                return self._process(worker, store, attrs.evolve(item_for_claim(plan, claim), revalidate=item.revalidate))
            # Another thread or process holds this job: wait for it, then report what it did.
            record = store.get(item.key.key)
            state = getattr(record.state, "value", record.state) if record else None
            if state in ("finalized", "failed"):
                with plan_lock:
                    again = plan_jobs(self.runtime, store, ws, [job], revalidate=False, retry_failed=False)
                if again.settled:
                    return again.settled[0]
            time.sleep(0.05)

    @staticmethod
    def _process(worker: JobWorker, store: Any, item: Any) -> JobResult:
        """Process a claimed job; a full or read-only disk gives the job back (its part kept) and is raised."""
        try:
            return worker.process(item)
        except OSError as exc:
            disk = DiskError.of(exc)
            if disk is None:
                raise
            try:
                store.release(item.key.key, item.epoch)
            except Exception as again:  # the store may share the disk: the lease then expires on its own
                log.info("could not give a job back", job_key=item.key.key, error=f"{type(again).__name__}: {again}")
            if disk is exc:
                raise
            raise disk from exc

    def close(self) -> None:
        """Close the job stores and HTTP sessions."""
        with self._lock:
            for _ws, store, _lock in self._folders.values():
                store.close()
            self._folders.clear()
        self._http.close()

    def __enter__(self) -> "Downloader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
