"""What logs/download.log says about each job, interrupts and connection retries, through the real CLI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

from contentdownload import Downloader
from contentdownload.testing.server import Fault
from helpers import cli_env, run_cli

PDF = b"%PDF-1.4 " + bytes(range(256)) * 40


def _events(out) -> list[dict]:
    return [json.loads(line) for line in (out / "logs" / "download.log").read_text().splitlines()]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_each_outcome_is_logged_with_status_and_reason_failures_at_info(server, tmp_path):
    ok = server.add_file("/ok.pdf", PDF)
    gone = server.add_status("/gone.pdf", 404)
    listed = tmp_path / "jobs.jsonl"
    listed.write_text(json.dumps({"url": ok}) + "\n" + json.dumps({"url": gone}) + "\n{not json\n")
    out = tmp_path / "out"
    proc = run_cli("run", str(listed), "-P", str(out), "--no-progress", "--log-level", "DEBUG")
    assert proc.returncode == 1, proc.stderr
    outcomes = {e.get("url") or e.get("line"): e for e in _events(out) if e["event"] == "job_outcome"}
    assert len(outcomes) == 3
    assert outcomes[ok]["level"] == "debug" and outcomes[ok]["outcome"] == "downloaded" and outcomes[ok]["http_status"] == 200
    failed = outcomes[gone]
    assert failed["level"] == "info" and failed["outcome"] == "failed"
    assert failed["http_status"] == 404 and failed["reason"] == "http_404" and failed["attempts"] == 1
    assert outcomes[3]["level"] == "info" and outcomes[3]["reason"].startswith("bad_input: line 3")

    quiet = tmp_path / "quiet"
    assert run_cli("run", ok, "-P", str(quiet), "--no-progress").returncode == 0
    assert not [e for e in _events(quiet) if e["event"] == "job_outcome"]  # a success costs no line at INFO


def test_attempts_count_the_clients_own_connection_retries(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/refused.pdf"
    with Downloader(retries=2, backoff_factor=0) as dl:
        result = dl.download(url, tmp_path / "out")
    assert result.outcome == "failed" and result.reason == "connection_refused"
    assert result.attempts == 3  # one request and the two retries urllib3 made below the pipeline


def test_an_interrupt_is_logged_with_the_job_it_stopped(server, tmp_path):
    server.add_file("/slow.bin", os.urandom(400_000))
    server.add_fault("/slow.bin", Fault.stall(60.0, after=100_000))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "contentdownload", "run", server.url("/slow.bin"), "--out", str(out), "--no-progress"],
                            env=cli_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while server.stats("/slow.bin").body_bytes < 100_000 and proc.poll() is None:
            time.sleep(0.02)  # polling the server's counter: the worker is now blocked in its read
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    events = _events(out)
    interrupted = next(e for e in events if e["event"] == "run_interrupted")
    assert interrupted["level"] == "warning" and interrupted["signal"] == "SIGINT"
    stopped = next(e for e in events if e["event"] == "job_interrupted")
    assert stopped["level"] == "info" and stopped["url"] == server.url("/slow.bin") and stopped["part_kept"] is True
