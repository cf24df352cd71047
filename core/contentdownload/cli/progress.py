"""Progress for long runs: live tqdm lines on a terminal, plain periodic lines otherwise.

On a terminal the first line shows files done / total, bytes, rate, ETA and failures; below
it, one line per active large file (as many as the terminal's height allows) with its
bytes and percentage. Both are redrawn twice a second from the bytes as they arrive
(the pipeline's per-chunk callback), not only when a file completes. The byte count is the
sum of the body bytes received, the same sum as the summary's ``bytes_downloaded``.
Elsewhere (a pipe, a log file) one ``progress:`` line is printed every
:data:`PLAIN_INTERVAL_S` seconds.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import attrs

from contentdownload.hooks.model import JobResult

if TYPE_CHECKING:  # pragma: no cover
    from contentdownload.records.tally import Tally

PLAIN_INTERVAL_S = 10.0
REDRAW_S = 0.5
#: A file gets a line of its own once it is known (or seen) to be at least this large.
LARGE_FILE = 1 << 20
#: Rate smoothing: the weight of the newest rate sample.
SMOOTHING = 0.3


def human_bytes(n: float) -> str:
    """A byte count for people, as tqdm's live lines write it: ``512B``, ``1.50MB`` (powers of 1000).

    Written out rather than taken from tqdm so that a run's summary line does not import tqdm,
    which only a terminal's live lines need.
    """
    for unit in ("", "k", "M", "G", "T", "P", "E", "Z"):
        if abs(n) < 999.5:
            digits = 2 if abs(n) < 9.995 else 1 if abs(n) < 99.95 else 0
            return f"{n:.{digits}f}{unit}B"
        n /= 1000
    return f"{n:.1f}YB"


def human_seconds(seconds: float | None) -> str:
    """``1:05:09``, ``4:07``, or ``?`` when not known."""
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02}:{secs:02}" if hours else f"{minutes}:{secs:02}"


@attrs.define
class _Active:
    """One transfer under way: bytes of the file so far (resumed bytes included) and its expected size."""

    name: str
    got: int = 0
    size: int | None = None
    slot: Any = None  # the tqdm line showing it, when it has one


class JobProgress:
    """The byte sink of one job: ``progress(n)`` per block, ``expect(size, start)`` per response."""

    def __init__(self, owner: "Progress", key: str, active: _Active):
        self.owner, self.key, self.active = owner, key, active

    def __call__(self, n: int) -> None:
        self.owner.add_bytes(self.active, n)

    def expect(self, size: int | None, start: int = 0) -> None:
        self.owner.expect(self.active, size, start)


class Progress:
    """Files done / total, bytes, rate, ETA, failures, and the active large files. Thread-safe; a no-op when disabled."""

    def __init__(self, total: int, enabled: bool = True, stream: Any = None, slots: int = 4):
        self.total, self.enabled = total, enabled
        self.stream = stream or sys.stderr
        self._lock = threading.Lock()
        self.files = self.failed = self.nbytes = self.done_bytes = 0
        self._active: dict[str, _Active] = {}
        self._started = self._last_plain = time.monotonic()
        self._rate, self._sampled = 0.0, (self._started, 0)
        self._stop = threading.Event()
        self._bar, self._slots = None, []
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            self._open_bars(slots)
        self._painter = threading.Thread(target=self._paint_loop, name="contentdownload-progress", daemon=True) if enabled else None
        if self._painter is not None:
            self._painter.start()

    # -- what the run reports ------------------------------------------------------------

    def job(self, key: str, name: str, size: int | None = None) -> JobProgress:
        """A job starts streaming: its byte sink (the pipeline's ``progress`` and ``expect``)."""
        with self._lock:
            active = self._active[key] = _Active(name=name, size=size)
        return JobProgress(self, key, active)

    def add_bytes(self, active: _Active, n: int) -> None:
        with self._lock:
            self.nbytes += n
            active.got += n

    def done_tally(self, tally: Tally) -> None:
        """Jobs a worker process ended (and the bytes it streamed), counted when its tally reaches the parent."""
        with self._lock:
            self.files += tally.jobs
            self.failed += tally.failed
            self.done_bytes += tally.sizes
            self.nbytes += tally.bytes_downloaded

    def expect(self, active: _Active, size: int | None, start: int) -> None:
        with self._lock:
            active.got, active.size = start, size if size is not None else active.size

    def done(self, result: JobResult) -> None:
        with self._lock:
            self.files += 1
            self.failed += result.outcome == "failed"
            self.done_bytes += result.size or 0
            active = self._active.pop(result.job_key or "", None)
            if active is not None and active.slot is not None:
                self._free(active.slot)

    def done_counts(self, files: int, failed: int, nbytes: int) -> None:
        """Jobs ended before any was shown (planning settled them): ``files`` of them, ``failed``, their sizes."""
        with self._lock:
            self.files += files
            self.failed += failed
            self.done_bytes += nbytes

    def close(self) -> None:
        """Stop redrawing; the first line stays on screen with the final totals."""
        if self._painter is not None:
            self._stop.set()
            self._painter.join()
        if self._bar is not None:
            with self._lock:
                self._paint()
            for slot in self._slots:
                slot.close()
            self._bar.close()

    # -- numbers -----------------------------------------------------------------------

    def _sample_rate(self, now: float) -> float:
        """Bytes per second, smoothed over the last samples (lock held)."""
        then, before = self._sampled
        if now - then >= REDRAW_S / 2:
            fresh = (self.nbytes - before) / (now - then)
            self._rate = fresh if not self._rate else SMOOTHING * fresh + (1 - SMOOTHING) * self._rate
            self._sampled = (now, self.nbytes)
        return self._rate

    def _eta(self, rate: float) -> float | None:
        """Seconds left: the active files' known remainders, and the files not started at the mean known size."""
        sized = [a for a in self._active.values() if a.size is not None]
        known_files = (self.files - self.failed) + len(sized)
        if rate <= 0 or known_files == 0:
            return None
        mean = (self.done_bytes + sum(a.size for a in sized)) / known_files
        waiting = max(0, self.total - self.files - len(self._active)) + len(self._active) - len(sized)
        return (sum(max(0, a.size - a.got) for a in sized) + waiting * mean) / rate

    def line(self) -> str:
        """The first line: ``3/10 files, 45.2 MB at 12.0 MB/s, ETA 0:12, 0 failed`` (call with the lock held)."""
        rate = self._sample_rate(time.monotonic())
        return (f"{self.files}/{self.total} files, {human_bytes(self.nbytes)} at {human_bytes(rate)}/s, "
                f"ETA {human_seconds(self._eta(rate))}, {self.failed} failed")

    # -- drawing -------------------------------------------------------------------------

    def _open_bars(self, slots: int) -> None:
        from tqdm import tqdm

        try:
            rows = os.get_terminal_size(self.stream.fileno()).lines
        except (OSError, ValueError, AttributeError):
            rows = 0
        fmt = "{desc} {bar:20} {percentage:3.0f}%"
        self._bar = tqdm(total=max(1, self.total), file=self.stream, bar_format=fmt, dynamic_ncols=True, position=0, leave=True)
        self._slots = [tqdm(total=1, file=self.stream, bar_format="  {desc}", dynamic_ncols=True, position=i + 1, leave=False)
                       for i in range(max(0, min(slots, rows - 3)))]
        self._free_slots = list(self._slots)

    def _free(self, slot: Any) -> None:
        slot.set_description_str("", refresh=False)
        self._free_slots.append(slot)

    def _paint_loop(self) -> None:
        while not self._stop.wait(REDRAW_S):
            with self._lock:
                if self._bar is not None:
                    self._paint()
                elif time.monotonic() - self._last_plain >= PLAIN_INTERVAL_S:
                    self._last_plain = time.monotonic()
                    print(f"progress: {self.line()}", file=self.stream, flush=True)

    def _paint(self) -> None:
        """Redraw the first line and the lines of the active large files (lock held)."""
        bar = self._bar
        bar.n = min(self.files, bar.total)
        bar.set_description_str(self.line(), refresh=False)
        bar.refresh()
        for active in self._active.values():
            if active.slot is None and self._free_slots and max(active.got, active.size or 0) >= LARGE_FILE:
                active.slot = self._free_slots.pop(0)
            if active.slot is not None:
                active.slot.set_description_str(self._file_line(active), refresh=False)
        for slot in self._slots:
            slot.refresh()

    @staticmethod
    def _file_line(active: _Active) -> str:
        size = f" of {human_bytes(active.size)} ({100 * active.got / active.size:.0f}%)" if active.size else ""
        return f"{active.name}: {human_bytes(active.got)}{size}"
