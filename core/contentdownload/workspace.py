"""The output folder's layout, and the guard that keeps every file inside it.

::

    DIR/                      finished files
    DIR/manifest.jsonl        one row per job outcome
    DIR/manifest.metrics.json totals of the last run
    DIR/logs/download.log     JSON log lines
    DIR/.contentdownload/     job store (jobs.db) and staging/ (parts and sidecars)
"""

from __future__ import annotations

import os
from pathlib import Path

import attrs

from .errors import StagingError, UsageError
from .model import StagePaths

HIDDEN = ".contentdownload"


def check_same_filesystem(staging: Path, out: Path) -> None:
    """Raise :class:`StagingError` unless ``staging`` and ``out`` are on one filesystem (so ``os.replace`` is atomic)."""
    if os.stat(staging).st_dev != os.stat(out).st_dev:
        raise StagingError(
            f"staging folder {staging} is on another filesystem than the output folder {out}: "
            "the final rename would not be atomic"
        )


@attrs.frozen
class Workspace:
    """Paths of one output folder. ``out`` is absolute; every final path is checked to stay inside it."""

    out: Path
    hidden: Path
    staging: Path
    logs: Path
    manifest: Path
    metrics: Path

    @classmethod
    def open(cls, out: str | Path, create: bool = True) -> "Workspace":
        out = Path(out).expanduser().resolve()
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out is not a folder: {out}")
        hidden = out / HIDDEN
        ws = cls(
            out=out,
            hidden=hidden,
            staging=hidden / "staging",
            logs=out / "logs",
            manifest=out / "manifest.jsonl",
            metrics=out / "manifest.metrics.json",
        )
        if create:
            try:
                ws.staging.mkdir(parents=True, exist_ok=True)
                ws.logs.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UsageError(f"cannot create output folder {out}: {exc.strerror}") from None
            check_same_filesystem(ws.staging, ws.out)
        return ws

    @property
    def default_db(self) -> str:
        return f"sqlite:///{self.hidden / 'jobs.db'}"

    def final_path(self, relative: str) -> Path:
        """``out/relative``, refusing anything that would land outside ``out``."""
        candidate = (self.out / relative).resolve()
        if candidate.parent != self.out and self.out not in candidate.parents:
            raise UsageError(f"refusing a path outside the output folder: {relative!r}")
        if self.hidden in (candidate, *candidate.parents):
            raise UsageError(f"refusing a path inside the product's own folder: {relative!r}")
        return candidate

    def stage_paths(self, relative: str, key: str, epoch: int | None = None) -> StagePaths:
        """Final, part and sidecar paths of a job; with leases, each epoch has its own part."""
        return StagePaths.for_key(self.final_path(relative), self.staging, key, "" if epoch is None else f".{epoch}")

    def relative(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.out).as_posix()
