"""Worker processes of a run: forked after planning, every one claiming from the shared job store.

A run on a persistent store (SQLite or PostgreSQL, with leases) can spread its jobs over
several processes (``--processes N``; by default one per core, each with at least
:data:`PROCESS_MIN_JOBS` planned jobs). The parent plans, forks the others, and works
too; each child opens its own store connection, HTTP client and manifest writer, claims
jobs with its own lease owner, and sends what it did back through a pipe: its job results
(in batches while it runs, so the progress bar and the summary count them), then its hook
counters and decision-log count. The parent writes the one metrics file and prints the
one summary over all of them.

Signals: the parent forwards SIGINT and SIGTERM to its children, which stop claiming,
keep their parts, release their leases and report; a child dies with its parent
(``PR_SET_PDEATHSIG``), so a ``kill -9`` of the parent or a second Ctrl-C stops them all.
A child that dies without reporting leaves its leases to expire (or to be released by the
next run, which sees its pid gone); its jobs count as left unless the store says they finished.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import struct
import sys
import threading
from typing import Any, Callable, Iterator

from contentdownload.records.log import get_logger, log_traceback

log = get_logger(__name__)

#: The fewest planned jobs that make an extra process worth its start, when ``--processes`` is not given.
PROCESS_MIN_JOBS = 256

_HEADER = struct.Struct("!I")
_PR_SET_PDEATHSIG = 1


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover (not Linux)
        return os.cpu_count() or 1


def process_count(setting: int | None, jobs: int, *, shared_store: bool) -> int:
    """How many processes work on ``jobs`` planned jobs: ``setting``, else one per core with enough jobs each."""
    if not shared_store or jobs < 2 or not hasattr(os, "fork"):
        return 1
    if setting is None:
        return max(1, min(cores(), jobs // PROCESS_MIN_JOBS))
    return max(1, min(setting, jobs))


class Channel:
    """The child's end of its pipe: length-prefixed pickles, each written whole."""

    def __init__(self, fd: int):
        self.fd = fd
        self._lock = threading.Lock()

    def send(self, message: Any) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        view = memoryview(_HEADER.pack(len(data)) + data)
        with self._lock:
            while view:
                view = view[os.write(self.fd, view):]


def _messages(fd: int) -> Iterator[Any]:
    """The messages a child sent, until its end of the pipe closes."""
    with os.fdopen(fd, "rb") as pipe:
        while header := pipe.read(_HEADER.size):
            if len(header) < _HEADER.size:
                return
            (length,) = _HEADER.unpack(header)
            data = pipe.read(length)
            if len(data) < length:
                return
            yield pickle.loads(data)


def _die_with_parent(parent: int) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # pragma: no cover (not Linux)
        pass
    if os.getppid() != parent:  # the parent died before the prctl
        os._exit(1)


class Children:
    """The forked processes of one run, seen from the parent."""

    def __init__(self) -> None:
        self.pids: list[int] = []
        self._readers: list[threading.Thread] = []

    def fork(self, count: int, body: Callable[[Channel], None], on_message: Callable[[Any], None]) -> None:
        """Start ``count`` children running ``body(channel)``; ``on_message`` gets what each sends (in a thread per child)."""
        parent = os.getpid()
        for index in range(count):
            read, write = os.pipe()
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # the child: never returns
                os.close(read)
                self._child(parent, Channel(write), body)
            os.close(write)
            self.pids.append(pid)
            reader = threading.Thread(target=self._read, args=(pid, read, on_message), name=f"process-{index + 1}", daemon=True)
            reader.start()
            self._readers.append(reader)

    @staticmethod
    def _child(parent: int, channel: Channel, body: Callable[[Channel], None]) -> None:
        code = 0
        try:
            _die_with_parent(parent)
            body(channel)
        except BaseException as exc:  # noqa: BLE001 (the parent reports it; a child must never run the parent's code)
            code = 1
            try:
                channel.send(("crashed", os.getpid(), f"{type(exc).__name__}: {exc}"))
            except OSError:
                pass
        finally:
            os._exit(code)

    def _read(self, pid: int, fd: int, on_message: Callable[[Any], None]) -> None:
        ended = False
        for message in _messages(fd):
            ended = ended or message[0] in ("done", "crashed")
            try:
                on_message(message)
            except Exception as exc:  # noqa: BLE001 (the pipe is drained whatever one message does; the child's exit is still awaited)
                log_traceback("a worker process's message could not be taken", exc)
        _, status = os.waitpid(pid, 0)
        if not ended:
            log.error("a worker process ended without reporting; its leases expire on their own", pid=pid,
                      exit_code=os.waitstatus_to_exitcode(status))

    def signal(self, signum: int) -> None:
        """Forward ``signum`` to every child still running."""
        for pid in self.pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def wait(self, tick: Callable[[], None] = lambda: None) -> None:
        """Until every child has reported and exited, calling ``tick`` now and then."""
        for reader in self._readers:
            while reader.is_alive():
                reader.join(timeout=0.2)
                tick()
