"""Politeness seen on the wire by the loopback server: --host-rate, --limit-rate, and every worker pausing after a 429."""

from __future__ import annotations

import json
import threading
import time

from contentdownload.testing.server import Fault
from helpers import run_cli

PDF = b"%PDF-1.4 " + bytes(range(256)) * 8


def _most_in_one_second(times: list[float]) -> int:
    times = sorted(times)
    return max(sum(1 for t in times if start <= t <= start + 1.0) for start in times)


def test_host_rate_spaces_requests_evenly_on_the_wire(server, tmp_path):
    urls = [server.add_file(f"/r{i:02}.pdf", PDF + bytes([i])) for i in range(14)]
    proc = run_cli("run", *urls, "-P", str(tmp_path / "out"), "--workers", "4", "--host-rate", "4", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    times = [r.time for r in server.requests]
    assert len(times) == 14
    assert _most_in_one_second(times) <= 5  # R + 1 in any one second: no burst
    assert max(times) - min(times) >= 13 / 4 * 0.95  # and spread over the run, not bunched at its end


class ByteSampler(threading.Thread):
    """Samples the server's count of body bytes handed to the connection, with the time."""

    def __init__(self, server, paths):
        super().__init__(daemon=True)
        self.server, self.paths = server, paths
        self.samples: list[tuple[float, int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.02):
            self.samples.append((time.monotonic(), sum(self.server.stats(p).body_bytes for p in self.paths)))

    def first_at(self, nbytes: int) -> tuple[float, int]:
        """The first sample at or past ``nbytes``: its time and count."""
        return next((t, n) for t, n in self.samples if n >= nbytes)


def test_limit_rate_holds_the_total_of_all_workers_within_ten_percent(server, tmp_path):
    size, limit = 24 << 20, 6 << 20  # two files of 24 MiB at 6 MiB/s in all: about 8 s, so the socket buffers (some MiB) are a small share
    paths = ["/big1.bin", "/big2.bin"]
    urls = [server.add_large_file(p, size, seed=i)[0] for i, p in enumerate(paths)]
    server.throttle(1 << 30)  # far above the limit: only so the server counts its bytes in blocks of 64 KiB
    sampler = ByteSampler(server, paths)
    sampler.start()
    try:
        proc = run_cli("run", *urls, "-P", str(tmp_path / "out"), "--workers", "2", "--limit-rate", "6M",
                       "--accept-any-content", "--no-progress")
    finally:
        sampler.stop.set()
        sampler.join()
    assert proc.returncode == 0, proc.stderr
    # Loopback socket buffers take some MiB per connection at once, then the server sends only as the
    # client reads: the slope from 45% to 95% of the bytes is the rate on the wire.
    (t1, n1), (t2, n2) = sampler.first_at(int(2 * size * 0.45)), sampler.first_at(int(2 * size * 0.95))
    rate = (n2 - n1) / (t2 - t1)
    assert abs(rate - limit) <= 0.1 * limit, f"{rate / (1 << 20):.2f} MiB/s on the wire for a limit of 6 MiB/s"


def test_one_429_with_retry_after_pauses_every_worker_on_that_host(server, tmp_path):
    urls = [server.add_file(f"/p{i:02}.pdf", PDF + bytes([i])) for i in range(40)]
    server.add_fault("/p08.pdf", Fault.status(429, retry_after=2))
    proc = run_cli("run", *urls, "-P", str(tmp_path / "out"), "--workers", "4", "--no-progress", "--json")
    assert proc.returncode == 0, proc.stderr
    requests = sorted(server.requests, key=lambda r: r.time)
    t429 = next(r.time for r in requests if r.status == 429)
    before = [r for r in requests if t429 - 0.5 <= r.time < t429]
    assert len({r.path for r in before}) >= 2  # other workers were busy on the host up to the 429
    # Requests already on their way when the 429 was sent may arrive just after it; then nothing for 2 s.
    assert not [r.path for r in requests if t429 + 0.2 < r.time < t429 + 1.95]
    assert [r for r in requests if r.time >= t429 + 1.95], "the run went on after the pause"
    summary = json.loads(proc.stdout)
    assert summary["throttled_hosts"] == {server.host: {"responses": 1, "paused_s": 2.0}}
    assert len(list((tmp_path / "out").glob("p*.pdf"))) == 40


def test_the_summary_names_each_throttled_host(server, tmp_path):
    url = server.add_file("/busy.pdf", PDF)
    server.add_fault("/busy.pdf", Fault.status(503, retry_after=1))
    proc = run_cli("run", url, "-P", str(tmp_path / "out"), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert f"throttled: {server.host} asked to wait 1 time (1.0 s in all)" in proc.stdout


def test_host_rate_counts_for_all_worker_processes_together(server, tmp_path):
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("".join(server.add_file(f"/q{i:02}.pdf", PDF + bytes([i])) + "\n" for i in range(16)))
    proc = run_cli("run", str(jobs), "--out", str(tmp_path / "out"), "--processes", "2", "--workers", "4",
                   "--host-rate", "4", "--json", "-q", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["processes"] == 2 and min(summary["jobs_per_process"]) > 0
    times = [r.time for r in server.requests]
    assert len(times) == 16
    assert _most_in_one_second(times) <= 6  # R + 1 per process in any one second, each process holding R / 2


def test_the_summary_counts_the_throttling_every_worker_process_met(server, tmp_path):
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("".join(server.add_file(f"/t{i:02}.pdf", PDF + bytes([i])) + "\n" for i in range(12)))
    for i in range(12):
        server.add_fault(f"/t{i:02}.pdf", Fault.status(503, retry_after=0))
        server.add_fault(f"/t{i:02}.pdf", Fault.delay(0.3))  # jobs long enough that one process never claims them all at once
    proc = run_cli("run", str(jobs), "--out", str(tmp_path / "out"), "--processes", "2", "--workers", "2",
                   "--json", "-q", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["processes"] == 2 and min(summary["jobs_per_process"]) > 0
    assert sum(1 for r in server.requests if r.status == 503) == 12
    assert summary["throttled_hosts"] == {server.host: {"responses": 12, "paused_s": 0.0}}


def test_limit_rate_counts_for_all_worker_processes_together(server, tmp_path):
    size = 4 << 20  # four files of 4 MiB at 4 MiB/s in all: about 4 s whatever the processes
    urls = [server.add_large_file(f"/w{i}.bin", size, seed=i)[0] for i in range(4)]
    proc = run_cli("run", *urls, "-P", str(tmp_path / "out"), "--workers", "2", "--processes", "2",
                   "--limit-rate", "4M", "--accept-any-content", "--no-progress", "--json")
    ended = time.time()
    assert proc.returncode == 0, proc.stderr
    assert min(json.loads(proc.stdout)["jobs_per_process"]) > 0
    # The client has read every byte by the time it exits: that lower bound on the time is an upper bound on the rate.
    rate = 4 * size / (ended - min(r.time for r in server.requests))
    assert rate <= 1.1 * (4 << 20), f"{rate / (1 << 20):.2f} MiB/s in all for a limit of 4 MiB/s"
