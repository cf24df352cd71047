"""Manifest rows and repair, and the rollout comparison."""

from __future__ import annotations

import json

from contentdownload.cli.commands import compare_metrics
from contentdownload.records.manifest import ManifestWriter, iter_rows, read_manifest, repair_tail, result_row
from contentdownload.hooks.model import HOOKS, Job, JobResult


def test_rows_have_sorted_keys_and_every_field(tmp_path):
    result = JobResult(outcome="downloaded", job=Job(urls=("http://h/a.pdf",), work_id="W"), job_key="k" * 64,
                       path=tmp_path / "a.pdf", size=3, sha256="s" * 64, plugins={"job_key": "streaming"}, fallbacks={"job_key": False})
    writer = ManifestWriter(tmp_path / "manifest.jsonl")
    writer.write(result_row(result, "run1", tmp_path))
    writer.close()
    line = (tmp_path / "manifest.jsonl").read_text().splitlines()[0]
    row = json.loads(line)
    assert list(row) == sorted(row)
    assert row["path"] == "a.pdf" and row["schema_version"] == 1 and row["run_id"] == "run1"
    assert set(row["plugins"]) == set(HOOKS) and row["plugins"]["job_key"] == "streaming"
    for field in ("job_key", "work_id", "url", "final_url", "outcome", "reason", "http_status", "size", "sha256",
                  "content_type", "etag", "last_modified", "attempts", "elapsed_ms", "fallbacks"):
        assert field in row


def test_torn_last_line_is_cut_on_open(tmp_path):
    path = tmp_path / "manifest.jsonl"
    path.write_text('{"a": 1}\n{"b": 2}\n{"c": ')
    assert repair_tail(path) == len('{"c": ')
    ManifestWriter(path).close()
    assert [r for r in iter_rows(path)] == [{"a": 1}, {"b": 2}]


def test_read_manifest_gives_records_by_key_and_url(tmp_path):
    rows = [
        {"job_key": "k1", "identity": "i1", "url": "HTTP://H/a.pdf", "outcome": "downloaded", "path": "a.pdf", "size": 3, "sha256": "s", "etag": '"e1"'},
        {"job_key": "k2", "url": "http://h/b.pdf", "outcome": "failed", "path": None, "etag": None},
        {"job_key": "k3", "identity": "i3", "url": "http://h/c.pdf", "outcome": "downloaded", "path": "/etc/passwd", "size": 1, "sha256": "t"},
        {"job_key": "k4", "url": "http://h/d.pdf", "outcome": "downloaded", "path": "d.pdf", "size": 1},
    ]
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = read_manifest(tmp_path / "manifest.jsonl")
    base = tmp_path.resolve()
    assert records.by_key["k1"].etag == '"e1"' and records.by_key["k1"].path == str(base / "a.pdf")
    assert records.by_url["http://h/a.pdf"] == records.by_key["k1"]
    assert records.by_key["k2"].path is None and records.by_key["k2"].sha256 is None
    assert records.by_key["k3"].path is None, "a path outside the manifest's folder is never trusted"
    assert records.by_key["k4"].path is None, "a row without a SHA-256 does not prove a finished file"
    assert records.names == {"i1": str(base / "a.pdf")}


def test_rows_carry_no_credentials(tmp_path):
    result = JobResult(outcome="failed", job=Job(urls=("https://user:s3cret@h.example/a.pdf",)), reason="http_404",
                       url="https://user:s3cret@h.example/a.pdf", final_url="https://user:s3cret@h.example/b.pdf")
    row = result_row(result, "r", tmp_path)
    assert "s3cret" not in json.dumps(row)


def _metrics(**kw):
    base = {"decision_log_share": 1.0, "conditional_requests": 10, "cache_hit_rate": 0.9, "not_modified_as_errors": 0,
            "failed_fallbacks": 0, "sha256_mismatches": 0, "throughput_bytes_per_s": 100.0, "peak_rss_mb": 50.0, "outcomes": {}}
    base.update(kw)
    return base


def test_compare_passes_and_reports_changes():
    report = compare_metrics(_metrics(), _metrics(throughput_bytes_per_s=120.0, peak_rss_mb=40.0))
    assert report["passed"]
    assert report["throughput_change_pct"] == 20.0 and report["peak_memory_change_pct"] == -20.0


def test_compare_fails_on_each_criterion():
    for bad in (dict(decision_log_share=0.2), dict(cache_hit_rate=0.5), dict(not_modified_as_errors=1),
                dict(failed_fallbacks=2), dict(sha256_mismatches=1)):
        assert not compare_metrics(_metrics(), _metrics(**bad))["passed"], bad
