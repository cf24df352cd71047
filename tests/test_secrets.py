"""Credentials and signatures in URLs are never written: manifest, logs, metrics, store, stdout, stderr."""

from __future__ import annotations

import json

import pytest

from contentdownload.transfer.urls import redact_text, redact_url
from helpers import run_cli

pytestmark = pytest.mark.slow

SECRET = "hunter2sekrit"


@pytest.mark.parametrize("url", [
    f"http://alice:{SECRET}@h/a",
    f"ftp://alice:{SECRET}@h/a",
    f"http://{SECRET}@h:99999/a",
    f"http://alice:{SECRET}@[::1/x",
    f"https://b.s3.amazonaws.com/k?X-Amz-Credential={SECRET}&X-Amz-Signature={SECRET}&X-Amz-Security-Token={SECRET}",
    f"https://s.blob.core.windows.net/c/b?sv=2020&se={SECRET}&sig={SECRET}&skoid={SECRET}",
    f"https://storage.googleapis.com/b/o?X-Goog-Signature={SECRET}&x-goog-credential={SECRET}",
    f"https://d.cloudfront.net/f?Policy={SECRET}&Signature={SECRET}&Key-Pair-Id={SECRET}&Expires=1",
])
def test_redact_url_removes_every_secret(url):
    assert SECRET not in redact_url(url)
    assert SECRET not in redact_text(f"failed on {url!r}: reason")


def test_redact_url_keeps_ordinary_parts():
    assert redact_url("http://h:8080/a?page=2&sig=x#f") == "http://h:8080/a?page=2&sig=REDACTED#f"


def test_no_secret_in_any_output(tmp_path, server):
    server.add_file("/ok.bin", b"content")
    server.add_file("/signed.bin", b"signed")
    good = server.url("/ok.bin").replace("http://", f"http://alice:{SECRET}@")
    signed = server.url("/signed.bin") + f"?X-Amz-Signature={SECRET}&X-Amz-Credential={SECRET}"
    lines = [
        good, signed,
        f"ftp://alice:{SECRET}@example.org/a",
        f"http://alice:{SECRET}@127.0.0.1:99999/a",
        f"http://alice:{SECRET}@[::1/x",
        server.url("/missing.bin").replace("http://", f"http://bob:{SECRET}@"),
    ]
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    proc = run_cli("run", str(jobs), "--out", str(out), "--no-progress", "--retries", "0", "--log-level", "DEBUG")
    assert proc.returncode == 1, proc.stderr
    assert (out / "ok.bin").read_bytes() == b"content"
    assert SECRET not in proc.stdout and SECRET not in proc.stderr
    dry = run_cli("run", str(jobs), "--out", str(out), "--dry-run")
    assert SECRET not in dry.stdout + dry.stderr
    stats = run_cli("jobs", "--out", str(out), "--json")
    assert SECRET not in stats.stdout + stats.stderr
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "jobs.db" for p in files)
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), path
    metrics = json.loads((out / "manifest.metrics.json").read_text())
    assert metrics["failures_by_reason"]


def test_get_names_a_failed_url_without_its_password(tmp_path, server):
    url = server.url("/missing.pdf").replace("http://", "http://dave:pw4SECRET@")
    proc = run_cli("get", url + "?X-Amz-Signature=SIGSECRET", "-o", str(tmp_path / "x.pdf"), cwd=tmp_path)
    assert proc.returncode == 1
    assert "missing.pdf" in proc.stderr
    assert "SECRET" not in proc.stderr + proc.stdout
