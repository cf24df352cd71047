"""End-to-end: the real CLI in a subprocess against the loopback test server."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from contentdownload.testing.server import Fault
from helpers import cli_env, run_cli

pytestmark = pytest.mark.slow


def _corpus(server, n: int, seed: int = 1, prefix: str = "f", sizes=(1_000, 120_000)) -> dict[str, bytes]:
    rng = random.Random(seed)
    files = {}
    for i in range(n):
        data = rng.randbytes(rng.randint(*sizes))
        path = f"/{prefix}/{prefix}{i:04d}.bin"
        server.add_file(path, data)
        files[path] = data
    return files


def _write_jobs(path: Path, server, files: dict[str, bytes], with_sha: bool = True) -> Path:
    with path.open("w") as fh:
        for p, data in files.items():
            job = {"url": server.url(p)}
            if with_sha:
                job["sha256"] = hashlib.sha256(data).hexdigest()
            fh.write(json.dumps(job) + "\n")
    return path


def _rows(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "manifest.jsonl").read_text().splitlines() if l.strip()]


def _check_files(out: Path, files: dict[str, bytes]) -> None:
    for p, data in files.items():
        final = out / Path(p).name
        assert final.is_file(), final
        assert hashlib.sha256(final.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest(), final


def test_two_hundred_files_with_faults(server, tmp_path):
    files = _corpus(server, 200)
    paths = list(files)
    rng = random.Random(5)
    for p in rng.sample(paths, 20):
        server.add_fault(p, Fault.cut_after(len(files[p]) // 2))
    for p in rng.sample(paths, 10):
        server.add_fault(p, Fault.status(503, retry_after=0))
    for p in rng.sample(paths, 10):
        server.add_fault(p, Fault.short_body(100))
    for p in rng.sample(paths, 5):
        server.add_fault(p, Fault.ignore_range())
    jobs = _write_jobs(tmp_path / "jobs.jsonl", server, files)
    out = tmp_path / "out"

    (tmp_path / "contentdownload.toml").write_text("[run]\nbackoff_factor = 0.01\n")
    proc = run_cli("run", str(jobs), "--out", str(out), "--workers", "8", "--no-progress", "--retries", "6", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_files(out, files)
    rows = _rows(out)
    assert len(rows) == 200 and len({r["job_key"] for r in rows}) == 200
    metrics = json.loads((out / "manifest.metrics.json").read_text())
    assert metrics["jobs"] == len(rows)
    for outcome, n in metrics["outcomes"].items():
        assert n == sum(1 for r in rows if r["outcome"] == outcome), outcome
    assert metrics["outcomes"]["resumed"] >= 1
    assert metrics["streaming.resume_decisions_made"] >= 200
    assert metrics["resume_decisions_logged"] >= 200
    logged = [json.loads(line) for line in (out / "logs" / "download.log").read_text().splitlines()]
    decisions = [e for e in logged if e["event"] == "streaming_resume_decision"]  # at INFO: all but a new job's plain start
    assert decisions and all(e["mode"] != "fresh" or e["reason"] != "no_part" for e in decisions)
    assert sum(e["mode"] == "resume" for e in decisions) >= metrics["outcomes"]["resumed"]

    # Add two permanent failures: exit code 1 exactly then, the rest still done.
    server.add_status("/gone/missing.pdf", 404)
    server.add_status("/gone/forbidden.pdf", 403)
    with jobs.open("a") as fh:
        fh.write(json.dumps({"url": server.url("/gone/missing.pdf")}) + "\n")
        fh.write(json.dumps({"url": server.url("/gone/forbidden.pdf")}) + "\n")
    proc = run_cli("run", str(jobs), "--out", str(out), "--no-progress", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    rows = _rows(out)
    failed = {r["reason"] for r in rows if r["outcome"] == "failed"}
    assert failed == {"http_404", "http_403"}
    assert not (out / "missing.pdf").exists() and not (out / "forbidden.pdf").exists()


def test_rerun_makes_no_body_requests_and_revalidate_gets_304s(server, tmp_path):
    files = _corpus(server, 30)
    jobs = _write_jobs(tmp_path / "jobs.jsonl", server, files, with_sha=False)
    out = tmp_path / "out"
    assert run_cli("run", str(jobs), "--out", str(out), "--no-progress", cwd=tmp_path).returncode == 0
    mtimes = {p: (out / Path(p).name).stat().st_mtime_ns for p in files}
    server.reset_stats()

    proc = run_cli("run", str(jobs), "--out", str(out), "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sum(server.stats(p).requests for p in files) == 0
    assert len(_rows(out)) == 30  # finished jobs get no second row

    proc = run_cli("run", str(jobs), "--out", str(out), "--no-progress", "--revalidate", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for p in files:
        stats = server.stats(p)
        assert stats.statuses == [304], (p, stats.statuses)
        assert stats.body_bytes == 0
        assert (out / Path(p).name).stat().st_mtime_ns == mtimes[p]
    metrics = json.loads((out / "manifest.metrics.json").read_text())
    assert metrics["outcomes"]["not_modified"] == 30 and metrics["cache_hit_rate"] == 1.0


def test_resume_from_sends_the_earlier_manifests_validators(server, tmp_path):
    files = _corpus(server, 10)
    jobs = _write_jobs(tmp_path / "jobs.jsonl", server, files, with_sha=False)
    first = tmp_path / "first"
    assert run_cli("run", str(jobs), "--out", str(first), "--no-progress", cwd=tmp_path).returncode == 0
    etags = {r["url"]: r["etag"] for r in _rows(first)}
    server.reset_stats()
    second = tmp_path / "second"
    proc = run_cli("run", str(jobs), "--out", str(second), "--no-progress", "--resume-from", str(first / "manifest.jsonl"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    seen = [r for r in server.requests if r.path in files]
    assert len(seen) == 10
    for request in seen:
        assert request.headers.get("If-None-Match") == etags[server.url(request.path)]
        assert request.status == 304
    _check_files(second, files)


def test_hostile_job_list_stays_inside_out(server, tmp_path):
    server.add_file("/a.pdf", b"%PDF-1.4\n" + b"A" * 1000)
    server.add_file("/b.pdf", b"%PDF-1.4\n" + b"B" * 1000)
    server.add_file("/c.pdf", b"%PDF-1.4\n" + b"C" * 1000)
    names = ["../escape.pdf", "/etc/absolute.pdf", "nul\x00byte.pdf", "ctrl\x07\x1b.pdf", "x" * 5000 + ".pdf", "same.pdf", "same.pdf"]
    urls = ["/a.pdf", "/b.pdf", "/c.pdf", "/a.pdf", "/b.pdf", "/a.pdf", "/b.pdf"]
    jobs = tmp_path / "jobs.jsonl"
    with jobs.open("w") as fh:
        for i, (name, url) in enumerate(zip(names, urls)):
            fh.write(json.dumps({"url": server.url(url), "filename": name, "work_id": f"w{i}"}) + "\n")
    out = tmp_path / "out"
    proc = run_cli("run", str(jobs), "--out", str(out), "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and out not in p.parents and "served" not in p.parts and p != jobs]
    assert outside == []
    finals = [p for p in out.iterdir() if p.is_file() and p.name not in ("manifest.jsonl", "manifest.metrics.json")]
    assert len(finals) == 7
    contents = sorted(p.read_bytes()[9:10] for p in finals)
    assert contents == sorted([b"A", b"B", b"C", b"A", b"B", b"A", b"B"])
    same = sorted(p.name for p in finals if p.name.startswith("same"))
    assert "same.pdf" in same and len(same) == 2


def test_bad_lines_fail_alone_and_bad_input_exits_2(server, tmp_path):
    server.add_file("/ok.pdf", b"%PDF-1.4\n" + b"ok" * 100)
    listing = tmp_path / "urls.txt"
    listing.write_text(f"# list\n{server.url('/ok.pdf')}\nftp://example.com/x\nnot-a-url\n")
    out = tmp_path / "out"
    proc = run_cli("run", str(listing), "--out", str(out), "--no-progress", cwd=tmp_path)
    assert proc.returncode == 1
    rows = _rows(out)
    assert sorted(r["outcome"] for r in rows) == ["downloaded", "failed", "failed"]
    assert {r["line"] for r in rows if r["outcome"] == "failed"} == {3, 4}

    for args in (["missing.txt", "--out", str(tmp_path / "o2")], [str(listing), "--out", str(tmp_path / "o3"), "--workers", "0"],
                 [str(listing), "--out", str(tmp_path / "o4"), "--plugin", "stream_io=nope"]):
        proc = run_cli("run", *args, "--no-progress", cwd=tmp_path)
        assert proc.returncode == 2, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
        assert not Path(args[2]).exists(), "nothing may be written on a usage error"


def test_streaming_off_goes_through_legacy_end_to_end(server, tmp_path):
    files = _corpus(server, 10)
    jobs = _write_jobs(tmp_path / "jobs.jsonl", server, files)
    out = tmp_path / "out"
    proc = run_cli("run", str(jobs), "--out", str(out), "--no-progress", env={"DOCSTOKG_ENABLE_STREAMING": "0"}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    _check_files(out, files)
    for row in _rows(out):
        assert row["plugins"]["stream_io"] == "legacy" and row["plugins"]["finalize"] == "legacy"
        assert row["plugins"]["job_key"] == "streaming"


def test_sigint_keeps_parts_and_a_valid_manifest_then_rerun_completes(server, tmp_path):
    files = {}
    for i in range(4):
        url, sha = server.add_large_file(f"/big/big{i}.bin", 24 << 20, seed=i)
        files[f"/big/big{i}.bin"] = sha
    for i in range(20):
        server.add_file(f"/small/s{i}.bin", os.urandom(2000))
    for p in files:
        server.add_fault(p, Fault.stall(2.0, after=4 << 20))
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("".join(server.url(p) + "\n" for p in [*files, *(f"/small/s{i}.bin" for i in range(20))]))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "contentdownload", "run", str(jobs), "--out", str(out), "--no-progress", "--workers", "4"],
                            env=cli_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list((out / ".contentdownload" / "staging").glob("*.part")):
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert list((out / ".contentdownload" / "staging").glob("*.part")), "parts must be kept"
    for row in _rows(out):  # every line parses
        assert row["outcome"] in ("downloaded", "resumed", "skipped", "not_modified", "failed")
    assert json.loads((out / "manifest.metrics.json").read_text())["interrupted"] is True
    for p in files:  # no partial file at a final path
        final = out / Path(p).name
        assert not final.exists() or hashlib.sha256(final.read_bytes()).hexdigest() == files[p]

    server.clear_faults()
    proc2 = run_cli("run", str(jobs), "--out", str(out), "--no-progress", cwd=tmp_path)
    assert proc2.returncode == 0, proc2.stderr
    for p, sha in files.items():
        assert hashlib.sha256((out / Path(p).name).read_bytes()).hexdigest() == sha
    rows = _rows(out)
    assert len({r["job_key"] for r in rows}) == 24 and len(rows) == 24
    assert any(r["outcome"] == "resumed" for r in rows)


@pytest.mark.parametrize("env", [{"DOCSTOKG_ENABLE_STREAMING_SCHEMA": "0"}, {"DOCSTOKG_ENABLE_STREAMING_INTEGRATION": "0"}],
                         ids=["store-off", "full-rollback"])
def test_without_the_store_a_later_list_never_takes_another_jobs_file(server, tmp_path, env):
    server.add_file("/a/f.bin", b"A" * 1000)
    server.add_file("/b/f.bin", b"B" * 1000)
    out = tmp_path / "out"
    (tmp_path / "one.txt").write_text(server.url("/a/f.bin") + "\n")
    (tmp_path / "two.txt").write_text(server.url("/b/f.bin") + "\n")
    (out).mkdir()
    (out / "notes.txt").write_text("mine")
    assert run_cli("run", str(tmp_path / "one.txt"), "--out", str(out), "--no-progress", env=env, cwd=tmp_path).returncode == 0
    proc = run_cli("run", str(tmp_path / "two.txt"), "--out", str(out), "--no-progress", env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (out / "f.bin").read_bytes() == b"A" * 1000
    second = [r for r in _rows(out) if r["url"].endswith("/b/f.bin")]
    assert len(second) == 1 and second[0]["outcome"] == "downloaded" and second[0]["path"] != "f.bin"
    assert (out / second[0]["path"]).read_bytes() == b"B" * 1000
    assert (out / "notes.txt").read_text() == "mine"
    # A rerun of the first list still finds its own file done.
    server.reset_stats()
    assert run_cli("run", str(tmp_path / "one.txt"), "--out", str(out), "--no-progress", env=env, cwd=tmp_path).returncode == 0
    assert server.stats("/a/f.bin").requests == 0


def test_per_host_limit_bounds_concurrent_requests(server, tmp_path):
    for i in range(8):
        server.add_file(f"/h/{i}.bin", os.urandom(3000))
        server.add_fault(f"/h/{i}.bin", Fault.delay(0.4))
    jobs = tmp_path / "urls.txt"
    jobs.write_text("".join(server.url(f"/h/{i}.bin") + "\n" for i in range(8)))
    proc = run_cli("run", str(jobs), "--out", str(tmp_path / "out"), "--workers", "8", "--per-host", "2", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    starts = sorted(r.time for r in server.requests if r.path.startswith("/h/"))
    assert len(starts) == 8
    # Each request is held 0.4 s by the server: with two slots, no three starts fit in 0.3 s.
    assert all(b - a >= 0.3 for a, b in zip(starts, starts[2:])), [round(b - a, 3) for a, b in zip(starts, starts[2:])]


def test_an_idle_worker_ends_with_the_last_job_not_a_poll_later(server, tmp_path):
    """A worker with nothing to claim waits for the others' jobs; it wakes when one ends, not at its next poll."""
    urls = [server.add_file(f"/w{i}.pdf", b"%PDF-1.4 " + bytes([i]) * 2000) for i in range(2)]
    server.add_fault("/w1.pdf", Fault.delay(0.1))
    out = tmp_path / "out"
    proc = run_cli("run", *urls, "--out", str(out), "--workers", "2", "-q", "--log-level", "DEBUG")
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in (out / "logs" / "download.log").read_text().splitlines()]
    stamps = {e["event"]: e["timestamp"] for e in events if e["event"] in ("job_outcome", "run_finished")}  # the last of each
    gap = (datetime.fromisoformat(stamps["run_finished"].rstrip("Z")) - datetime.fromisoformat(stamps["job_outcome"].rstrip("Z"))).total_seconds()
    assert gap < 0.5, f"the run ended {gap:.2f} s after its last job"  # the idle worker's poll is 1 s
