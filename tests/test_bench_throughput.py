"""Throughput benchmarks (pytest-benchmark): skipped by default, run with ``pytest --benchmark-only``.

A 64 MiB file is served by the package's loopback server in its own process; the
streaming and legacy pipelines and a plain requests loop fetch it. Every round checks the
SHA-256 of what it wrote. ``benchmarks/throughput.py`` is the full comparison (1 GiB,
nginx, curl, wget, peak RSS).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys

import pytest
import requests

from contentdownload.hooks.model import Job, TransferOptions
from contentdownload.testing.conformance import TransferRig

SIZE = 64 << 20


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    data = os.urandom(1 << 20) * (SIZE >> 20)
    (root / "payload.bin").write_bytes(data)
    proc = subprocess.Popen([sys.executable, "-m", "contentdownload.testing.server", "--root", str(root)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        base = proc.stdout.readline().strip()
        assert base.startswith("http://"), base
        yield f"{base}/payload.bin", hashlib.sha256(data).hexdigest()
    finally:
        proc.terminate()
        proc.wait()


def _pipeline(plugin, tmp_path, url, sha):
    def setup():
        shutil.rmtree(tmp_path / plugin, ignore_errors=True)
        return (TransferRig(plugin, tmp_path / plugin, options=TransferOptions()),), {}

    def run(rig):
        with rig:
            result = rig.run(Job(urls=(url,)), "payload.bin")
        assert result.outcome == "downloaded" and result.sha256 == sha

    return setup, run


@pytest.mark.benchmark(group="throughput-64MiB")
@pytest.mark.parametrize("plugin", ["streaming", "legacy"])
def test_pipeline_throughput(benchmark, served, tmp_path, plugin):
    url, sha = served
    setup, run = _pipeline(plugin, tmp_path, url, sha)
    benchmark.extra_info["bytes"] = SIZE
    benchmark.pedantic(run, setup=setup, rounds=3, iterations=1)


@pytest.mark.benchmark(group="throughput-64MiB")
def test_plain_requests_loop_throughput(benchmark, served, tmp_path):
    url, sha = served
    out = tmp_path / "requests.bin"

    def run():
        digest = hashlib.sha256()
        with requests.get(url, stream=True, timeout=(10, 60)) as response, open(out, "wb") as fh:
            for chunk in response.iter_content(1 << 20):
                fh.write(chunk)
                digest.update(chunk)
        assert digest.hexdigest() == sha

    benchmark.extra_info["bytes"] = SIZE
    benchmark.pedantic(run, rounds=3, iterations=1)
