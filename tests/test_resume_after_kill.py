"""A process killed mid-file loses nothing it wrote: the rerun fetches the missing bytes plus the overlap.

Against a real nginx that compresses PDFs when a client allows it (``gzip_types
application/pdf``), and against the package's test server, a ``kill -9`` at 40% of a 60 MB
file, then a rerun, sends at most 1.05x the file's size in body bytes.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from contentdownload.testing.server import Fault
from helpers import run_cli

SIZE = 60_000_000
pytestmark = pytest.mark.slow


def pdf_bytes(size: int) -> bytes:
    return b"%PDF-1.7\n" + os.urandom(size - 9)


def start_run(url: str, out: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCSTOKG_", "CONTENTDOWNLOAD_"))}
    return subprocess.Popen([sys.executable, "-m", "contentdownload", "run", "-", "--out", str(out), "--retries", "0"],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)


def part_bytes(out: Path) -> int:
    staging = out / ".contentdownload" / "staging"
    return max((p.stat().st_size for p in staging.glob("*.part")), default=0) if staging.exists() else 0


def kill_at(process: subprocess.Popen, out: Path, at: int) -> int:
    """SIGKILL ``process`` once its part holds ``at`` bytes; returns the part's size then."""
    deadline = time.monotonic() + 120
    while part_bytes(out) < at:
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "the transfer never reached the kill point"
        time.sleep(0.005)  # watching a real process's file: there is no event to wait on
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    return part_bytes(out)


def killed_then_rerun(url: str, out: Path, data: bytes) -> None:
    process = start_run(url, out)
    process.stdin.write(url + "\n")
    process.stdin.close()
    kill_at(process, out, int(0.4 * len(data)))
    done = run_cli("run", "-", "--out", str(out), input=url + "\n")
    assert done.returncode == 0, done.stderr
    (final,) = [p for p in out.iterdir() if p.is_file() and p.suffix == ".pdf"]
    assert hashlib.sha256(final.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()



def test_kill_at_40_percent_against_nginx_that_gzips_pdfs(nginx_factory, tmp_path):
    nginx = nginx_factory("gzip on; gzip_types application/pdf; gzip_min_length 1; limit_rate 16m;")
    data = pdf_bytes(SIZE)
    (nginx.root / "big.pdf").write_bytes(data)
    killed_then_rerun(nginx.url("big.pdf"), tmp_path / "out", data)
    assert nginx.body_bytes("big.pdf") <= 1.05 * SIZE


def test_kill_at_40_percent_against_the_test_server_with_16_mib_checkpoints(server, tmp_path):
    data = pdf_bytes(SIZE)
    url = server.add_file("/big.pdf", data, content_type="application/pdf")
    server.add_fault("/big.pdf", Fault.stall(600, after=int(0.45 * SIZE)))  # holds the body past the kill point
    killed_then_rerun(url, tmp_path / "out", data)
    assert server.stats("/big.pdf").body_bytes <= 1.05 * SIZE
