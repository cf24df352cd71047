"""A part has one writer, with or without leases and the store."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from contentdownload.testing.server import Fault

SIZE = 40 << 20
pytestmark = pytest.mark.slow


def start(url: str, out: Path, env_flags: dict[str, str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCSTOKG_", "CONTENTDOWNLOAD_"))}
    env.update(env_flags)
    jobs = out.parent / "jobs.txt"
    jobs.write_text(url + "\n")
    return subprocess.Popen([sys.executable, "-m", "contentdownload", "run", str(jobs), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)  # watching real processes and a real server: no event to wait on


@pytest.mark.parametrize("flag", ["DOCSTOKG_ENABLE_IDEMPOTENCY", "DOCSTOKG_ENABLE_STREAMING_SCHEMA"])
def test_two_processes_on_one_folder_never_write_one_part(server, tmp_path, flag):
    data = os.urandom(SIZE)
    url = server.add_file("/big.bin", data)
    server.add_fault("/big.bin", Fault.stall(3, after=10 << 20))  # the first writer pauses mid-body
    out = tmp_path / "out"
    first = start(url, out, {flag: "0"})
    wait_for(lambda: server.stats("/big.bin").body_bytes >= 10 << 20, "the first process never got its bytes")
    second = start(url, out, {flag: "0"})
    results = [p.communicate(timeout=120) + (p.returncode,) for p in (first, second)]
    for stdout, stderr, code in results:
        assert "Traceback" not in stderr and code in (0, 2), (code, stderr)
    assert results[0][2] == 0
    assert hashlib.sha256((out / "big.bin").read_bytes()).digest() == hashlib.sha256(data).digest()
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines() if line.strip()]
    assert not [r for r in rows if r["outcome"] == "failed"], rows
