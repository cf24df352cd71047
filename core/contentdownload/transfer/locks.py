"""The lock a worker holds on its part: an exclusive ``flock`` on a file of the staging folder.

One ``open`` (``O_NOFOLLOW``: a planted symlink is refused), one ``flock``, and a check
that the file locked is still the one at the path (a holder removes its lock file when
it is done, so a waiter may have locked a file no longer there: it tries again). The
lock is the kernel's, so it is released when its process dies, and every ``flock`` user
of the same file (the ``gc`` command) sees it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path

from contentdownload.errors import UnsafePathError

#: Seconds between tries while waiting for a lock another process holds.
POLL_S = 0.05


class PartLock:
    """An exclusive lock on ``path``; ``acquire(timeout)`` (``False`` when another holder kept it), ``release``."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def acquire(self, timeout: float = 0.0) -> bool:
        """Take the lock, waiting up to ``timeout`` seconds; ``False`` when another holder kept it that long."""
        deadline = time.monotonic() + timeout
        while True:
            got = self._try()
            if got:
                return True
            if got is None:  # the file locked was removed by its holder: lock the one there now
                continue
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_S)

    def _try(self) -> bool | None:
        """``True``: locked; ``False``: another holder has it; ``None``: the file was removed meanwhile."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafePathError(f"refusing to lock through a symlink at {self.path}", "part_path_is_symlink") from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        try:
            same = os.fstat(fd).st_ino == os.lstat(self.path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            return None
        self.fd = fd
        return True

    def release(self, *, remove: bool = False) -> None:
        """Release the lock; ``remove``: delete the lock file first (while it is still held, so no waiter keeps a stale one)."""
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            if remove:
                self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)

    def held_elsewhere(self) -> bool:
        """Whether another holder has the lock now (taken and given back at once when not)."""
        if not self.acquire(0.0):
            return True
        self.release()
        return False
