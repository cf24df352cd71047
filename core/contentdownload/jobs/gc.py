"""``contentdownload gc``: remove staging files that no live job owns."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from contentdownload.jobs.workspace import Workspace, staging_owner
from contentdownload.transfer.locks import PartLock

LIVE_STATES = ("planned", "leased", "streaming")


def _lock_held(path: Path) -> bool:
    """Whether a worker holds this lock file (a live job's part)."""
    return PartLock(path).held_elsewhere()


def collect(store: Any, ws: Workspace, dry_run: bool = False) -> dict:
    """Remove parts, sidecars and leftovers whose job is finished, failed or unknown; keep those of live jobs."""
    removed: list[Path] = []
    total = 0
    if not ws.staging.is_dir():
        return {"paths": removed, "bytes": 0}
    now = time.time()
    for path in sorted(ws.staging.iterdir()):
        owner = staging_owner(path.name)
        if owner is None or not path.is_file():
            continue
        key = owner[0]
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
