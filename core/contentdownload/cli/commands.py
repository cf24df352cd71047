"""Subcommands beyond ``plugins`` and ``status``: ``run``, ``demo``, ``compare``, ``jobs``, ``gc``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from contentdownload.cli import parser as cli
from contentdownload.cli.parser import EXIT_FAILED, EXIT_OK, _print_json, _table, runtime_from_args
from contentdownload.machinery.config import check_run_value
from contentdownload.errors import ConfigError, UsageError
from contentdownload.records.log import close_logging, configure_logging
from contentdownload.cli.progress import human_bytes

# -- run -----------------------------------------------------------------------------

RUN_FLAGS = {
    # flag dest -> run setting
    "max": "max_jobs",
    "workers": "workers",
    "per_host": "per_host",
    "db": "db",
    "max_bytes": "max_bytes",
    "retries": "retries",
    "timeout": "timeout",
    "connect_timeout": "connect_timeout",
    "lease_ttl": "lease_ttl",
    "store_retry_s": "store_retry_s",
    "log_level": "log_level",
}


def _run_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for dest, key in RUN_FLAGS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        flag = "--" + dest.replace("_", "-")
        try:
            overrides[key] = check_run_value(key, value, flag)
        except ConfigError as exc:
            raise UsageError(str(exc).replace(f"{flag}: run.{key}", flag)) from None
    if args.revalidate:
        overrides["revalidate"] = True
    if args.retry_failed:
        overrides["retry_failed"] = True
    if args.no_progress:
        overrides["progress"] = False
    return overrides


def print_summary(report: Any, stream=None) -> None:
    stream = stream or sys.stdout
    m = report.metrics
    rows = [[o, str(n)] for o, n in m["outcomes"].items() if n]
    print(_table(rows, ["OUTCOME", "JOBS"]), file=stream)
    for reason, n in m["failures_by_reason"].items():
        print(f"  failed: {reason}: {n}", file=stream)
    print(
        f"{m['jobs']} jobs, {human_bytes(m['bytes_downloaded'])} in {m['elapsed_s']:.1f} s "
        f"({human_bytes(m['throughput_bytes_per_s'])}/s); manifest: {report.workspace.manifest}",
        file=stream,
    )
    if m.get("interrupted"):
        print("interrupted: parts are kept; run the same command again to finish", file=stream)


def cmd_run(args: argparse.Namespace) -> int:
    from contentdownload.jobs.inputs import read_jobs
    from contentdownload.jobs.runner import Run

    runtime = runtime_from_args(args, _run_overrides(args))
    entries = read_jobs(args.input)  # unreadable input: exit 2 before anything is written
    if args.resume_from:
        from contentdownload.records.manifest import read_manifest

        read_manifest(args.resume_from)  # a missing manifest is a usage error, before any download
    if args.dry_run:
        return _dry_run(runtime, args, entries)
    from contentdownload.jobs.workspace import Workspace

    ws = Workspace.open(args.out)  # a bad --out is a usage error before anything is written
    configure_logging(runtime.settings.log_level, ws.logs / "download.log")
    try:
        report = Run(runtime, ws.out, entries, resume_from=args.resume_from, install_signal_handlers=True).execute()
    finally:
        close_logging()
    print_summary(report)
    return report.exit_code


def _dry_run(runtime: Any, args: argparse.Namespace, entries: list) -> int:
    from contentdownload.jobs.inputs import BadLine
    from contentdownload.records.manifest import read_manifest
    from contentdownload.hooks.model import Job
    from contentdownload.jobs.planner import plan_jobs
    from contentdownload.store import open_store
    from contentdownload.jobs.workspace import Workspace

    ws = Workspace.open(args.out, create=False)
    db = runtime.settings.db or (ws.default_db if (ws.hidden / "jobs.db").exists() else None)
    store = open_store(db if db and runtime.policy.streaming_schema.enabled else "memory:")
    try:
        jobs = [e for e in entries if isinstance(e, Job)][: runtime.settings.max_jobs]
        resume_from = read_manifest(args.resume_from) if args.resume_from else None
        plan = plan_jobs(runtime, store, ws, jobs, revalidate=runtime.settings.revalidate, resume_from=resume_from, dry_run=True)
    finally:
        store.close()
    rows = []
    for result in plan.settled:
        rows.append([result.outcome, result.reason, result.job.url, str(result.path or "-")])
    for item in plan.items.values():
        parts = ws.parts_of(item.key.key)
        action = "revalidate" if item.revalidate and item.record else f"resume from {parts[0][1].stat().st_size} bytes" if parts else "download"
        winners = ",".join(f"{h}={s.winner}" for h, s in runtime.policy.plan(item.identity).items())
        rows.append([action, winners, item.job.url, item.relative_path])
    for bad in (e for e in entries if isinstance(e, BadLine)):
        rows.append(["fail", f"line {bad.line}: {bad.reason}", bad.text, "-"])
    print(_table(rows, ["ACTION", "DETAIL", "URL", "PATH"]))
    print(f"dry run: {len(rows)} jobs planned, nothing downloaded")
    return EXIT_OK


def add_run(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("run", parents=[common], help="download a job list into a folder")
    p.add_argument("input", metavar="INPUT", help="text file of URLs, JSONL file of jobs, or - for stdin")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--max", type=int, metavar="N", help="only the first N jobs")
    p.add_argument("--workers", type=int, metavar="N", help="concurrent transfers (default 4)")
    p.add_argument("--per-host", type=int, metavar="N", help="concurrent transfers per host (default 4)")
    p.add_argument("--resume-from", metavar="MANIFEST", help="an earlier manifest: what is done, and the validators to send")
    p.add_argument("--db", metavar="URL", help="job store: sqlite:///path or postgresql://... (default: SQLite in DIR/.contentdownload)")
    p.add_argument("--max-bytes", type=int, metavar="N", help="abort a body larger than N bytes")
    p.add_argument("--retries", type=int, metavar="N", help="retries of a transfer per candidate URL (default 5)")
    p.add_argument("--timeout", type=float, metavar="S", help="read timeout in seconds (default 60)")
    p.add_argument("--connect-timeout", type=float, metavar="S", help="connect timeout in seconds (default 10)")
    p.add_argument("--lease-ttl", type=float, metavar="S", help="job lease length in seconds (default 60)")
    p.add_argument("--store-retry-s", type=float, metavar="S",
                   help="how long to keep retrying while the job store is unreachable (default 300)")
    p.add_argument("--revalidate", action="store_true", help="send conditional requests for finished files instead of skipping them")
    p.add_argument("--retry-failed", action="store_true", help="retry jobs that failed for good in earlier runs")
    p.add_argument("--log-level", metavar="LEVEL", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    p.add_argument("--dry-run", action="store_true", help="plan and print decisions; download nothing")
    p.set_defaults(func=cmd_run)


# -- compare -------------------------------------------------------------------------


def _load_metrics(folder: str) -> dict:
    path = Path(folder)
    path = path / "manifest.metrics.json" if path.is_dir() else path
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"no metrics at {path}: run `contentdownload run ... --out {folder}` first") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not valid JSON: {exc.msg}") from None


def _change(a: float | None, b: float | None) -> float | None:
    if a in (None, 0) or b is None:
        return None
    return round((b - a) / a * 100, 1)


def compare_metrics(a: dict, b: dict) -> dict:
    """The seed's success criteria, B (candidate) against A (baseline)."""
    criteria = []

    def check(name: str, ok: bool | None, detail: str) -> None:
        criteria.append({"criterion": name, "ok": ok, "detail": detail})

    share = b.get("decision_log_share")
    check("resume decision logged for > 50% of conditional requests", None if share is None else share > 0.5,
          "no conditional requests in B" if share is None else f"{share:.0%} of {b.get('conditional_requests')} in B")
    hit_a, hit_b = a.get("cache_hit_rate"), b.get("cache_hit_rate")
    check("cache hit rate not lower", None if hit_a is None or hit_b is None else hit_b >= hit_a,
          f"A {hit_a if hit_a is not None else 'n/a'}, B {hit_b if hit_b is not None else 'n/a'}")
    check("no 304 turned into an error", b.get("not_modified_as_errors", 0) == 0, f"{b.get('not_modified_as_errors', 0)} in B")
    check("zero failed fallbacks", b.get("failed_fallbacks", 0) == 0, f"{b.get('failed_fallbacks', 0)} in B")
    check("SHA-256 mismatches 0", b.get("sha256_mismatches", 0) == 0, f"{b.get('sha256_mismatches', 0)} in B")
    keys = ["jobs", "bytes_downloaded", "throughput_bytes_per_s", "files_per_s", "cache_hit_rate", "peak_rss_mb",
            "streaming.resume_decisions_made", "streaming.resume_decisions_fallback", "streaming.resume_decision_errors",
            "streaming.average_decision_latency_ms"]
    side = {k: {"a": a.get(k), "b": b.get(k), "change_pct": _change(a.get(k), b.get(k)) if isinstance(a.get(k), (int, float)) else None} for k in keys}
    side["outcomes"] = {"a": a.get("outcomes"), "b": b.get("outcomes"), "change_pct": None}
    return {
        "criteria": criteria,
        "metrics": side,
        "throughput_change_pct": _change(a.get("throughput_bytes_per_s"), b.get("throughput_bytes_per_s")),
        "peak_memory_change_pct": _change(a.get("peak_rss_mb"), b.get("peak_rss_mb")),
        "passed": all(c["ok"] is not False for c in criteria),
    }


def cmd_compare(args: argparse.Namespace) -> int:
    report = compare_metrics(_load_metrics(args.run_a), _load_metrics(args.run_b))
    if args.json:
        _print_json(report)
    else:
        rows = [[k, str(v["a"]), str(v["b"]), "" if v["change_pct"] is None else f"{v['change_pct']:+.1f}%"] for k, v in report["metrics"].items() if k != "outcomes"]
        print(_table(rows, ["METRIC", "A", "B", "CHANGE"]))
        print()
        for c in report["criteria"]:
            mark = {True: "PASS", False: "FAIL", None: "n/a "}[c["ok"]]
            print(f"{mark}  {c['criterion']} ({c['detail']})")
        print(f"\nthroughput {report['throughput_change_pct']}%, peak memory {report['peak_memory_change_pct']}% (B against A)")
    return EXIT_OK if report["passed"] else EXIT_FAILED


def add_compare(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("compare", help="compare two runs' metrics against the rollout criteria (exit 1 when one fails)")
    p.add_argument("run_a", metavar="RUN_A", help="baseline output folder (or its manifest.metrics.json)")
    p.add_argument("run_b", metavar="RUN_B", help="candidate output folder (or its manifest.metrics.json)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_compare)


# -- jobs, gc ------------------------------------------------------------------------


def _store_from_args(args: argparse.Namespace) -> Any:
    from contentdownload.store import open_store
    from contentdownload.jobs.workspace import Workspace

    if args.db:
        return open_store(args.db)
    if not args.out:
        raise UsageError("give --db URL or --out DIR (the output folder whose store to use)")
    ws = Workspace.open(args.out, create=False)
    if not (ws.hidden / "jobs.db").exists():
        raise UsageError(f"no job store in {ws.out}: run `contentdownload run ... --out {args.out}` first")
    return open_store(ws.default_db)


def cmd_jobs(args: argparse.Namespace) -> int:
    store = _store_from_args(args)
    try:
        if args.jobs_command == "requeue":
            if not args.failed:
                raise UsageError("jobs requeue needs --failed")
            n = store.requeue_failed()
            print(json.dumps({"requeued": n}) if args.json else f"requeued {n} failed jobs")
            return EXIT_OK
        stats = store.stats()
    finally:
        store.close()
    if args.json:
        _print_json(stats)
        return EXIT_OK
    print(_table([[s, str(n)] for s, n in stats["by_state"].items()], ["STATE", "JOBS"]))
    oldest = stats["oldest_in_flight_s"]
    print(f"total {stats['total']}, expired leases {stats['expired_leases']}, "
          f"oldest in flight {'-' if oldest is None else f'{oldest:.0f} s'}")
    for reason, n in stats["failures_by_reason"].items():
        print(f"  failed: {reason}: {n}")
    return EXIT_OK


def add_jobs(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("jobs", help="job store: counts by state, expired leases, failures; requeue failed jobs")
    p.add_argument("jobs_command", nargs="?", choices=["requeue"], metavar="requeue", help="requeue jobs (with --failed)")
    p.add_argument("--failed", action="store_true", help="with requeue: the failed jobs")
    p.add_argument("--db", metavar="URL")
    p.add_argument("--out", metavar="DIR")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_jobs)


def cmd_gc(args: argparse.Namespace) -> int:
    from contentdownload.jobs.gc import collect

    store = _store_from_args(args)
    try:
        from contentdownload.jobs.workspace import Workspace

        removed = collect(store, Workspace.open(args.out, create=False), dry_run=args.dry_run)
    finally:
        store.close()
    if args.json:
        _print_json({"removed": [str(p) for p in removed["paths"]], "bytes": removed["bytes"], "dry_run": args.dry_run})
    else:
        verb = "would remove" if args.dry_run else "removed"
        for path in removed["paths"]:
            print(f"{verb} {path}")
        print(f"{verb} {len(removed['paths'])} orphaned files, {human_bytes(removed['bytes'])}")
    return EXIT_OK


def add_gc(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("gc", help="remove orphaned parts (no live job) from the staging folder")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--db", metavar="URL")
    p.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_gc)


# -- demo ----------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from contentdownload.cli.demo import run_demo

    return run_demo(args)


def add_demo(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("demo", parents=[common], help="offline end-to-end demo on a generated corpus served on loopback")
    p.add_argument("--out", default="demo-out", metavar="DIR", help="output folder (default ./demo-out)")
    p.add_argument("--files", type=int, default=12, metavar="N", help="files in the corpus (default 12)")
    p.add_argument("--json", action="store_true", help="print the demo's report as JSON")
    p.set_defaults(func=cmd_demo)


cli.SUBCOMMANDS.extend([add_run, add_demo, add_compare, add_jobs, add_gc])
