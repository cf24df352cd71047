"""``job_key`` of the streaming plugin: the job's content identity."""

from __future__ import annotations

from contentdownload import JobKey, JobKeyContext, hookimpl
from contentdownload.jobs.keys import identity_key


@hookimpl
def job_key(ctx: JobKeyContext) -> JobKey:
    """SHA-256 of canonical JSON of {version, work_id, artifact_id, canonical URL}.

    The URL is canonicalised here (case, default port, fragment, percent-encoding,
    IDN), so callers pass URLs as they come.
    """
    key, url = identity_key(ctx.job)
    return JobKey(key=key, scheme="streaming-v1", canonical_url=url)
