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
from pathlib import Path

from contentdownload.hooks.model import OUTCOMES
from contentdownload.machinery.telemetry import Telemetry
from contentdownload.records.tally import Tally

DECISION_EVENT = "streaming_resume_decision"
LAST_RUN, FOLDER = "last run", "all runs in this folder"
#: Counts of a run that add up over the runs of a folder.
_SUMMED = ("jobs", "bytes_downloaded", "elapsed_s", "revalidations", "conditional_requests",
           "resume_decisions_logged", "sha256_mismatches", "not_modified_as_errors", "failed_fallbacks")


def peak_rss_mb() -> float:
    """Peak resident set size of this process, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def build_metrics(
    tally: Tally,
    telemetry: Telemetry,
    *,
    run_id: str,
    elapsed_s: float,
    decisions_logged: int,
    extra: dict | None = None,
) -> dict:
    """Everything ``manifest.metrics.json`` holds, from the run's tally of results and hook telemetry."""
    jobs, failures = tally.jobs, tally.failures
    decisions = tally.decisions
    metrics = {
        "schema_version": 1,
        "scope": LAST_RUN,
        "run_id": run_id,
        "jobs": jobs,
        "outcomes": {o: tally.outcomes.get(o, 0) for o in OUTCOMES},
        "failures_by_reason": dict(sorted(failures.items())),
        "bytes_downloaded": tally.bytes_downloaded,
        "elapsed_s": round(elapsed_s, 3),
        "throughput_bytes_per_s": round(tally.bytes_downloaded / elapsed_s, 1) if elapsed_s > 0 else 0.0,
        "files_per_s": round(jobs / elapsed_s, 3) if elapsed_s > 0 else 0.0,
        "cache_hit_rate": round(tally.answered_304 / tally.revalidations, 4) if tally.revalidations else None,
        "revalidations": tally.revalidations,
        "not_modified_as_errors": tally.not_modified_as_errors,
        "sha256_mismatches": failures.get("sha256_mismatch", 0),
        "conditional_requests": tally.conditional,
        "resume_decisions_logged": decisions_logged,
        "decision_log_share": round(min(decisions_logged, decisions) / decisions, 4) if decisions else None,
        "latency_ms": {"p50": tally.latency_ms(0.50), "p90": tally.latency_ms(0.90), "p99": tally.latency_ms(0.99),
                       "max": tally.latency_ms(1.0)},
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "hooks": telemetry.snapshot(),
        "failed_fallbacks": failures.get("no_plugin", 0) + failures.get("stage_failed", 0),
        "plugins_answered": dict(sorted(tally.plugins.items())),
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
