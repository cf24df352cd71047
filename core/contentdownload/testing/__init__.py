"""Test helpers shipped with the package, for the project's own tests and for plugin authors.

- :class:`LoopbackServer` and :class:`Fault` (``contentdownload.testing.server``): a real
  HTTP/1.1 server on loopback with validators, ranges, conditional requests, gzip,
  redirects and faults on demand, counting what went on the wire.
- ``contentdownload.testing.conformance``: the contract checks the built-in plugins pass,
  runnable against any plugin (``job_key`` checks in ``contentdownload.testing.jobkeys``;
  ``contentdownload.testing.probe`` sees what each ``stream_io`` call did).
- ``contentdownload.testing.pg``: a throwaway PostgreSQL from ``initdb``/``pg_ctl``.
- :func:`capture_events`: the structlog events logged inside a ``with`` block.
- :class:`ManualClock`: a clock for a job store that stands still until a test steps it.
"""

from __future__ import annotations

from typing import Any

from structlog.testing import capture_logs as capture_events

from contentdownload.clock import Clock

__all__ = ["LoopbackServer", "Fault", "capture_events", "ManualClock"]


class ManualClock(Clock):
    """A store clock that stands still until stepped: ``advance`` lets time pass (both clocks move),
    ``step_wall`` jumps the wall clock only (NTP, an administrator), ``reboot`` starts a new boot."""

    def __init__(self, *, wall: float = 1_800_000_000.0, steady: float = 1_000.0, boot: str | None = "boot-1"):
        self.wall_s, self.steady_s, self.boot = wall, steady, boot

    def wall(self) -> float:
        """The wall-clock reading, in seconds since the epoch."""
        return self.wall_s

    def steady(self) -> float:
        """The steady-clock reading of this boot, in seconds."""
        return self.steady_s

    def boot_id(self) -> str | None:
        """The identity of the current boot (``None``: the system has none)."""
        return self.boot

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass: both clocks move."""
        self.wall_s += seconds
        self.steady_s += seconds

    def step_wall(self, seconds: float) -> None:
        """Jump the wall clock only, by ``seconds`` (may be negative), as NTP or an administrator would."""
        self.wall_s += seconds

    def reboot(self, boot: str) -> None:
        """Start a new boot called ``boot``: its steady clock starts again near zero."""
        self.boot, self.steady_s = boot, 1.0


def __getattr__(name: str) -> Any:
    if name in ("LoopbackServer", "Fault"):
        from contentdownload.testing import server

        return getattr(server, name)
    raise AttributeError(name)
