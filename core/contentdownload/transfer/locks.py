"""The lock a worker holds on its part, the kernel's: released when its process dies, seen by every process.

- :class:`PartLock`: an exclusive ``flock`` on a file of its own. One ``open``
  (``O_NOFOLLOW``: a planted symlink is refused), one ``flock``, and a check that the file
  locked is still the one at the path (a holder removes its lock file when it is done, so
  a waiter may have locked a file no longer there: it tries again).
- :class:`ByteLock`: one byte of a lock file shared by every job of a staging folder, with
  an open file description lock (Linux's ``F_OFD_SETLK``): no file is created or removed
  per job (creating a file is among the dearest calls of a file system), and two opens in
  one process conflict as two processes do. The byte is the name's hash, 63 bits: two
  names sharing one would only make one of them wait, or be taken for alive.

:func:`epoch_lock` is the lock of a job's epoch: a :class:`ByteLock` where the platform has
open file description locks, else a :class:`PartLock`.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import struct
import time
from pathlib import Path

from contentdownload.errors import UnsafePathError

#: Seconds between tries while waiting for a lock another process holds.
POLL_S = 0.05
#: The staging folder's shared lock file of :class:`ByteLock` (no job's name ends so).
BYTE_LOCKS = "epochs.locks"
_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", None)


class _Lock:
    """``acquire(timeout)`` by tries of ``_try`` (``True``: locked, ``False``: held elsewhere, ``None``: try again at once)."""

    fd: int | None = None

    def _try(self) -> bool | None:
        raise NotImplementedError

    def acquire(self, timeout: float = 0.0) -> bool:
        """Take the lock, waiting up to ``timeout`` seconds; ``False`` when another holder kept it that long."""
        deadline = time.monotonic() + timeout
        while True:
            got = self._try()
            if got:
                return True
            if got is None:
                continue
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_S)


class PartLock(_Lock):
    """An exclusive lock on ``path``; ``acquire(timeout)`` (``False`` when another holder kept it), ``release``."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def _try(self) -> bool | None:
        """``True``: locked; ``False``: another holder has it; ``None``: the file was removed meanwhile (by its holder)."""
        fd = _open_lock_file(self.path)
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


class ByteLock(_Lock):
    """An exclusive lock on the byte of ``name`` in the shared lock file ``table`` (see the module); as :class:`PartLock`."""

    def __init__(self, table: Path, name: str):
        self.table = table
        self.offset = int.from_bytes(hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "big") >> 1
        self.fd: int | None = None

    def _try(self) -> bool:
        fd = _open_lock_file(self.table)
        try:
            fcntl.fcntl(fd, _OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, self.offset, 1, 0))
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        self.fd = fd
        return True

    def release(self, *, remove: bool = False) -> None:
        """Release the lock (the shared file stays: ``remove`` is for :class:`PartLock`'s signature)."""
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


def epoch_lock(staging: Path, name: str) -> PartLock | ByteLock:
    """The lock of ``name`` (a job's epoch) in ``staging``: a byte of the shared lock file, or a lock file of its own."""
    if _OFD_SETLK is None:
        return PartLock(staging / f"{name}.lock")
    return ByteLock(staging / BYTE_LOCKS, name)


def _open_lock_file(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePathError(f"refusing to lock through a symlink at {path}", "part_path_is_symlink") from None
        raise
