"""Exactly-once under real failures: SIGKILL at random moments, several processes, a paused worker."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from contentdownload.testing.pg import fresh_postgres_dsn, postgres_dsn  # noqa: F401  (fixtures)
from contentdownload.testing.server import Fault
from helpers import cli_env

pytestmark = pytest.mark.slow

CLEAN_ENV = cli_env()


def _start(jobs: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "contentdownload", "run", str(jobs), "--out", str(out), "--no-progress", *extra],
        env=CLEAN_ENV, cwd=out.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def _rows(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "manifest.jsonl").read_text().splitlines() if l.strip()]


def _no_partial_finals(out: Path, expected: dict[str, str]) -> None:
    for name, sha in expected.items():
        final = out / name
        if final.exists():
            assert hashlib.sha256(final.read_bytes()).hexdigest() == sha, f"{name} at its final path is not complete"


def test_sigkill_at_twenty_random_moments_then_complete(server, tmp_path):
    rng = random.Random(2024)
    expected: dict[str, str] = {}
    paths = []
    for i in range(300):
        path = f"/c/doc{i:03d}.bin"
        if i % 15 == 0:  # 20 large files
            _url, sha = server.add_large_file(path, rng.randint(4, 12) << 20, seed=i)
        else:
            data = rng.randbytes(rng.randint(2_000, 150_000))
            server.add_file(path, data)
            sha = hashlib.sha256(data).hexdigest()
        expected[Path(path).name] = sha
        paths.append(path)
    for path in rng.sample(paths, 25):
        server.add_fault(path, Fault.cut_after(1500), times=2)
    for path in rng.sample(paths, 10):
        server.add_fault(path, Fault.status(503, retry_after=0))
    # A slow server for most files, so that twenty kill moments all fall in the middle of the work.
    for path in rng.sample(paths, 200):
        server.add_fault(path, Fault.delay(0.3), times=-1)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({"url": server.url(p), "sha256": expected[Path(p).name]}) + "\n" for p in paths))
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "contentdownload.toml").write_text("[run]\nbackoff_factor = 0.01\n")

    kills = 0
    for _ in range(20):
        proc = _start(jobs, out, "--workers", "6")
        time.sleep(rng.uniform(0.3, 1.2))
        if proc.poll() is not None:
            break  # finished before this kill: the work is done
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        kills += 1
        _no_partial_finals(out, expected)
    assert kills == 20, f"the work finished after {kills} kills: the kills must fall in the middle of it"

    final = _start(jobs, out, "--workers", "6")
    _, err = final.communicate(timeout=600)
    assert final.returncode == 0, err[-3000:]
    for name, sha in expected.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == sha, name
    rows = _rows(out)
    per_job = Counter(r["job_key"] for r in rows)
    assert len(per_job) == 300 and set(per_job.values()) == {1}, [k for k, n in per_job.items() if n != 1][:5]
    # No finished file was fetched again: no request for a file started after it reached its final path.
    for path in paths:
        finished_at = (out / Path(path).name).stat().st_ctime
        late = [r for r in server.requests if r.path == path and r.time > finished_at + 0.01]
        assert not late, (path, [(r.status, r.time - finished_at) for r in late])


def _concurrent_run(server, tmp_path: Path, db: str | None) -> None:
    rng = random.Random(99)
    files = {}
    for i in range(500):
        data = rng.randbytes(rng.randint(500, 20_000))
        path = f"/m/f{i:03d}.bin"
        server.add_file(path, data)
        files[path] = data
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("".join(server.url(p) + "\n" for p in files))
    out = tmp_path / "out"
    out.mkdir()
    extra = ["--workers", "4"] + (["--db", db] if db else [])
    procs = [_start(jobs, out, *extra) for _ in range(3)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    for path, data in files.items():
        stats = server.stats(path)
        assert stats.full_bodies == 1 and stats.body_bytes == len(data), (path, stats)
        assert (out / Path(path).name).read_bytes() == data
    rows = _rows(out)
    assert len(rows) == 500 and len({r["job_key"] for r in rows}) == 500
    by_run = Counter(r["run_id"] for r in rows)
    assert len(by_run) == 3 and min(by_run.values()) > 0, by_run


def test_three_processes_share_one_sqlite_store(server, tmp_path):
    _concurrent_run(server, tmp_path, None)


@pytest.mark.postgres
def test_three_processes_share_one_postgresql_store(server, tmp_path, fresh_postgres_dsn):  # noqa: F811
    _concurrent_run(server, tmp_path, fresh_postgres_dsn)


def test_paused_worker_loses_its_lease_and_cannot_finalize(server, tmp_path):
    old = os.urandom(48 << 20)
    server.add_file("/big.bin", old)
    server.add_fault("/big.bin", Fault.stall(30.0, after=16 << 20))  # the first worker stalls mid-body
    jobs = tmp_path / "jobs.txt"
    jobs.write_text(server.url("/big.bin") + "\n")
    out = tmp_path / "out"
    out.mkdir()
    staging = out / ".contentdownload" / "staging"

    first = _start(jobs, out, "--lease-ttl", "2", "--timeout", "60")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not list(staging.glob("*.part")):
        time.sleep(0.05)
    time.sleep(0.3)
    first.send_signal(signal.SIGSTOP)
    try:
        time.sleep(3.0)  # past its lease
        new = os.urandom(40 << 20)
        server.set_content("/big.bin", new)
        server.clear_faults("/big.bin")
        second = _start(jobs, out, "--lease-ttl", "2")
        _, err = second.communicate(timeout=120)
        assert second.returncode == 0, err[-3000:]
        assert (out / "big.bin").read_bytes() == new
        promoted = (out / "big.bin").stat()
    finally:
        first.send_signal(signal.SIGCONT)
    server.set_content("/big.bin", old)  # whatever the first worker still reads, it must not land
    _, err = first.communicate(timeout=120)
    final = out / "big.bin"
    assert final.read_bytes() == new, "the paused worker's bytes replaced the other worker's file"
    assert final.stat().st_ino == promoted.st_ino and final.stat().st_mtime_ns == promoted.st_mtime_ns
    log = (out / "logs" / "download.log").read_text()
    assert "lease" in log.lower() and ("LeaseLostError" in log or "taken over" in log)
    rows = _rows(out)
    assert [r["outcome"] for r in rows].count("downloaded") == 1
