"""``finalize`` of the streaming plugin: verify, fsync, fence, rename atomically, fsync the folder.

The part is promoted only when its size and SHA-256 match what the job expects (when
the job says), after it was fsynced and right after ``ctx.lease.assert_held()``. The
rename is ``os.replace`` on the same filesystem (checked at start by the runner), so the
final path holds either the old file or the complete new one at every moment; the
folder is fsynced afterwards so the rename itself survives a power cut.
"""

from __future__ import annotations

import os
from pathlib import Path

from contentdownload import FinalizeContext, FinalizeResult, hookimpl
from contentdownload.transfer.files import sha256_file
from contentdownload.records.log import get_logger

from . import sidecar as sidecars
from .resume import drop_part

log = get_logger("contentdownload.streaming")


def fsync_directory(path: Path) -> None:
    """fsync a folder so the names created or renamed in it are durable (a no-op where unsupported)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and Windows) cannot fsync a folder
    finally:
        os.close(fd)


def make_parents(folder: Path) -> None:
    """Create ``folder`` and missing parents, fsyncing each parent a folder was created in."""
    missing: list[Path] = []
    current = folder
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    folder.mkdir(parents=True, exist_ok=True)
    for created in reversed(missing):
        fsync_directory(created.parent)


@hookimpl
def finalize(ctx: FinalizeContext) -> FinalizeResult:
    """Check size and SHA-256, fsync the part, ``assert_held``, ``os.replace``, fsync the folder, drop the sidecar."""
    paths, job, stream = ctx.paths, ctx.job, ctx.stream
    try:
        size = os.stat(paths.part).st_size
    except FileNotFoundError:
        return FinalizeResult(ok=False, reason="part_missing")
    if stream.total_size is not None and size != stream.total_size:
        drop_part(paths.part, paths.sidecar)
        log.warning("part changed after the transfer, not promoted", part=str(paths.part), size=size, expected=stream.total_size)
        return FinalizeResult(ok=False, size=size, reason="part_changed")
    if job.size is not None and size != job.size:
        drop_part(paths.part, paths.sidecar)
        log.warning("size differs from the job's, not promoted", final=str(paths.final), size=size, expected=job.size)
        return FinalizeResult(ok=False, size=size, reason="size_mismatch")
    sha256 = stream.sha256 or sha256_file(paths.part)
    if job.sha256 is not None and sha256 != job.sha256:
        drop_part(paths.part, paths.sidecar)
        log.warning("SHA-256 differs from the job's, not promoted", final=str(paths.final), sha256=sha256, expected=job.sha256)
        return FinalizeResult(ok=False, size=size, sha256=sha256, reason="sha256_mismatch")

    with open(paths.part, "rb") as fh:
        os.fsync(fh.fileno())
    make_parents(paths.final.parent)
    ctx.lease.assert_held()
    try:
        os.replace(paths.part, paths.final)
    except OSError as exc:
        log.error("cannot move the part into place", final=str(paths.final), error=str(exc))
        return FinalizeResult(ok=False, size=size, sha256=sha256, reason="rename_failed")
    ctx.effects.mark_renamed()
    fsync_directory(paths.final.parent)
    sidecars.remove(paths.sidecar)
    log.info("finalized", final=str(paths.final), size=size, sha256=sha256)
    return FinalizeResult(ok=True, path=paths.final, size=size, sha256=sha256, durable=True)
