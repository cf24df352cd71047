"""``manifest.jsonl``: one row per job outcome, sorted keys, appended durably.

Rows are appended whole or not at all (a short ``write`` is continued, a failed one cut
off again) and fsynced; the file is opened without following a symlink. A row torn by a crash (no final
newline) is cut off when the manifest is opened again, so every line is valid JSON.
:func:`read_manifest` turns a manifest (this folder's or another's, for
``--resume-from``) into records of what is done and the validators to send.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import attrs

from contentdownload.errors import UsageError
from contentdownload.hooks.model import HOOKS, SUCCESS_OUTCOMES, JobResult, PriorRecord
from contentdownload.jobs.keys import identity_key
from contentdownload.records.guard import NOFOLLOW
from contentdownload.transfer.urls import canonical_url, redact_url

SCHEMA_VERSION = 1


def _relative(path: Path, out_dir: Path) -> str:
    """``path`` relative to ``out_dir`` when inside it (as given, else once both are resolved), else as it is."""
    if path.is_absolute() and out_dir.is_absolute() and ".." not in path.parts and path.is_relative_to(out_dir):
        return path.relative_to(out_dir).as_posix()
    try:
        return path.resolve().relative_to(out_dir.resolve()).as_posix()
    except ValueError:
        return str(path)


def result_row(result: JobResult, run_id: str, out_dir: Path) -> dict:
    """The manifest row of one job result (paths relative to ``out_dir`` when inside it)."""
    path = None
    if result.path is not None:
        path = _relative(Path(result.path), out_dir)
    try:
        identity = identity_key(result.job)[0]
    except UsageError:  # a bad input line has no usable URL
        identity = None
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "identity": identity,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "job_key": result.job_key,
        "work_id": result.job.work_id,
        "artifact_id": result.job.artifact_id,
        "line": result.job.line,
        "url": redact_url(result.url or result.job.url),
        "final_url": redact_url(result.final_url) if result.final_url else None,
        "outcome": result.outcome,
        "reason": result.reason,
        "http_status": result.http_status,
        "path": path,
        "size": result.size,
        "sha256": result.sha256,
        "content_type": result.content_type,
        "etag": result.etag,
        "last_modified": result.last_modified,
        "attempts": result.attempts,
        "elapsed_ms": round(result.elapsed_ms, 3),
        "bytes_downloaded": result.bytes_downloaded,
        "resumed_from": result.resumed_from,
        "plugins": {h: result.plugins.get(h) for h in HOOKS},
        "fallbacks": {h: bool(result.fallbacks.get(h, False)) for h in HOOKS},
        "verified_by": list(result.verified_by),
        "detected_type": result.detected_type,
    }


def repair_tail(path: Path) -> int:
    """Cut a torn last line (no newline) off ``path``; return the bytes removed."""
    try:
        with os.fdopen(os.open(path, os.O_RDWR | NOFOLLOW), "rb+") as fh:
            size = fh.seek(0, os.SEEK_END)
            if size == 0:
                return 0
            fh.seek(size - 1)
            if fh.read(1) == b"\n":
                return 0
            block = min(size, 1 << 20)
            fh.seek(size - block)
            data = fh.read(block)
            cut = data.rfind(b"\n")
            keep = size - block + cut + 1 if cut >= 0 else 0
            fh.truncate(keep)
            fh.flush()
            os.fsync(fh.fileno())
            return size - keep
    except FileNotFoundError:
        return 0


def iter_rows(path: Path) -> Iterator[dict]:
    """The rows of a manifest; a line that is not JSON is skipped."""
    with path.open("r", encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                yield row


def append_whole(fd: int, data: bytes) -> None:
    """Append ``data`` to the ``O_APPEND`` file ``fd`` whole or not at all.

    A short ``os.write`` is continued; when a later write fails, the part already written
    is cut off again (if no other process appended meanwhile) and the error is raised.
    """
    start = os.fstat(fd).st_size
    done = 0
    try:
        while done < len(data):
            done += os.write(fd, data[done:])
    except OSError:
        if done and os.fstat(fd).st_size == start + done:
            os.ftruncate(fd, start)
        raise


#: Characters JSON leaves raw that ``str.splitlines`` and some JSONL readers take for line ends.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _json_line(row: dict) -> str:
    """One manifest row as one line of JSON (UTF-8 kept readable; Unicode line breaks escaped)."""
    return json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).translate(_LINE_BREAKS)


class ManifestWriter:
    """Appends rows to ``manifest.jsonl``; thread-safe.

    ``write`` returns once the row is on disk; ``write_many`` appends a batch of rows in one
    write and returns once they all are. Rows written by several threads at once share one
    fsync (group commit): each writer waits until an fsync that started after its rows were
    written has finished.
    """

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        repair_tail(path)
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._written = 0  # rows handed to the kernel
        self._synced = 0  # rows known to be on disk
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | NOFOLLOW, 0o644)

    def write(self, row: dict) -> None:
        self.write_many([row])

    def write_many(self, rows: Sequence[dict]) -> None:
        """Append ``rows`` (all of them whole, or none) and return once they are on disk: one fsync for the batch."""
        if not rows:
            return
        data = "".join(_json_line(row) + "\n" for row in rows).encode("utf-8")
        with self._lock:
            append_whole(self._fd, data)  # O_APPEND: rows of concurrent processes never interleave
            self._written += len(rows)
            mine = self._written
        self._sync_through(mine)

    def _sync_through(self, mine: int) -> None:
        """Return once the first ``mine`` rows handed to the kernel are on disk (an fsync of another writer may cover them)."""
        with self._sync_lock:
            if self._synced >= mine:
                return  # another writer's fsync covered this row
            with self._lock:
                target = self._written
            os.fsync(self._fd)
            self._synced = target

    def close(self) -> None:
        """Flush the rows to disk and close; the file is closed even when the flush fails (which is raised)."""
        with self._sync_lock, self._lock:
            if self._fd >= 0:
                fd, self._fd = self._fd, -1
                try:
                    if self._synced < self._written:  # every row written is synced already: nothing to flush
                        os.fsync(fd)
                finally:
                    os.close(fd)


def _row_path(row: dict, base: Path) -> str | None:
    """The row's file, resolved against the manifest's folder; ``None`` unless it lies inside that folder."""
    path = row.get("path")
    if not path:
        return None
    resolved = (base / path).resolve()
    return str(resolved) if base in resolved.parents else None


def row_record(row: dict, base: Path) -> PriorRecord:
    """A manifest row as a :class:`PriorRecord` (a finished file only when the row has its SHA-256)."""
    path = _row_path(row, base)
    done = row.get("outcome") in SUCCESS_OUTCOMES and bool(row.get("sha256")) and path is not None
    return PriorRecord(
        path=path if done else None,
        size=row.get("size") if done else None,
        sha256=row.get("sha256") if done else None,
        etag=row.get("etag"),
        last_modified=row.get("last_modified"),
        final_url=row.get("final_url"),
        content_type=row.get("content_type"),
    )


@attrs.frozen
class ManifestRecords:
    """What an earlier manifest says: records by job key and by canonical URL, and which
    identity owns which file (absolute paths), the latest row winning."""

    by_key: Mapping[str, PriorRecord]
    by_url: Mapping[str, PriorRecord]
    names: Mapping[str, str]


def read_manifest(path: str | Path) -> ManifestRecords:
    """Read an earlier manifest (``--resume-from``, or this folder's own without the store)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--resume-from: manifest not found: {path}")
    by_key: dict[str, PriorRecord] = {}
    by_url: dict[str, PriorRecord] = {}
    names: dict[str, str] = {}
    base = path.resolve().parent
    for row in iter_rows(path):
        record = row_record(row, base)
        owned = _row_path(row, base)
        if row.get("identity") and owned and row.get("outcome") in SUCCESS_OUTCOMES:
            names[row["identity"]] = owned
        if row.get("job_key"):
            by_key[row["job_key"]] = record
        url = row.get("url")
        if url:
            try:
                by_url[canonical_url(url)] = record
            except UsageError:
                pass
    return ManifestRecords(by_key=by_key, by_url=by_url, names=names)
