"""Job records rebuilt from the manifest and the files on disk, and files checked against their records.

The manifest is the record of what a folder holds: the last rows of a job give its key,
identity, path, size, SHA-256 and validators. :func:`rebuild_from_manifest` puts them
back into a store that lost them (a deleted, truncated or damaged ``jobs.db``): a file
still there with its recorded size is recorded finished, so the next run skips it under
its own name; a missing or different one is recorded planned (the next run fetches it
again under the same name). :func:`verify_files` re-checks the files a store calls
finished and sends the missing or changed ones back to ``planned``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import attrs

from contentdownload.errors import DamagedStoreError
from contentdownload.hooks.model import SUCCESS_OUTCOMES
from contentdownload.jobs.keys import path_key
from contentdownload.jobs.ledger import forget_row
from contentdownload.jobs.workspace import Workspace
from contentdownload.records.manifest import iter_rows
from contentdownload.transfer.files import sha256_file

#: an SQLite database's companions, moved aside with it
SQLITE_COMPANIONS = ("-wal", "-shm")


@attrs.frozen(kw_only=True)
class Rebuilt:
    """What a rebuild put into the store: records by state, and the files of an old store moved aside."""

    records: int = 0
    finished: int = 0
    to_download: int = 0
    failed: int = 0
    moved_aside: tuple[str, ...] = ()

    def line(self) -> str:
        return (f"rebuilt {self.records} job records from the manifest ({self.finished} finished, "
                f"{self.to_download} to download, {self.failed} failed)")

    def as_dict(self) -> dict:
        return {**attrs.asdict(self), "moved_aside": list(self.moved_aside)}


@attrs.frozen
class _Entry:
    """One job as the manifest has it: its last row, and its last row with a finished file."""

    last: Mapping[str, Any]
    done: Mapping[str, Any] | None


def _entries(manifest: Path) -> dict[str, _Entry]:
    found: dict[str, _Entry] = {}
    for row in iter_rows(manifest) if manifest.is_file() else ():
        key = row.get("job_key")
        if not key or not isinstance(key, str):
            continue
        previous = found.get(key)
        done = row if row.get("outcome") in SUCCESS_OUTCOMES and row.get("sha256") and row.get("path") else None
        found[key] = _Entry(last=row, done=done or (previous.done if previous else None))
    return found


def _scheme(key: str, row: Mapping[str, Any], relative: str | None) -> str:
    if key == row.get("identity"):
        return "streaming-v1"
    if relative and key == path_key(relative):
        return "legacy-v1"
    return "rebuilt"


def _relative(ws: Workspace, row: Mapping[str, Any] | None) -> str | None:
    """The row's path relative to the folder, when it is a path inside it."""
    path = (row or {}).get("path")
    if not path or not isinstance(path, str):
        return None
    try:
        return ws.relative(ws.final_path(path)) if not Path(path).is_absolute() else ws.relative(Path(path))
    except (ValueError, OSError):
        return None


def _payload(row: Mapping[str, Any], relative: str | None) -> dict:
    payload = {"urls": [row.get("url") or "-"], "work_id": row.get("work_id"), "artifact_id": row.get("artifact_id"),
               "line": row.get("line"), "identity": row.get("identity")}
    if relative:
        payload["relative_path"] = relative
    return payload


def _matches(final: Path, size: Any) -> os.stat_result | None:
    """The file's stat when it is there with the recorded size (cheap: no hashing)."""
    try:
        st = final.stat()
    except OSError:
        return None
    return st if size is None or st.st_size == size else None


def rebuild_from_manifest(store: Any, ws: Workspace) -> Rebuilt:
    """Record in ``store`` every job of the folder's manifest the store does not hold."""
    from contentdownload.store import PlannedJob  # the store package imports drivers lazily

    entries = {key: e for key, e in _entries(ws.manifest).items() if store.get(key) is None}
    planned = []
    for key, entry in entries.items():
        relative = _relative(ws, entry.done or entry.last)
        planned.append(PlannedJob(key=key, scheme=_scheme(key, entry.last, relative), payload=_payload(entry.last, relative)))
    store.plan(planned)
    counts = {"finished": 0, "to_download": 0, "failed": 0}
    for key, entry in entries.items():
        counts[_restore(store, ws, key, entry)] += 1
    return Rebuilt(records=len(entries), **counts)


def _restore(store: Any, ws: Workspace, key: str, entry: _Entry) -> str:
    """Move one planned record to what the manifest and the disk say: finished, failed, or left planned."""
    relative = _relative(ws, entry.done)
    st = _matches(ws.final_path(relative), entry.done.get("size")) if entry.done and relative else None
    claim = store.claim_key(key, "rebuild", 30.0)
    if claim is None:  # another process took it meanwhile: it is that process's job now
        return "to_download"
    if st is not None:
        done = entry.done
        store.finish(key, claim.epoch, path=str(ws.final_path(relative)), size=st.st_size, sha256=done["sha256"],
                     etag=done.get("etag"), last_modified=done.get("last_modified"), final_url=done.get("final_url"),
                     content_type=done.get("content_type"), mtime_ns=st.st_mtime_ns)
        return "finished"
    if entry.done is not None:
        forget_row(store, key, entry.done["sha256"])  # its row describes a file that is gone: the next one gets a row
    if entry.last.get("outcome") == "failed":
        store.fail(key, claim.epoch, str(entry.last.get("reason") or "failed"), retryable=False, max_attempts=1)
        return "failed"
    store.release(key, claim.epoch)
    return "to_download"


def move_aside(path: Path) -> tuple[str, ...]:
    """Rename an SQLite file and its companions to ``NAME.corrupt-<UTC time>`` (nothing is deleted)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    moved = []
    for suffix in ("", *SQLITE_COMPANIONS):
        source = path.with_name(path.name + suffix)
        if source.exists():
            target = path.with_name(f"{path.name}.corrupt-{stamp}{suffix}")
            os.replace(source, target)
            moved.append(str(target))
    return tuple(moved)


def rebuild_command(out: Path, db: str | None) -> str:
    return f"contentdownload jobs rebuild --out {out}" + (f" --db {db}" if db else "")


def damaged(exc: DamagedStoreError, out: Path, db: str | None) -> DamagedStoreError:
    """The damaged-store error with the command that rebuilds the store from this folder's manifest."""
    return DamagedStoreError(f"{exc}; rebuild it from the manifest with: {rebuild_command(out, db)}")


# -- verify ---------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Verified:
    """Per-outcome counts of a verification, and the files whose jobs went back to ``planned``."""

    verified: int = 0
    missing: int = 0
    changed: int = 0
    requeued: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        return {**attrs.asdict(self), "requeued": list(self.requeued)}


def _checkable(rec: Any, out: Path | None) -> bool:
    """A record to check: its file is inside ``out``; without ``out``, any of this machine's folders."""
    if out is not None:
        return out in Path(rec.path).parents
    return rec.location is None or Workspace.on_this_host(rec.location)


def check_file(rec: Any, deep: bool) -> str:
    """``verified``, ``missing`` or ``changed``: the file at a finished record's path against the record."""
    path = Path(rec.path)
    try:
        st = path.stat()
    except OSError:
        return "missing"
    if rec.size is not None and st.st_size != rec.size:
        return "changed"
    if deep and rec.sha256 and sha256_file(path) != rec.sha256.lower():
        return "changed"
    return "verified"


def verify_files(store: Any, out: Path | None, *, deep: bool = False) -> Verified:
    """Check the files of the finished records (those inside ``out``, else those of this machine's folders);
    re-queue the missing and changed."""
    counts = {"verified": 0, "missing": 0, "changed": 0}
    requeued = []
    for rec in _finished(store, out):
        outcome = check_file(rec, deep)
        counts[outcome] += 1
        if outcome != "verified":
            requeue_lost(store, rec)
            requeued.append(rec.path)
    return Verified(requeued=tuple(requeued), **counts)


def _finished(store: Any, out: Path | None) -> Iterator[Any]:
    for rec in list(store.records("finalized")):
        if rec.path and _checkable(rec, out):
            yield rec


def requeue_lost(store: Any, rec: Any) -> None:
    """Send a finished job whose file is gone or changed back to ``planned`` (its next file gets a row)."""
    store.reopen(rec.key)
    if rec.sha256:
        forget_row(store, rec.key, rec.sha256)

