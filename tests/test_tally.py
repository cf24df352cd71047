"""A run counts its results instead of keeping them: bounded memory, and the same metrics as from every result."""

from __future__ import annotations

import json
from collections import Counter

from contentdownload.hooks.model import OUTCOMES, Job, JobResult
from contentdownload.jobs.inputs import read_jobs
from contentdownload.jobs.runner import Run, open_job_store
from contentdownload.machinery.flags import FlagLayer
from contentdownload.machinery.runtime import Runtime
from contentdownload.records import tally as tally_module
from contentdownload.records.manifest import iter_rows
from contentdownload.records.tally import KEEP_FAILED, KEEP_OTHERS, Tally

JOBS, MISSING = 3000, 1100  # more failures than are kept whole


def _nearest_rank(values: list[float], q: float) -> float | None:
    """The quantile as manifest.metrics.json has always computed it (nearest rank over every latency)."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))], 3)


def _expected_from_manifest(rows: list[dict]) -> dict:
    """The metrics computed from every row of the run, one by one (every job of this run made one fresh decision an attempt)."""
    failed = [r for r in rows if r["outcome"] == "failed"]
    reasons = Counter(r["reason"] for r in failed)
    latencies = [r["elapsed_ms"] for r in rows if r["outcome"] != "skipped"]
    return {
        "jobs": len(rows),
        "outcomes": {o: sum(1 for r in rows if r["outcome"] == o) for o in OUTCOMES},
        "failures_by_reason": dict(sorted(reasons.items())),
        "bytes_downloaded": sum(r["bytes_downloaded"] for r in rows),
        "cache_hit_rate": None,
        "revalidations": 0,
        "not_modified_as_errors": sum(1 for r in failed if r["http_status"] == 304),
        "sha256_mismatches": reasons.get("sha256_mismatch", 0),
        "conditional_requests": 0,
        "latency_ms": {"p50": _nearest_rank(latencies, 0.5), "p90": _nearest_rank(latencies, 0.9),
                       "p99": _nearest_rank(latencies, 0.99), "max": _nearest_rank(latencies, 1.0)},
        "failed_fallbacks": reasons.get("no_plugin", 0) + reasons.get("stage_failed", 0),
        "plugins_answered": dict(sorted(Counter(f"{h}={p}" for r in rows for h, p in r["plugins"].items() if p).items())),
    }


def test_a_run_of_3000_jobs_keeps_a_bounded_number_of_results_and_writes_the_metrics_of_every_one(server, tmp_path):
    urls = [server.add_file(f"/f/{i:05d}.bin", b"0123456789") for i in range(JOBS - MISSING)]
    urls += [f"{server.url}/missing/{i:05d}.bin" for i in range(MISSING)]  # 404: failed, not retried
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("".join(u + "\n" for u in urls))
    runtime = Runtime.from_options(config_path=None, cli=FlagLayer(source="cli"), environ={},
                                   run_overrides={"workers": 4, "processes": 2, "progress": False, "durability": "none"})
    report = Run(runtime, tmp_path / "out", read_jobs(str(jobs)), store_factory=open_job_store).execute()

    assert report.metrics["processes"] == 2 and min(report.metrics["jobs_per_process"]) > 0  # tallies of both merged
    assert len(report.results) <= KEEP_FAILED + KEEP_OTHERS < JOBS
    assert sum(r.outcome == "failed" for r in report.results) == KEEP_FAILED
    assert report.dropped == JOBS - len(report.results)
    rows = list(iter_rows(tmp_path / "out" / "manifest.jsonl"))
    assert len(rows) == JOBS
    written = json.loads((tmp_path / "out" / "manifest.metrics.json").read_text())
    expected = _expected_from_manifest(rows)
    assert {key: written[key] for key in expected} == expected
    assert written["outcomes"]["failed"] == MISSING and written["outcomes"]["downloaded"] == JOBS - MISSING
    decisions = sum(r["attempts"] for r in rows)  # one resume decision per attempt
    assert written["decision_log_share"] == round(min(written["resume_decisions_logged"], decisions) / decisions, 4)
    assert report.exit_code == 1


def _result(i: int, outcome: str, **fields) -> JobResult:
    return JobResult(outcome=outcome, job=Job(urls=(f"http://h/{i}",)), job_key=f"k{i}", elapsed_ms=float(i), **fields)


def test_tallies_merge_to_the_counts_of_one_and_keep_within_the_limits(monkeypatch):
    """A worker process's tallies, taken in batches and merged in the parent, count as one tally of every result."""
    monkeypatch.setattr(tally_module, "KEEP_FAILED", 3)
    monkeypatch.setattr(tally_module, "KEEP_OTHERS", 2)
    results = [_result(i, "failed" if i % 3 == 0 else "downloaded", reason="http_404" if i % 3 == 0 else None,
                       decisions=("revalidate",) if i % 5 == 0 else ("fresh",), plugins={"stream_io": "streaming"},
                       bytes_downloaded=i, size=i) for i in range(20)]
    whole = Tally()
    whole.add_all(results)
    child, parent = Tally(), Tally()
    for start in range(0, 20, 7):  # batches, as a worker process sends them
        child.add_all(results[start:start + 7])
        parent.merge(child.take())
    assert child.jobs == 0 and not child.kept_failed
    for name in ("jobs", "outcomes", "failures", "bytes_downloaded", "sizes", "decisions", "conditional", "revalidations",
                 "plugins", "dropped"):
        assert getattr(parent, name) == getattr(whole, name), name
    assert sorted(parent.latencies) == sorted(whole.latencies)
    assert [r.job_key for r in parent.results] == [r.job_key for r in whole.results] == ["k0", "k3", "k6", "k1", "k2"]
    assert whole.dropped == 20 - 5
    assert whole.latency_ms(0.5) == 10.0 and whole.latency_ms(1.0) == 19.0
