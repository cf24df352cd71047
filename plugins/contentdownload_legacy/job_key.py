"""``job_key`` of the legacy plugin: the job is its output path."""

from __future__ import annotations

from contentdownload import JobKey, JobKeyContext, hookimpl
from contentdownload.jobs.keys import path_key


@hookimpl
def job_key(ctx: JobKeyContext) -> JobKey:
    """SHA-256 of the output path relative to the output folder (``legacy-v1``)."""
    return JobKey(key=path_key(ctx.relative_path), scheme="legacy-v1")
