"""A fresh body of one read block is promoted without a sidecar ever written; interrupted, it still gets one and resumes."""

from __future__ import annotations

import os

from contentdownload import Downloader, Job
from contentdownload.testing.server import Fault
from contentdownload.transfer import parts


def _sidecar_at_rename(server, tmp_path, size, name):
    url = server.add_file(f"/{name}", b"%PDF-1.4\n" + os.urandom(size - 9))
    seen = []
    parts.set_test_hook("before_rename", lambda paths: seen.append(paths.sidecar.exists()))
    try:
        with Downloader(environ={}, retries=0) as dl:
            result = dl.download(Job(urls=(url,)), tmp_path / "out")
    finally:
        parts.set_test_hook("before_rename", None)
    assert result.outcome == "downloaded", result.reason
    return seen


def test_a_small_fresh_body_never_gets_a_sidecar(server, tmp_path):
    assert _sidecar_at_rename(server, tmp_path, 20_000, "small.pdf") == [False]


def test_a_body_longer_than_one_block_keeps_its_sidecar_until_promoted(server, tmp_path):
    assert _sidecar_at_rename(server, tmp_path, parts.LAZY_SIDECAR_MAX + 1, "large.pdf") == [True]


def test_an_interrupted_small_body_gets_its_sidecar_and_resumes(server, tmp_path):
    data = b"%PDF-1.4\n" + os.urandom(40_000)
    url = server.add_file("/cut.pdf", data)
    server.add_fault("/cut.pdf", Fault.cut_after(15_000))
    with Downloader(environ={}, retries=1, backoff_factor=0) as dl:
        result = dl.download(Job(urls=(url,)), tmp_path / "out")
    assert result.outcome == "resumed" and result.resumed_from > 0
    assert (tmp_path / "out" / "cut.pdf").read_bytes() == data
