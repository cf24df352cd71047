"""A run under store faults and signals: no worker dies, the exit code and the summary come from the plan."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from contentdownload.cli.commands import print_summary
from contentdownload.errors import StoreError
from contentdownload.jobs.runner import Run, open_job_store
from contentdownload.jobs.inputs import read_jobs
from contentdownload.machinery.flags import FlagLayer
from contentdownload.machinery.runtime import Runtime
from contentdownload.testing.server import Fault
from helpers import cli_env


class FaultyStore:
    """A real store whose ``method`` raises ``error`` on its ``nth`` call (where ``when(args)`` holds)."""

    def __init__(self, store, method: str, nth: int, error: Exception, when=lambda args: True):
        self._store, self._method, self._nth, self._error, self._when = store, method, nth, error, when
        self.calls = 0

    def __getattr__(self, name):
        attr = getattr(self._store, name)
        if name != self._method:
            return attr

        def faulty(*args, **kw):
            if self._when(args):
                self.calls += 1
                if self.calls == self._nth:
                    raise self._error
            return attr(*args, **kw)

        return faulty


def _runtime(tmp_path: Path, **settings) -> Runtime:
    return Runtime.from_options(config_path=None, cli=FlagLayer(source="cli"), environ={},
                                run_overrides={"workers": 2, "progress": False, "lease_ttl": 30.0, **settings})

#: How each transport claims: the event-loop lane in batches, worker threads one job at a time.
CLAIMS = [pytest.param("auto", "claim_many", id="lane"), pytest.param("sync", "claim", id="threads")]


def _jobs(server, tmp_path: Path, n: int = 10) -> tuple[Path, dict[str, str]]:
    files = {}
    for i in range(n):
        data = os.urandom(5000 + i)
        server.add_file(f"/f/f{i}.bin", data)
        files[f"f{i}.bin"] = hashlib.sha256(data).hexdigest()
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("".join(server.url(f"/f/{name}") + "\n" for name in files))
    return jobs, files


def _run(tmp_path: Path, jobs: Path, factory=open_job_store, **settings):
    report = Run(_runtime(tmp_path, **settings), tmp_path / "out", read_jobs(str(jobs)), store_factory=factory).execute()
    summary = io.StringIO()
    print_summary(report, summary)
    return report, summary.getvalue()


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("error", [StoreError("database is locked"), RuntimeError("driver bug")], ids=["store-error", "other-error"])
@pytest.mark.parametrize("transport, claim", CLAIMS)
def test_a_fault_in_claim_stops_the_run_with_jobs_left_then_a_rerun_finishes(server, tmp_path, monkeypatch, capsys, error, transport, claim):
    monkeypatch.chdir(tmp_path)
    jobs, files = _jobs(server, tmp_path)
    faulty = {}
    nth = 4 if claim == "claim" else 2  # the lane claims a batch (two workers' worth) at a time

    def factory(runtime, ws):
        faulty["store"] = FaultyStore(open_job_store(runtime, ws), claim, nth, error)
        return faulty["store"]

    report, summary = _run(tmp_path, jobs, factory, transport=transport)
    assert faulty["store"].calls >= nth
    assert report.exit_code == 1
    finished = sum(1 for r in report.results if r.outcome == "downloaded")
    assert finished <= (3 if claim == "claim" else 2) and report.left == 10 - finished and report.planned == 10
    assert report.error and "jobs.db" in report.error and "unavailable" in report.error
    assert f"{report.left} of 10 planned jobs left" in summary
    metrics = json.loads((tmp_path / "out" / "manifest.metrics.json").read_text())
    assert metrics["jobs_left"] == report.left and metrics["store_error"] == report.error
    assert "Traceback" not in capsys.readouterr().err

    again, summary = _run(tmp_path, jobs)
    assert again.exit_code == 0 and again.left == 0, summary
    for name, sha in files.items():
        assert hashlib.sha256((tmp_path / "out" / name).read_bytes()).hexdigest() == sha
    rows = _rows(tmp_path / "out")
    assert sorted(r["job_key"] for r in rows if r["outcome"] != "skipped") == sorted({r["job_key"] for r in rows if r["outcome"] != "skipped"})
    assert len({r["job_key"] for r in rows}) == 10


def test_a_store_fault_while_writing_a_manifest_row_leaves_the_job_for_a_rerun(server, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    jobs, files = _jobs(server, tmp_path)

    def factory(runtime, ws):  # the first manifest rows' ledger ops fail (begun together, a batch at a time)
        return FaultyStore(open_job_store(runtime, ws), "op_begin_many", 1, StoreError("connection lost"),
                           when=lambda args: any(op[2] == "manifest" for op in args[0]))

    report, summary = _run(tmp_path, jobs, factory)
    assert report.exit_code == 1 and report.left >= 1, summary
    assert "planned jobs left" in summary
    assert "Traceback" not in capsys.readouterr().err

    again, summary = _run(tmp_path, jobs)
    assert again.exit_code == 0 and again.left == 0, summary
    rows = _rows(tmp_path / "out")
    done = [r["job_key"] for r in rows if r["outcome"] in ("downloaded", "resumed")]
    assert len(done) == len(set(done)) == 10  # one row per job: the interrupted one is recovered, not repeated
    for name, sha in files.items():
        assert hashlib.sha256((tmp_path / "out" / name).read_bytes()).hexdigest() == sha


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_a_read_blocked_on_a_stalled_server(server, tmp_path, signum, code):
    server.add_file("/slow.bin", os.urandom(400_000))
    server.add_fault("/slow.bin", Fault.stall(60.0, after=100_000))
    jobs = tmp_path / "jobs.txt"
    jobs.write_text(server.url("/slow.bin") + "\n")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "contentdownload", "run", str(jobs), "--out", str(out), "--no-progress"],
                            env=cli_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while server.stats("/slow.bin").body_bytes < 100_000 and proc.poll() is None:
            time.sleep(0.02)  # polling the server's counter: the worker is now blocked in its read
        assert proc.poll() is None
        sent = time.monotonic()
        proc.send_signal(signum)
        out_text, err = proc.communicate(timeout=30)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    assert took < 2.0, f"took {took:.2f} s to stop"
    assert "Traceback" not in err
    metrics = json.loads((out / "manifest.metrics.json").read_text())
    assert metrics["interrupted"] is True and metrics["jobs_left"] == 1
    assert (out / "manifest.jsonl").exists()
    assert "1 of 1 planned jobs left" in out_text
    assert list((out / ".contentdownload" / "staging").glob("*.part")), "the part is kept"


@pytest.mark.parametrize("transport, claim", CLAIMS)
def test_a_full_disk_met_by_a_worker_process_stops_the_whole_run(server, tmp_path, transport, claim):
    import errno

    jobs, _ = _jobs(server, tmp_path, n=12)
    for i in range(12):
        server.add_fault(f"/f/f{i}.bin", Fault.delay(0.05))
    parent = os.getpid()

    def factory(runtime, ws):
        store = open_job_store(runtime, ws)
        if os.getpid() == parent:
            return store
        return FaultyStore(store, claim, 1, OSError(errno.ENOSPC, "No space left on device"))

    runtime = Runtime.from_options(config_path=None, cli=FlagLayer(source="cli"), environ={},
                                   run_overrides={"workers": 1, "processes": 2, "progress": False, "lease_ttl": 30.0,
                                                  "transport": transport})
    report = Run(runtime, tmp_path / "out", read_jobs(str(jobs)), store_factory=factory).execute()
    assert report.metrics["processes"] == 2
    assert report.error is not None and report.error.startswith("disk_full: no space left under "), report.error
    assert report.metrics["disk_error"] == "disk_full" and report.exit_code == 1


def test_a_worker_process_whose_manifest_cannot_be_flushed_still_reports_its_jobs(server, tmp_path, monkeypatch):
    import errno

    from contentdownload.records.manifest import ManifestWriter

    jobs, _ = _jobs(server, tmp_path, n=12)
    for i in range(12):
        server.add_fault(f"/f/f{i}.bin", Fault.delay(0.05))
    parent, close = os.getpid(), ManifestWriter.close

    def failing_close(self):
        close(self)
        if os.getpid() != parent:  # the worker process's disk refuses the final fsync
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(ManifestWriter, "close", failing_close)
    runtime = Runtime.from_options(config_path=None, cli=FlagLayer(source="cli"), environ={},
                                   run_overrides={"workers": 1, "processes": 2, "progress": False, "lease_ttl": 30.0})
    report = Run(runtime, tmp_path / "out", read_jobs(str(jobs)), store_factory=open_job_store).execute()
    assert report.metrics["processes"] == 2 and min(report.metrics["jobs_per_process"]) > 0
    assert len(report.results) == 12 and report.left == 0
    assert any("manifest.jsonl" in line and "Input/output error" in line for line in report.record_errors), report.record_errors
