"""Slow servers: the low-speed limit and the attempt's time limit, over real sockets and through the CLI.

The limits' arithmetic is checked with an injected clock; the reads are checked against the
loopback server's ``drip`` (a steady trickle) and ``stall`` faults; the end-to-end test
stops a dripping transfer as ``too_slow`` with the part kept, then resumes it with a Range.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from contentdownload import Downloader
from contentdownload.errors import TooSlowError, UsageError
from contentdownload.testing.server import Fault
from contentdownload.transfer.body import BodyReader, SpeedGuard
from contentdownload.transfer.http import request_failure

REPO = Path(__file__).resolve().parents[1]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# -- the limits -------------------------------------------------------------------------


def test_under_the_limit_for_the_whole_window_is_too_slow():
    clock = FakeClock()
    guard = SpeedGuard(low_speed_limit=1000, low_speed_time=10, clock=clock)
    for second in range(1, 10):
        clock.now = second
        guard.received(500)  # 500 B/s: not yet a whole window
    clock.now = 10
    with pytest.raises(TooSlowError) as info:
        guard.received(500)
    assert info.value.reason == "too_slow" and request_failure(info.value) == ("retry", "too_slow")


def test_at_the_limit_a_transfer_goes_on_for_ever():
    clock = FakeClock()
    guard = SpeedGuard(low_speed_limit=1000, low_speed_time=10, clock=clock)
    for second in range(1, 200):
        clock.now = second
        guard.received(1000)
    assert 0 < guard.remaining() <= 10


def test_silence_after_a_burst_is_caught_at_the_deadline():
    clock = FakeClock()
    guard = SpeedGuard(low_speed_limit=1000, low_speed_time=10, clock=clock)
    clock.now = 1
    guard.received(50_000)  # a full window's worth: the window restarts now
    clock.now = 5
    assert guard.remaining() == pytest.approx(6.0)
    assert guard.timeout(60.0) == pytest.approx(6.0) and guard.timeout(2.0) == 2.0
    clock.now = 10.9
    guard.check()
    clock.now = 11
    with pytest.raises(TooSlowError):
        guard.check()


def test_max_time_ends_even_a_fast_attempt_and_caps_the_request():
    clock = FakeClock()
    guard = SpeedGuard(low_speed_limit=0, max_time=30, clock=clock)
    clock.now = 20
    guard.received(10 << 20)
    assert guard.timeout(60.0, body=False) == pytest.approx(10.0)
    clock.now = 30
    with pytest.raises(TooSlowError) as info:
        guard.received(10 << 20)
    assert info.value.reason == "max_time" and request_failure(info.value) == ("retry", "max_time")


def test_no_limits_means_no_deadline():
    clock = FakeClock()
    guard = SpeedGuard(low_speed_limit=0, max_time=None, clock=clock)
    clock.now = 1e9
    guard.check()
    assert guard.remaining() is None and guard.timeout(60.0) == 60.0 and guard.timeout(None) is None


# -- reads over a real socket -------------------------------------------------------------


def _read_all(reader: BodyReader, sizes: list[int]) -> None:
    buffer = memoryview(bytearray(1 << 20))
    while n := reader.readinto(buffer):
        sizes.append(n)


def test_a_drip_is_read_as_it_arrives_and_stopped_as_too_slow(server):
    server.add_file("/drip.bin", os.urandom(3000))
    server.add_fault("/drip.bin", Fault.drip(200))  # 20 bytes every 0.1 s
    ticks = itertools.count(0.0, 1.0)  # every look at the clock is a second later
    guard = SpeedGuard(low_speed_limit=1000, low_speed_time=5, clock=lambda: next(ticks))
    sizes: list[int] = []
    with requests.get(server.url("/drip.bin"), stream=True, timeout=(5, 30)) as response:
        with pytest.raises(TooSlowError) as info:
            _read_all(BodyReader(response, guard=guard, read_timeout=30), sizes)
    assert info.value.reason == "too_slow"
    assert sizes and sum(sizes) < 3000  # the trickle was seen piece by piece, not waited for


def test_a_stalled_body_ends_at_the_low_speed_deadline_not_at_the_read_timeout(server):
    data = os.urandom(50_000)
    server.add_file("/stall.bin", data)
    server.add_fault("/stall.bin", Fault.stall(30.0, after=10_000))
    guard = SpeedGuard(low_speed_limit=100_000, low_speed_time=0.5)
    sizes: list[int] = []
    with requests.get(server.url("/stall.bin"), stream=True, timeout=(5, 30)) as response:
        with pytest.raises(TooSlowError):
            _read_all(BodyReader(response, guard=guard, read_timeout=30), sizes)
    assert sum(sizes) == 10_000  # every byte received was handed over before the error


def test_a_plain_body_is_read_in_whole_blocks_and_the_connection_is_reused(server):
    data = os.urandom((3 << 20) + 123)
    server.add_file("/big.bin", data)
    url = server.url("/big.bin")
    with requests.Session() as session:
        for _ in range(2):
            with session.get(url, stream=True, timeout=(5, 30)) as response:
                reader = BodyReader(response, guard=SpeedGuard(), read_timeout=30)
                assert reader.direct is not None  # straight into the buffer, no urllib3 copy
                buffer, got, sizes = memoryview(bytearray(1 << 20)), bytearray(), []
                while n := reader.readinto(buffer):
                    sizes.append(n)
                    got += buffer[:n]
            assert bytes(got) == data
            assert response.raw.tell() == len(data)
        manager = session.get_adapter(url).poolmanager
        [pool] = [manager.pools[key] for key in manager.pools.keys()]
        assert pool.num_connections == 1 and pool.num_requests == 2  # the connection went back to the pool
    assert max(sizes) == 1 << 20


def test_a_short_plain_body_is_a_lost_connection(server):
    server.add_file("/short.bin", os.urandom(200_000))
    server.add_fault("/short.bin", Fault.short_body(1000))
    with requests.get(server.url("/short.bin"), stream=True, timeout=(5, 30)) as response:
        with pytest.raises(Exception) as info:
            _read_all(BodyReader(response, guard=SpeedGuard(), read_timeout=30), [])
    assert request_failure(info.value)[1] == "connection_lost"


# -- options ------------------------------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    ({"low_speed_limit": -1}, "low_speed_limit must be 0 or more"),
    ({"low_speed_time": 0}, "low_speed_time must be greater than 0"),
    ({"max_time": "soon"}, "max_time must be"),
])
def test_downloader_checks_the_speed_options(options, message):
    with pytest.raises(UsageError, match=message):
        Downloader(**options)


def _cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("DOCSTOKG_", "CONTENTDOWNLOAD_"))}
    environ.update(PYTHONPATH=f"{REPO / 'core'}:{REPO / 'plugins'}", **(env or {}))
    return subprocess.run([sys.executable, "-m", "contentdownload", *args], env=environ, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, env, needle", [
    (["--low-speed-limit", "-5"], {}, "--low-speed-limit must be 0 or more"),
    (["--max-time", "0"], {}, "--max-time must be greater than 0"),
    ([], {"CONTENTDOWNLOAD_LOW_SPEED_TIME": "abc"}, "CONTENTDOWNLOAD_LOW_SPEED_TIME must be"),
])
def test_bad_speed_options_are_one_line_and_exit_2(tmp_path, args, env, needle):
    proc = _cli("run", "http://127.0.0.1:9/x", "--out", str(tmp_path / "out"), *args, env=env, cwd=tmp_path)
    assert proc.returncode == 2 and needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_the_speed_options_come_from_the_config_file_and_the_environment(tmp_path):
    (tmp_path / "contentdownload.toml").write_text("[run]\nlow_speed_limit = 5000\nmax_time = 600\n")
    proc = _cli("config", "--json", env={"CONTENTDOWNLOAD_MAX_TIME": "900"}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    settings = json.loads(proc.stdout)["settings"]
    assert settings["low_speed_limit"]["value"] == 5000 and "contentdownload.toml" in settings["low_speed_limit"]["source"]
    assert settings["max_time"] == {"value": 900.0, "source": "CONTENTDOWNLOAD_MAX_TIME"}
    assert settings["low_speed_time"] == {"value": 60.0, "source": "default"}


# -- end to end ---------------------------------------------------------------------------


def test_a_dripping_server_ends_as_too_slow_and_the_rerun_resumes(server, tmp_path):
    data = os.urandom(400_000)
    server.add_file("/drip.bin", data)
    server.add_fault("/drip.bin", Fault.drip(200, after=200_000))
    jobs = tmp_path / "jobs.txt"
    jobs.write_text(server.url("/drip.bin") + "\n")
    out = tmp_path / "out"
    first = _cli("run", str(jobs), "--out", str(out), "--no-progress", "--retries", "0",
                 "--low-speed-limit", "1000", "--low-speed-time", "2", cwd=tmp_path)
    assert first.returncode == 1 and "Traceback" not in first.stderr, first.stderr
    [row] = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert row["outcome"] == "failed" and row["reason"] == "too_slow"
    parts = list((out / ".contentdownload" / "staging").glob("*.part"))
    assert parts and parts[0].stat().st_size >= 200_000, "the part is kept"

    second = _cli("run", str(jobs), "--out", str(out), "--no-progress", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert rows[-1]["outcome"] == "resumed" and rows[-1]["resumed_from"] >= 200_000
    stats = server.stats("/drip.bin")
    assert stats.ranges[-1] is not None and stats.statuses[-1] == 206  # a Range request, not a refetch from 0
    assert hashlib.sha256((out / "drip.bin").read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()


def test_max_time_ends_an_attempt_through_the_library(server, tmp_path):
    server.add_file("/long.bin", os.urandom(100_000))
    server.add_fault("/long.bin", Fault.drip(5000, after=1000))
    with Downloader(max_time=1.0, low_speed_limit=0, retries=0) as downloader:
        result = downloader.download(server.url("/long.bin"), tmp_path / "out")
    assert result.outcome == "failed" and result.reason == "max_time"
    assert list((tmp_path / "out" / ".contentdownload" / "staging").glob("*.part")), "the part is kept"


def test_max_time_also_bounds_the_wait_for_the_headers(server, tmp_path):
    server.add_file("/late.bin", os.urandom(1000))
    server.add_fault("/late.bin", Fault.delay(30.0))
    with Downloader(max_time=0.5, retries=0) as downloader:
        result = downloader.download(server.url("/late.bin"), tmp_path / "out")
    assert result.outcome == "failed" and result.reason == "max_time"


def test_body_bytes_that_came_with_the_headers_are_handed_over_before_a_stall():
    """nginx under ``limit_rate`` sends the headers and the first body bytes in one segment, then waits."""
    import socket
    import threading

    body = os.urandom(4096)
    release = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + body)  # one write: one segment
            release.wait(30)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    guard = SpeedGuard(low_speed_limit=100_000, low_speed_time=0.5)
    sizes: list[int] = []
    try:
        with requests.get(f"http://127.0.0.1:{listener.getsockname()[1]}/x", stream=True, timeout=(5, 30)) as response:
            with pytest.raises(TooSlowError):
                _read_all(BodyReader(response, guard=guard, read_timeout=30), sizes)
    finally:
        release.set()
        thread.join()
        listener.close()
    assert sum(sizes) == 4096  # the bytes buffered with the headers reach the part, not lost with the error
