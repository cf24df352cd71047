"""Progress for long runs: a tqdm bar on a terminal, plain periodic lines otherwise."""

from __future__ import annotations

import sys
import threading
import time
from typing import Iterable

from contentdownload.hooks.model import JobResult

PLAIN_INTERVAL_S = 10.0


def human_bytes(n: float) -> str:
    """A byte count for people, as tqdm writes it: ``512B``, ``1.50MB`` (powers of 1000)."""
    from tqdm import tqdm

    return tqdm.format_sizeof(n, "B", 1000)


class Progress:
    """Files done / total, bytes, rate, failures, ETA. Thread-safe; a no-op when disabled."""

    def __init__(self, total: int, enabled: bool = True, stream=None):
        self.total = total
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self._lock = threading.Lock()
        self.files = 0
        self.failed = 0
        self.nbytes = 0
        self._started = time.monotonic()
        self._last_line = self._started
        self._bar = None
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="file", file=self.stream, dynamic_ncols=True, smoothing=0.1)

    def bytes(self, n: int) -> None:
        with self._lock:
            self.nbytes += n
        self._tick()

    def done(self, result: JobResult) -> None:
        with self._lock:
            self.files += 1
            self.failed += result.outcome == "failed"
        if self._bar is not None:
            self._bar.update(1)
        self._tick()

    def done_many(self, results: Iterable[JobResult], bad: int = 0) -> None:
        for result in results:
            self.done(result)
        for _ in range(bad):
            with self._lock:
                self.files += 1
                self.failed += 1
            if self._bar is not None:
                self._bar.update(1)

    def _summary(self) -> str:
        elapsed = max(time.monotonic() - self._started, 1e-9)
        rate = self.nbytes / elapsed
        return f"{self.files}/{self.total} files, {human_bytes(self.nbytes)}, {human_bytes(rate)}/s, {self.failed} failed"

    def _tick(self) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self._bar is not None:
            if now - self._last_line >= 0.5:
                self._last_line = now
                with self._lock:
                    self._bar.set_postfix_str(f"{human_bytes(self.nbytes)}, {human_bytes(self.nbytes / max(now - self._started, 1e-9))}/s, {self.failed} failed", refresh=False)
            return
        if now - self._last_line >= PLAIN_INTERVAL_S:
            self._last_line = now
            with self._lock:
                line = self._summary()
            print(f"progress: {line}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
