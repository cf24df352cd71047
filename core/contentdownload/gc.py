"""``contentdownload gc``: remove staging files that no live job owns."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .workspace import Workspace

LIVE_STATES = ("planned", "leased", "streaming")
SUFFIXES = (".part.json.tmp", ".part.json", ".part.adopt", ".part", ".lock")


def _key_of(name: str) -> str | None:
    """The job key in a staging file name: ``KEY[.EPOCH].part``, ``.part.json``, ``.lock``."""
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            stem = name[: -len(suffix)]
            key, _, epoch = stem.rpartition(".")
            return key if key and epoch.isdigit() else stem
    return None


def _lock_held(path: Path) -> bool:
    from filelock import FileLock, Timeout

    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False


def collect(store: Any, ws: Workspace, dry_run: bool = False) -> dict:
    """Remove parts, sidecars and leftovers whose job is finished, failed or unknown; keep those of live jobs."""
    removed: list[Path] = []
    total = 0
    if not ws.staging.is_dir():
        return {"paths": removed, "bytes": 0}
    now = time.time()
    for path in sorted(ws.staging.iterdir()):
        key = _key_of(path.name)
        if key is None or not path.is_file():
            continue
        record = store.get(key)
        state = None if record is None else getattr(record.state, "value", record.state)
        if state in LIVE_STATES or (path.name.endswith(".lock") and _lock_held(path)):
            continue
        if state is None and now - path.stat().st_mtime < 60:
            continue  # a job planned a moment ago by another process may own it
        total += path.stat().st_size
        removed.append(path)
        if not dry_run:
            path.unlink(missing_ok=True)
    return {"paths": removed, "bytes": total}
