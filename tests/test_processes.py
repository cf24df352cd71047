"""``--processes``: worker processes forked after planning share the store; one summary, manifest and metrics cover them all."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from contentdownload.jobs.processes import PROCESS_MIN_JOBS, process_count
from contentdownload.testing.server import Fault
from helpers import cli_env, run_cli

PDF = b"%PDF-1.4\n"


def _rows(out):
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines() if line.strip()]


def test_process_count_defaults_to_the_cores_with_enough_jobs_each():
    assert process_count(None, PROCESS_MIN_JOBS - 1, shared_store=True) == 1
    assert process_count(None, 100 * PROCESS_MIN_JOBS, shared_store=True) == len(os.sched_getaffinity(0))
    assert process_count(3, 2, shared_store=True) == 2  # never more processes than jobs
    assert process_count(4, 1000, shared_store=False) == 1  # a store in memory cannot be shared


def test_two_processes_share_the_jobs_and_one_summary_counts_them_all(server, tmp_path):
    files = {}
    for i in range(24):
        data = PDF + os.urandom(2000 + i)
        server.add_file(f"/p{i}.pdf", data)
        server.add_fault(f"/p{i}.pdf", Fault.delay(0.1))  # every transfer takes a while, so both processes get some
        files[f"p{i}.pdf"] = hashlib.sha256(data).hexdigest()
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("".join(server.url(f"/{name}") + "\n" for name in files))
    out = tmp_path / "out"
    proc = run_cli("run", str(jobs), "--out", str(out), "--processes", "2", "--json", "-q", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["jobs"] == 24 and summary["outcomes"]["downloaded"] == 24
    assert summary["processes"] == 2 and sum(summary["jobs_per_process"]) == 24 and min(summary["jobs_per_process"]) > 0
    assert summary["resume_decisions_logged"] == 24 and summary["streaming.resume_decisions_made"] == 24
    assert summary["hooks"]["stream_io"]["total"]["answered"] == 24
    rows = _rows(out)
    assert len(rows) == 24 and len({r["job_key"] for r in rows}) == 24
    for name, sha in files.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == sha
    assert json.loads((out / "manifest.metrics.json").read_text())["jobs"] == 24


def _started_pids(out):
    for line in (out / "logs" / "download.log").read_text().splitlines():
        event = json.loads(line)
        if event["event"] == "worker_processes_started":
            return event["pids"]
    return []


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_the_parent_stops_every_process_and_a_rerun_finishes(server, tmp_path, signum, code):
    names = [f"/s{i}.bin" for i in range(4)]
    for name in names:
        server.add_file(name, os.urandom(400_000))
        server.add_fault(name, Fault.stall(60.0, after=100_000))
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("".join(server.url(n) + "\n" for n in names))
    out = tmp_path / "out"
    # Two workers a process: all four jobs blocked means both processes hold two.
    proc = subprocess.Popen([sys.executable, "-m", "contentdownload", "run", str(jobs), "--out", str(out), "--no-progress",
                             "--processes", "2", "--workers", "2"],
                            env=cli_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while sum(server.stats(n).body_bytes >= 100_000 for n in names) < 4 and proc.poll() is None:
            time.sleep(0.02)  # polling the server's counters: every worker of both processes is blocked in a read
        assert proc.poll() is None
        proc.send_signal(signum)  # the parent only, as kill(1) does; a terminal's Ctrl-C reaches the whole group
        out_text, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    assert "Traceback" not in err
    pids = _started_pids(out)
    assert len(pids) == 2 and pids[0] == proc.pid
    for pid in pids[1:]:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    metrics = json.loads((out / "manifest.metrics.json").read_text())
    assert metrics["interrupted"] is True and metrics["jobs_left"] == 4
    assert "4 of 4 planned jobs left" in out_text
    assert len(list((out / ".contentdownload" / "staging").glob("*.part"))) == 4, "every process kept its parts"

    server.clear_faults()
    again = run_cli("run", str(jobs), "--out", str(out), "--no-progress", "--processes", "2", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    rows = [r for r in _rows(out) if r["outcome"] in ("downloaded", "resumed")]
    assert len(rows) == 4 and sum(r["outcome"] == "resumed" for r in rows) == 4
