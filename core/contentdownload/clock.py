"""This machine's clocks: the wall clock, a clock that is never stepped, and the boot it counts from.

The wall clock can jump (NTP, an administrator, a virtual machine resumed): measuring a
lease with it would expire every lease at once after a step forward. The steady clock
(``CLOCK_BOOTTIME`` on Linux: seconds since boot, counting suspend, the same for every
process of the machine) never jumps, but its readings mean something only within one
boot, so every reading that is stored goes with this boot's identity.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
#: system-wide and never stepped; ``CLOCK_MONOTONIC`` where there is no ``CLOCK_BOOTTIME``
STEADY_CLOCK = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


@functools.lru_cache(maxsize=1)
def boot_id() -> str | None:
    """This boot's identity (Linux; ``None`` elsewhere). A process lives within one boot, so it is read once."""
    try:
        return BOOT_ID_PATH.read_text(encoding="ascii").strip() or None
    except OSError:
        return None


class Clock:
    """The clocks a job store reads. Tests pass a :class:`contentdownload.testing.ManualClock` they step."""

    def wall(self) -> float:
        """Unix seconds (may jump)."""
        return time.time()

    def steady(self) -> float:
        """Seconds on a clock that is never stepped, comparable between processes of one boot."""
        return time.clock_gettime(STEADY_CLOCK)

    def boot_id(self) -> str | None:
        """The boot :meth:`steady` counts from; ``None`` when unknown (then stored steady readings mean nothing)."""
        return boot_id()


SYSTEM_CLOCK = Clock()
