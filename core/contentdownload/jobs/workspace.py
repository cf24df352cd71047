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
import socket
from pathlib import Path

import attrs

from contentdownload.errors import UnsafePathError, UsageError
from contentdownload.hooks.model import StagePaths
from contentdownload.transfer.parts import check_staging

HIDDEN = ".contentdownload"
#: Files in staging: ``KEY[.EPOCH].part``, its sidecar ``.part.json`` (written through
#: ``.part.json.tmp``), a copy being adopted ``.part.adopt``, and the epoch's ``KEY.EPOCH.lock`` (where
#: the platform has no open file description locks; else one shared ``epochs.locks``).
#: A part fenced off from an earlier owner of its job is ``KEY.EPOCH.fenced`` until gc removes it.
STAGING_SUFFIXES = (".part.json.tmp", ".part.json", ".part.adopt", ".part", ".lock", ".fenced")


def staging_owner(name: str) -> tuple[str, int | None] | None:
    """``(job key, epoch)`` a staging file belongs to (epoch ``None`` without leases); ``None`` for other names."""
    for suffix in STAGING_SUFFIXES:
        if name.endswith(suffix):
            stem = name[: -len(suffix)]
            key, dot, epoch = stem.rpartition(".")
            if dot and key and epoch.isdigit():
                return key, int(epoch)
            return stem, None
    return None


def check_same_filesystem(staging: Path, out: Path) -> None:
    """Raise :class:`StagingError` unless ``staging`` and ``out`` are on one filesystem (so the rename is atomic),
    or when the staging folder is a symlink."""
    check_staging(staging, out)


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
                check_staging(ws.staging)  # before mkdir: never create folders through a planted symlink
            except UnsafePathError as exc:
                raise UsageError(str(exc)) from None
            try:
                ws.staging.mkdir(parents=True, exist_ok=True)  # logs/ is made when a log is written there
            except OSError as exc:
                raise UsageError(f"cannot create output folder {out}: {exc.strerror}") from None
            check_same_filesystem(ws.staging, ws.out)
        return ws

    @property
    def location(self) -> str:
        """Where this folder is, for a store several folders share: ``host:/absolute/folder``."""
        return f"{socket.gethostname()}:{self.out}"

    @staticmethod
    def on_this_host(location: str | None) -> bool:
        """Whether a recorded location is a folder of this machine (so its files can be looked at)."""
        return bool(location) and location.partition(":")[0] == socket.gethostname()

    @property
    def default_db(self) -> str:
        return f"sqlite:///{self.hidden / 'jobs.db'}"

    def final_path(self, relative: str) -> Path:
        """``out/relative``, refusing anything that would land outside ``out``.

        Symlinks are not resolved: the part store refuses to write through one at promotion.
        """
        candidate = os.path.abspath(os.path.join(self.out, relative))  # strings: a job's paths are checked on the event loop
        if not _below(candidate, os.fspath(self.out)):
            raise UsageError(f"refusing a path outside the output folder: {relative!r}")
        hidden = os.fspath(self.hidden)
        if candidate == hidden or _below(candidate, hidden):
            raise UsageError(f"refusing a path inside the product's own folder: {relative!r}")
        return Path(candidate)

    def stage_paths(self, relative: str, key: str, epoch: int | None = None) -> StagePaths:
        """Final, part and sidecar paths of a job; with leases, each epoch has its own part."""
        return StagePaths.for_key(self.final_path(relative), self.staging, key, "" if epoch is None else f".{epoch}", root=self.out)

    def parts_of(self, key: str) -> list[tuple[int | None, Path]]:
        """The job's parts in staging with their epochs, newest epoch first."""
        found = []
        for path in self.staging.glob(f"{key}*.part") if self.staging.is_dir() else ():
            owner = staging_owner(path.name)
            if owner is not None and owner[0] == key:
                found.append((owner[1], path))
        return sorted(found, key=lambda entry: -1 if entry[0] is None else entry[0], reverse=True)

    def relative(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.out).as_posix()


def _below(path: str, folder: str) -> bool:
    """Whether the normalised absolute ``path`` lies inside ``folder`` (not ``folder`` itself)."""
    return path != folder and path.startswith(folder if folder.endswith(os.sep) else folder + os.sep)
