"""``finalize`` of the legacy plugin: check the job's size and SHA-256, then rename (no fsync)."""

from __future__ import annotations

import os

from contentdownload import FinalizeContext, FinalizeResult, hookimpl
from contentdownload.transfer.files import sha256_file
from contentdownload.records.log import get_logger

log = get_logger("contentdownload.legacy")


@hookimpl
def finalize(ctx: FinalizeContext) -> FinalizeResult:
    """Promote the part with ``os.replace`` after ``ctx.lease.assert_held()``; a mismatch deletes it."""
    paths, job = ctx.paths, ctx.job
    try:
        size = os.stat(paths.part).st_size
    except FileNotFoundError:
        return FinalizeResult(ok=False, reason="part_missing")
    sha256 = ctx.stream.sha256 or sha256_file(paths.part)
    reason = ""
    if ctx.stream.total_size is not None and size != ctx.stream.total_size:
        reason = "part_changed"
    elif job.size is not None and size != job.size:
        reason = "size_mismatch"
    elif job.sha256 is not None and sha256 != job.sha256:
        reason = "sha256_mismatch"
    if reason:
        paths.part.unlink(missing_ok=True)
        log.warning("part not promoted", final=str(paths.final), reason=reason, size=size, sha256=sha256)
        return FinalizeResult(ok=False, size=size, sha256=sha256, reason=reason)
    paths.final.parent.mkdir(parents=True, exist_ok=True)
    ctx.lease.assert_held()
    try:
        os.replace(paths.part, paths.final)
    except OSError as exc:
        log.error("cannot move the part into place", final=str(paths.final), error=str(exc))
        return FinalizeResult(ok=False, size=size, sha256=sha256, reason="rename_failed")
    ctx.effects.mark_renamed()
    paths.sidecar.unlink(missing_ok=True)
    return FinalizeResult(ok=True, path=paths.final, size=size, sha256=sha256, durable=False)
