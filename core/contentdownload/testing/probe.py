"""What a ``stream_io`` did, seen from outside: a hook wrapper and a counting lease for the conformance checks.

:class:`StreamProbe` is a plugin whose only implementation is a ``stream_io`` wrapper
(``@hookimpl(wrapper=True)``), so it runs around every ``stream_io`` call, whichever plugin
answers, and is never asked to answer itself. For each call it records a
:class:`StreamCall`: the context the plugin got, its result, the bytes it reported through
``ctx.effects.wrote()``, the lease heartbeats during the call, and the files of a folder
before and after. :class:`CountingLease` is a lease that counts its heartbeats.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Iterator

import attrs

from contentdownload.hooks.model import Lease, StreamContext, StreamResult
from contentdownload.hooks.specs import hookimpl

__all__ = ["CountingLease", "FileState", "StreamCall", "StreamProbe", "snapshot"]


class CountingLease(Lease):
    """A lease that is always held and counts :meth:`heartbeat` calls (``beats``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.beats = 0

    def heartbeat(self) -> None:
        """Count one heartbeat."""
        with self._lock:
            self.beats += 1


@attrs.frozen
class FileState:
    """A file's ``size``, ``mtime_ns`` and inode (``ino``) when a snapshot was taken."""

    size: int
    mtime_ns: int
    ino: int


def snapshot(root: Path) -> dict[Path, FileState]:
    """Every file below ``root`` (symbolic links not followed) and its state."""
    files: dict[Path, FileState] = {}
    for folder, _dirs, names in os.walk(root):
        for name in names:
            path = Path(folder, name)
            try:
                st = path.lstat()
            except FileNotFoundError:  # removed while walking
                continue
            files[path] = FileState(st.st_size, st.st_mtime_ns, st.st_ino)
    return files


@attrs.frozen
class StreamCall:
    """One ``stream_io`` call as the probe saw it.

    ``ctx`` is the context the plugin got and ``result`` what it returned (``None`` when
    it raised or declined). ``reported`` is ``ctx.effects.bytes_written`` afterwards,
    ``beats`` the heartbeats of a :class:`CountingLease` during the call. ``before`` and
    ``after`` are :func:`snapshot` s of the probe's folder.
    """

    ctx: StreamContext
    result: StreamResult | None
    reported: int
    beats: int
    before: dict[Path, FileState]
    after: dict[Path, FileState]

    def part_growth(self) -> int:
        """Bytes the part gained in the call (all of it when it was created or replaced)."""
        part = self.ctx.paths.part
        old, new = self.before.get(part), self.after.get(part)
        if new is None:
            return 0
        if old is None or old.ino != new.ino or new.size < old.size:
            return new.size
        return new.size - old.size

    def changed_outside(self, allowed: set[Path]) -> list[Path]:
        """Files created, changed or removed in the call, other than ``allowed``."""
        paths = set(self.before) | set(self.after)
        return sorted(p for p in paths if p not in allowed and self.before.get(p) != self.after.get(p))


def _beats(lease: Any) -> int:
    return lease.beats if isinstance(lease, CountingLease) else 0


class StreamProbe:
    """Records a :class:`StreamCall` for every ``stream_io`` call; register it as a plugin (any name)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.calls: list[StreamCall] = []

    @hookimpl(wrapper=True)
    def stream_io(self, ctx: StreamContext) -> Iterator[None]:
        """Snapshot the folder and the lease around the answering plugin's call."""
        before, beats = snapshot(self.root), _beats(ctx.lease)
        result = None
        try:
            result = yield
            return result
        finally:
            self.calls.append(StreamCall(ctx=ctx, result=result, reported=ctx.effects.bytes_written,
                                         beats=_beats(ctx.lease) - beats, before=before, after=snapshot(self.root)))
