"""Politeness with an injected clock: requests spaced evenly per host, pauses after 429/503, a byte rate per run."""

from __future__ import annotations

import threading

from contentdownload.transfer.polite import ByteRate, HostPacer


class FakeClock:
    """A monotonic clock that moves only when someone sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.lock = threading.Lock()

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        with self.lock:
            self.now += max(0.0, seconds)


def _times(pacer: HostPacer, clock: FakeClock, host: str, n: int) -> list[float]:
    times = []
    for _ in range(n):
        pacer.wait_turn(host)
        times.append(clock.now)
    return times


def test_requests_to_a_host_are_spaced_evenly_no_burst():
    clock = FakeClock()
    pacer = HostPacer(rate=4.0, clock=clock.monotonic, sleep=clock.sleep)
    times = _times(pacer, clock, "a.example", 9)
    assert times == [i * 0.25 for i in range(9)]
    in_first_second = [t for t in times if t <= 1.0]
    assert len(in_first_second) == 5  # R + 1 in a closed one-second window, never more


def test_hosts_are_paced_independently_and_case_insensitively():
    clock = FakeClock()
    pacer = HostPacer(rate=2.0, clock=clock.monotonic, sleep=clock.sleep)
    pacer.wait_turn("A.example")
    pacer.wait_turn("b.example")  # another host: no wait
    assert clock.now == 0.0
    pacer.wait_turn("a.example")
    assert clock.now == 0.5


def test_a_pause_holds_every_request_to_that_host_only():
    clock = FakeClock()
    pacer = HostPacer(rate=None, clock=clock.monotonic, sleep=clock.sleep)
    pacer.pause("slow.example", 2.0)
    pacer.wait_turn("other.example")
    assert clock.now == 0.0
    pacer.wait_turn("slow.example")
    assert clock.now == 2.0
    pacer.pause("slow.example", 1.0)
    pacer.pause("slow.example", 0.5)  # a shorter pause does not cut a longer one
    pacer.wait_turn("slow.example")
    assert clock.now == 3.0
    assert pacer.throttled() == {"slow.example": {"responses": 3, "paused_s": 3.5}}


def test_without_rate_or_pause_nothing_waits():
    clock = FakeClock()
    pacer = HostPacer(rate=None, clock=clock.monotonic, sleep=clock.sleep)
    assert _times(pacer, clock, "h", 50) == [0.0] * 50
    assert pacer.throttled() == {}


def test_byte_rate_keeps_the_total_at_the_limit():
    clock = FakeClock()
    limit = ByteRate(1000.0, clock=clock.monotonic, sleep=clock.sleep)
    for _ in range(10):
        limit.consumed(500)
    assert clock.now == 5.0  # 5000 bytes at 1000 B/s
    clock.now = 100.0  # idle time earns one second at most: no more than a second's bytes burst after a pause
    limit.consumed(2000)
    assert clock.now == 101.0


def test_a_run_starts_without_credit():
    """Credit is earned by idling after bytes, never before the first: a run's start is no burst."""
    clock = FakeClock()
    clock.now = 1000.0
    limit = ByteRate(1000.0, clock=clock.monotonic, sleep=clock.sleep)
    limit.consumed(1000)
    assert clock.now == 1001.0


def test_rates_are_settings_of_the_config_env_and_library():
    import pytest

    from contentdownload import Downloader
    from contentdownload.errors import UsageError
    from contentdownload.machinery.config import EMPTY, resolve_settings

    settings, origin = resolve_settings(EMPTY, {"CONTENTDOWNLOAD_LIMIT_RATE": "2M", "CONTENTDOWNLOAD_HOST_RATE": "0.5"})
    assert settings.limit_rate == 2 << 20 and settings.host_rate == 0.5
    assert origin["limit_rate"] == "CONTENTDOWNLOAD_LIMIT_RATE"
    assert resolve_settings(EMPTY, {}, {"limit_rate": "500k"})[0].limit_rate == 500 << 10
    assert resolve_settings(EMPTY, {}, {"limit_rate": 1234})[0].limit_rate == 1234
    for bad in ({"host_rate": 0}, {"limit_rate": "fast"}, {"limit_rate": -1}):
        with pytest.raises(UsageError, match="must be"):
            Downloader(**bad)
