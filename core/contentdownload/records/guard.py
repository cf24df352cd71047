"""Checks on the output folder's record files before a run writes any of them.

``logs/``, ``manifest.jsonl`` and ``manifest.metrics.json`` must be what they claim to be
and never symlinks (a planted link would make records land outside ``--out``); the
folder must be writable. Without the job store, :class:`RunLock` keeps a second process
off the folder. Every refusal is a :class:`~contentdownload.errors.UsageError` (one
line, exit 2).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import threading
from pathlib import Path

from contentdownload.errors import UsageError

#: ``os.open`` flags that refuse to follow a symlink at the last component.
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def _kind(path: Path) -> str | None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    return "link" if stat.S_ISLNK(mode) else "dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "other"


def check_records(out: Path, logs: Path, files: tuple[Path, ...]) -> None:
    """Refuse symlinked or mistyped record paths and a read-only ``out``."""
    for path, want in ((logs, "dir"), *((f, "file") for f in files)):
        kind = _kind(path)
        if kind == "link":
            raise UsageError(f"refusing {path}: it is a symbolic link (records are never written through links)")
        if kind not in (None, want):
            what = "a folder" if want == "dir" else "a regular file"
            raise UsageError(f"{path} must be {what}: remove or rename it")
    problem = write_problem(out)
    if problem is not None:
        reason = "read-only" if problem.errno in (errno.EROFS, errno.EACCES, errno.EPERM) else problem.strerror
        raise UsageError(f"output folder {out} is not writable ({reason})")


def write_problem(folder: Path) -> OSError | None:
    """Why a file cannot be created in ``folder`` (``None``: it can), found by creating and removing one."""
    probe = folder / f".write-check-{os.getpid()}-{threading.get_ident()}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o600))
        os.unlink(probe)
    except OSError as exc:
        return exc
    return None


class RunLock:
    """An exclusive lock on ``path`` (``fcntl.flock``) holding the owner's pid; refused while another process holds it."""

    def __init__(self, path: Path):
        self.path = path
        self._fd = -1

    def acquire(self) -> "RunLock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | NOFOLLOW, 0o644)
        except OSError as exc:
            raise UsageError(f"cannot open the run lock {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise UsageError(
                f"another contentdownload process (pid {other}) is running on {self.path.parent.parent}; "
                "without the job store only one process may use a folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing drops the flock
            self._fd = -1

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
