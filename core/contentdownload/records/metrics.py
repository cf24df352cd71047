"""``manifest.metrics.json``: totals of the last run and of all runs in the folder.

The top-level keys describe the last run (``"scope": "last run"``); ``folder_totals``
(``"scope": "all runs in this folder"``) adds every run's counts to the totals the file
held before. Written atomically, also when jobs failed.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Iterable

from contentdownload.hooks.model import OUTCOMES, JobResult
from contentdownload.machinery.telemetry import Telemetry

DECISION_EVENT = "streaming_resume_decision"
CONDITIONAL_MODES = frozenset({"resume", "revalidate"})
LAST_RUN, FOLDER = "last run", "all runs in this folder"
#: Counts of a run that add up over the runs of a folder.
_SUMMED = ("jobs", "bytes_downloaded", "elapsed_s", "revalidations", "conditional_requests",
           "resume_decisions_logged", "sha256_mismatches", "not_modified_as_errors", "failed_fallbacks")


def peak_rss_mb() -> float:
    """Peak resident set size of this process, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return round(ordered[index], 3)


def build_metrics(
    results: Iterable[JobResult],
    telemetry: Telemetry,
    *,
    run_id: str,
    elapsed_s: float,
    decisions_logged: int,
    extra: dict | None = None,
) -> dict:
    """Everything ``manifest.metrics.json`` holds, from the run's results and hook telemetry."""
    results = list(results)
    outcomes = Counter(r.outcome for r in results)
    reasons = Counter(r.reason for r in results if r.outcome == "failed")
    bytes_downloaded = sum(r.bytes_downloaded for r in results)
    decisions = [d for r in results for d in r.decisions]
    conditional = sum(1 for d in decisions if d in CONDITIONAL_MODES)
    revalidations = [r for r in results if "revalidate" in r.decisions]
    answered_304 = sum(1 for r in revalidations if r.outcome == "not_modified")
    latencies = [r.elapsed_ms for r in results if r.outcome != "skipped"]
    sha_mismatches = reasons.get("sha256_mismatch", 0)
    metrics = {
        "schema_version": 1,
        "scope": LAST_RUN,
        "run_id": run_id,
        "jobs": len(results),
        "outcomes": {o: outcomes.get(o, 0) for o in OUTCOMES},
        "failures_by_reason": dict(sorted(reasons.items())),
        "bytes_downloaded": bytes_downloaded,
        "elapsed_s": round(elapsed_s, 3),
        "throughput_bytes_per_s": round(bytes_downloaded / elapsed_s, 1) if elapsed_s > 0 else 0.0,
        "files_per_s": round(len(results) / elapsed_s, 3) if elapsed_s > 0 else 0.0,
        "cache_hit_rate": round(answered_304 / len(revalidations), 4) if revalidations else None,
        "revalidations": len(revalidations),
        "not_modified_as_errors": sum(1 for r in results if r.outcome == "failed" and r.http_status == 304),
        "sha256_mismatches": sha_mismatches,
        "conditional_requests": conditional,
        "resume_decisions_logged": decisions_logged,
        "decision_log_share": round(min(decisions_logged, len(decisions)) / len(decisions), 4) if decisions else None,
        "latency_ms": {
            "p50": _percentile(latencies, 0.50),
            "p90": _percentile(latencies, 0.90),
            "p99": _percentile(latencies, 0.99),
            "max": _percentile(latencies, 1.0),
        },
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "hooks": telemetry.snapshot(),
        "failed_fallbacks": sum(
            1 for r in results if r.outcome == "failed" and r.reason in ("no_plugin", "stage_failed")
        ),
        "plugins_answered": dict(sorted(Counter(f"{h}={p}" for r in results for h, p in r.plugins.items() if p).items())),
    }
    metrics.update(telemetry.seed_metrics())
    if extra:
        metrics.update(extra)
    return metrics


def previous_totals(path: Path) -> dict:
    """The folder totals an earlier run wrote to ``path`` (empty when there are none or the file is unreadable)."""
    try:
        totals = json.loads(path.read_text(encoding="utf-8")).get("folder_totals")
    except (OSError, ValueError, AttributeError):
        return {}
    return totals if isinstance(totals, dict) else {}


def with_folder_totals(metrics: dict, previous: dict) -> dict:
    """``metrics`` (the last run) with ``folder_totals``: ``previous`` plus this run's counts."""
    totals: dict = {"scope": FOLDER, "runs": int(previous.get("runs", 0)) + 1}
    for key in _SUMMED:
        totals[key] = round(previous.get(key, 0) + metrics.get(key, 0), 3)
    before = previous.get("outcomes") or {}
    totals["outcomes"] = {o: before.get(o, 0) + metrics["outcomes"].get(o, 0) for o in OUTCOMES}
    return {**metrics, "folder_totals": totals}


def write_metrics(path: Path, metrics: dict) -> None:
    """Write ``metrics`` to ``path`` atomically (temp file, fsync, rename), mode 0644.

    The rename replaces a symlink at ``path`` instead of writing through it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".metrics-", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # like every other file of the output folder (mkstemp makes 0600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(metrics, fh, indent=2, sort_keys=True, default=str)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
