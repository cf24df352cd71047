"""Subcommands beyond ``plugins`` and ``status``: ``run``, ``demo``, ``compare``, ``jobs``, ``gc``."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from contentdownload.cli import parser as cli
from contentdownload.cli.parser import EXIT_FAILED, EXIT_OK, _print_json, _table
from contentdownload.errors import UsageError


def _log() -> Any:
    """This module's logger (imported when a command runs, so ``--help`` does not load the logging stack)."""
    from contentdownload.records.log import get_logger

    return get_logger(__name__)


def human_bytes(n: float) -> str:
    from contentdownload.cli.progress import human_bytes as human

    return human(n)


def redact_url(url: str) -> str:
    from contentdownload.transfer.urls import redact_url as redact

    return redact(url)

# -- run -----------------------------------------------------------------------------

RUN_FLAGS = {
    # flag dest -> run setting
    "max": "max_jobs",
    "workers": "workers",
    "per_host": "per_host",
    "processes": "processes",
    "durability": "durability",
    "transport": "transport",
    "db": "db",
    "max_bytes": "max_bytes",
    "retries": "retries",
    "timeout": "timeout",
    "connect_timeout": "connect_timeout",
    "low_speed_limit": "low_speed_limit",
    "low_speed_time": "low_speed_time",
    "max_time": "max_time",
    "lease_ttl": "lease_ttl",
    "store_retry_s": "store_retry_s",
    "log_level": "log_level",
    "header": "headers",
    "user_agent": "user_agent",
    "cookie": "cookies",
    "cookie_jar": "cookie_jar",
    "proxy": "proxy",
    "ca_bundle": "ca_bundle",
    "host_rate": "host_rate",
    "limit_rate": "limit_rate",
    "signing_param": "signing_params",
}
#: run setting -> the flag that sets it (for messages and ``contentdownload config``)
SETTING_FLAGS = {key: "--" + dest.replace("_", "-") for dest, key in RUN_FLAGS.items()}
SETTING_FLAGS.update(revalidate="--revalidate", accept_any_content="--accept-any-content", retry_failed="--retry-failed",
                     progress="--no-progress", verify_tls="--insecure")


def _run_overrides(args: argparse.Namespace) -> dict[str, Any]:
    from contentdownload.machinery.config import check_option

    overrides: dict[str, Any] = {}
    for dest, key in RUN_FLAGS.items():
        value = getattr(args, dest, None)
        if value is not None:
            overrides[key] = check_option(key, value, SETTING_FLAGS[key])
    for dest, key, value in (("revalidate", "revalidate", True), ("accept_any_content", "accept_any_content", True),
                             ("retry_failed", "retry_failed", True),
                             ("no_progress", "progress", False), ("quiet", "progress", False), ("insecure", "verify_tls", False)):
        if getattr(args, dest, False):
            overrides[key] = value
    return overrides


def _runtime(args: argparse.Namespace) -> Any:
    from contentdownload.machinery.runtime import Runtime

    return Runtime.from_options(config_path=args.config, cli=cli.cli_layer(args), run_overrides=_run_overrides(args),
                                override_label=lambda key: SETTING_FLAGS.get(key, key))


def looks_like_url(text: str) -> bool:
    """Whether a command-line argument is a URL to fetch (``http://`` or ``https://``) rather than a job list."""
    return text[:8].lower().startswith(("http://", "https://"))


def _url_job(url: str, filename: str | None = None) -> Any:
    from contentdownload.hooks.model import Job
    from contentdownload.transfer.urls import canonical_url

    canonical_url(url)  # a malformed URL on the command line is a usage error (exit 2)
    return Job(urls=(url,), filename=filename)


def _entries(args: argparse.Namespace) -> list:
    """Jobs from the URL and list-file arguments and ``-i`` lists, in the order given."""
    from contentdownload.jobs.inputs import read_jobs

    sources = [*args.inputs, *(args.input_file or [])]
    if not sources:
        raise UsageError("give URLs or a job list file (or - for stdin): contentdownload run URL... --out DIR")
    entries: list = []
    for source in sources:
        entries.extend([_url_job(source)] if looks_like_url(source) else read_jobs(source))
    return entries


def _check_requests(runtime: Any) -> None:
    """Refuse a bad cookie file or CA bundle before anything is written; say once that TLS is not checked."""
    from contentdownload.transfer.options import INSECURE_WARNING, client_options

    client_options(runtime.settings, runtime.environ)
    if not runtime.settings.verify_tls:
        print(INSECURE_WARNING, file=sys.stderr)


def _single_host_notice(runtime: Any, entries: list) -> str | None:
    """A notice when ``--workers`` cannot be reached because every job is on one host and ``--per-host`` is lower."""
    from urllib.parse import urlsplit

    settings = runtime.settings
    hosts = {(urlsplit(e.urls[0]).hostname or "").lower() for e in entries if getattr(e, "urls", None)}
    if len(hosts) == 1 and settings.workers > settings.per_host:
        return (f"contentdownload: notice: every job is on {hosts.pop()}: at most --per-host {settings.per_host} "
                f"of the {settings.workers} workers transfer at once (raise --per-host to use them all)")
    return None


def _slow_rate_notice(runtime: Any, entries: list) -> str | None:
    """A notice when ``--limit-rate`` shared by the transfers running at once is below ``--low-speed-limit``:
    each transfer would then be cut as ``too_slow`` (as curl does with ``--limit-rate`` under ``--speed-limit``)."""
    settings = runtime.settings
    at_once = max(1, min(settings.workers, len(entries)))
    if settings.limit_rate and settings.low_speed_limit and settings.limit_rate / at_once < settings.low_speed_limit:
        return (f"contentdownload: notice: --limit-rate {settings.limit_rate} B/s over {at_once} transfers at once is "
                f"under --low-speed-limit {settings.low_speed_limit} B/s each: transfers may end as too_slow "
                "(lower --low-speed-limit, or use fewer --workers)")
    return None


def _log_run_start(runtime: Any, entries: list) -> None:
    from contentdownload.version import __version__
    from contentdownload.hooks.model import HOOKS

    settings = runtime.settings_report()["settings"]
    _log().info("run_started", version=__version__, jobs=len(entries), settings={k: v["value"] for k, v in settings.items()},
             winners={hook: runtime.policy.select(hook).winner for hook in HOOKS})


def _execute(runtime: Any, args: argparse.Namespace, entries: list, out: str | Path, resume_from: str | None = None) -> Any:
    from contentdownload.jobs.runner import Run
    from contentdownload.jobs.workspace import Workspace
    from contentdownload.records.guard import RunLock, check_records
    from contentdownload.records.log import close_logging, configure_logging, log_traceback

    ws = Workspace.open(out)  # a bad --out is a usage error before anything is written
    check_records(ws.out, ws.logs, (ws.manifest, ws.metrics, ws.logs / "download.log"))
    with contextlib.ExitStack() as stack:
        if not runtime.policy.streaming_schema.enabled:  # no store to share: one process per folder
            stack.enter_context(RunLock(ws.hidden / "run.lock"))
        level = runtime.settings.log_level
        stderr_level = level if args.verbose else "ERROR" if args.quiet else "WARNING"
        configure_logging(level, ws.logs / "download.log", stderr_level=stderr_level)
        stack.callback(close_logging)
        _notices(runtime, args, entries)
        _log_run_start(runtime, entries)
        try:
            report = Run(runtime, ws.out, entries, resume_from=resume_from, install_signal_handlers=True).execute()
        except Exception as exc:  # noted in the log file while it is open; the CLI's guard prints one line
            log_traceback("run failed", exc)
            raise
        for line in (*report.record_errors, *([report.error] if report.error else [])):
            print(f"contentdownload: {line}", file=sys.stderr)
        m = report.metrics
        _log().info("run_finished", exit_code=report.exit_code, jobs=m["jobs"], outcomes=m["outcomes"],
                 failures_by_reason=m["failures_by_reason"], bytes_downloaded=m["bytes_downloaded"],
                 elapsed_s=m["elapsed_s"], interrupted=bool(m.get("interrupted")))
        return report


def _notices(runtime: Any, args: argparse.Namespace, entries: list) -> None:
    """Settings that cannot do what they say for this job list: a log line each, and one line on stderr unless ``-q``."""
    settings = runtime.settings
    found = ((_single_host_notice(runtime, entries), "workers_above_per_host", {"workers": settings.workers, "per_host": settings.per_host}),
             (_slow_rate_notice(runtime, entries), "limit_rate_below_low_speed_limit",
              {"limit_rate": settings.limit_rate, "low_speed_limit": settings.low_speed_limit}))
    for notice, event, fields in found:
        if notice:
            _log().info(event, **fields)
            if not args.quiet:
                print(notice, file=sys.stderr)


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
    for host, seen in m.get("throttled_hosts", {}).items():
        times = "time" if seen["responses"] == 1 else "times"
        print(f"throttled: {host} asked to wait {seen['responses']} {times} ({seen['paused_s']:.1f} s in all)", file=stream)
    if report.left:
        print(f"{report.left} of {report.planned} planned jobs left: {report.left_reason}; "
              "parts are kept, run the same command again to finish", file=stream)
    elif m.get("interrupted"):
        print("interrupted: parts are kept; run the same command again to finish", file=stream)


def cmd_run(args: argparse.Namespace) -> int:
    runtime = _runtime(args)
    entries = _entries(args)  # unreadable input: exit 2 before anything is written
    if args.resume_from:
        from contentdownload.records.manifest import read_manifest

        read_manifest(args.resume_from)  # a missing manifest is a usage error, before any download
    if args.dry_run:
        return _dry_run(runtime, args, entries)
    _check_requests(runtime)
    report = _execute(runtime, args, entries, args.out, resume_from=args.resume_from)
    if args.json:
        _print_json({**report.metrics, "manifest": str(report.workspace.manifest), "exit_code": report.exit_code})
    elif not args.quiet:
        print_summary(report)
    return report.exit_code


def cmd_get(args: argparse.Namespace) -> int:
    target = Path(args.output).expanduser() if args.output else None
    if target is not None and target.is_dir():
        out, filename = target, None
    else:
        out, filename = (args.out or (target.parent if target else ".")), (target.name if target else None)
    runtime = _runtime(args)
    entries = [_url_job(args.url, filename)]
    _check_requests(runtime)
    report = _execute(runtime, args, entries, out)
    for result in report.results:
        if result.ok and not args.quiet:
            print(f"{result.outcome}: {result.path}")
        elif not result.ok:
            print(f"failed: {result.reason}: {redact_url(args.url)}", file=sys.stderr)
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
        rows.append([result.outcome, result.reason, redact_url(result.job.url), str(result.path or "-")])
    for item in plan.items.values():
        parts = ws.parts_of(item.key.key)
        action = "revalidate" if item.revalidate and item.record else f"resume from {parts[0][1].stat().st_size} bytes" if parts else "download"
        winners = ",".join(f"{h}={s.winner}" for h, s in runtime.policy.plan(item.identity).items())
        rows.append([action, winners, redact_url(item.job.url), item.relative_path])
    for bad in (e for e in entries if isinstance(e, BadLine)):
        rows.append(["fail", f"line {bad.line}: {bad.reason}", bad.text, "-"])
    print(_table(rows, ["ACTION", "DETAIL", "URL", "PATH"]))
    print(f"dry run: {len(rows)} jobs planned, nothing downloaded")
    return EXIT_OK


def add_request_options(p: argparse.ArgumentParser) -> None:
    """Flags shared by ``run`` and ``get``: what every request carries, timeouts, output verbosity."""
    g = p.add_argument_group("requests")
    g.add_argument("--header", action="append", metavar="'NAME: VALUE'", help="send this header with every request (repeatable)")
    g.add_argument("--user-agent", metavar="TEXT", help="User-Agent header (default contentdownload/VERSION)")
    g.add_argument("--cookie", action="append", metavar="NAME=VALUE", help="send this cookie to every host (repeatable)")
    g.add_argument("--cookie-jar", metavar="FILE", help="cookies from a Netscape cookie file (as curl -b and wget --load-cookies read)")
    g.add_argument("--proxy", metavar="URL", help="proxy for http and https (default: HTTP_PROXY / HTTPS_PROXY / NO_PROXY)")
    g.add_argument("--ca-bundle", metavar="FILE", help="trust the CA certificates in FILE (beats REQUESTS_CA_BUNDLE and SSL_CERT_FILE)")
    g.add_argument("--insecure", action="store_true", help="do not verify TLS certificates (one warning is printed)")
    g.add_argument("--limit-rate", metavar="RATE", help="body bytes per second for the whole run, such as 500k or 2M (as wget and curl)")
    g.add_argument("--host-rate", type=float, metavar="R", help="requests per second per host, spaced evenly (no bursts)")
    g.add_argument("--signing-param", action="append", metavar="NAME",
                   help="a query parameter that signs or expires URLs, besides the known ones: no part of a job's identity, never written (repeatable)")
    g.add_argument("--max-bytes", type=int, metavar="N", help="abort a body larger than N bytes")
    g.add_argument("--retries", type=int, metavar="N", help="retries of a transfer per candidate URL (default 5)")
    g.add_argument("--timeout", type=float, metavar="S", help="read timeout in seconds (default 60)")
    g.add_argument("--connect-timeout", type=float, metavar="S", help="connect timeout in seconds (default 10)")
    g.add_argument("--low-speed-limit", type=int, metavar="BYTES",
                   help="with --low-speed-time: an attempt slower than BYTES a second ends as too_slow, its part kept (default 1000; 0: no limit)")
    g.add_argument("--low-speed-time", type=float, metavar="S", help="seconds an attempt may stay under --low-speed-limit (default 60)")
    g.add_argument("--max-time", type=float, metavar="S", help="an attempt longer than S seconds ends as max_time, its part kept (default: no limit)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress, no summary; errors only")
    p.add_argument("-v", "--verbose", action="store_true", help="also print log lines (at --log-level) on stderr")
    p.add_argument("--log-level", metavar="LEVEL", help="DEBUG, INFO, WARNING or ERROR (default INFO)")


def add_run(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("run", parents=[common], help="download URLs or job lists into a folder", intermixed=True)
    p.add_argument("inputs", nargs="*", metavar="URL|LIST", help="http(s) URLs to fetch, or job lists: a text file of URLs, a JSONL file of jobs, - for stdin")
    p.add_argument("-i", "--input-file", action="append", metavar="LIST", help="a job list (repeatable)")
    p.add_argument("-P", "--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout (and nothing else)")
    p.add_argument("--max", type=int, metavar="N", help="only the first N jobs")
    p.add_argument("--workers", type=int, metavar="N", help="concurrent transfers (default 4)")
    p.add_argument("--per-host", type=int, metavar="N", help="concurrent transfers per host (default 4)")
    p.add_argument("--processes", type=int, metavar="N",
                   help="worker processes sharing the job store, each with --workers threads (default: one per core, "
                        "each with at least 256 jobs)")
    p.add_argument("--durability", choices=("file", "batch", "none"),
                   help="file: fsync each file and its folder; batch (default): the same, with one folder fsync for the "
                        "files finishing together; none: no fsync (survives a crash of the process, not of the machine)")
    p.add_argument("--transport", choices=("auto", "sync"),
                   help="auto (default): jobs claimed for the first time run on an event loop per process, claimed and "
                        "recorded in batches; sync: every job in a worker thread through requests (the simpler path)")
    p.add_argument("--resume-from", metavar="MANIFEST", help="an earlier manifest: what is done, and the validators to send")
    p.add_argument("--db", metavar="URL", help="job store: sqlite:///path or postgresql://... (default: SQLite in DIR/.contentdownload)")
    add_request_options(p)
    p.add_argument("--lease-ttl", type=float, metavar="S", help="job lease length in seconds (default 60)")
    p.add_argument("--store-retry-s", type=float, metavar="S",
                   help="how long to keep retrying while the job store is unreachable (default 300)")
    p.add_argument("--revalidate", action="store_true", help="send conditional requests for finished files instead of skipping them")
    p.add_argument("--accept-any-content", action="store_true",
                   help="save a body whatever its first bytes show (by default an HTML page where the job expects a PDF fails as unexpected_content)")
    p.add_argument("--retry-failed", action="store_true", help="retry jobs that failed for good in earlier runs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    p.add_argument("--dry-run", action="store_true", help="plan and print decisions; download nothing")
    p.set_defaults(func=cmd_run)


def add_get(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("get", parents=[common], help="download one URL")
    p.add_argument("url", metavar="URL")
    p.add_argument("-o", "--output", metavar="FILE", help="save as FILE (default: a name from the URL, in the current folder)")
    p.add_argument("-P", "--out", metavar="DIR", help="output folder (default: FILE's folder, else the current folder)")
    add_request_options(p)
    p.set_defaults(func=cmd_get)


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
        "unmeasured": [c["criterion"] for c in criteria if c["ok"] is None],
    }


def _throughput_line(report: dict) -> str:
    change = report["throughput_change_pct"]
    throughput = "not measured (a run downloaded nothing)" if change in (None, -100.0) else f"{change}%"
    return f"throughput {throughput}, peak memory {report['peak_memory_change_pct']}% (B against A)"


def cmd_compare(args: argparse.Namespace) -> int:
    """Exit 0 when every criterion is met; 1 when one fails, or was not measured (no cases) without ``--allow-unmeasured``."""
    report = compare_metrics(_load_metrics(args.run_a), _load_metrics(args.run_b))
    report["passed"] = report["passed"] and (args.allow_unmeasured or not report["unmeasured"])
    if args.json:
        _print_json(report)
    else:
        rows = [[k, str(v["a"]), str(v["b"]), "" if v["change_pct"] is None else f"{v['change_pct']:+.1f}%"] for k, v in report["metrics"].items() if k != "outcomes"]
        print(_table(rows, ["METRIC", "A", "B", "CHANGE"]))
        print()
        for c in report["criteria"]:
            mark = {True: "PASS", False: "FAIL", None: "not measured"}[c["ok"]]
            print(f"{mark}  {c['criterion']} ({c['detail']})")
        print("\n" + _throughput_line(report))
    return EXIT_OK if report["passed"] else EXIT_FAILED


def add_compare(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("compare", help="compare two runs' metrics against the rollout criteria (exit 1 when one fails)")
    p.add_argument("run_a", metavar="RUN_A", help="baseline output folder (or its manifest.metrics.json)")
    p.add_argument("run_b", metavar="RUN_B", help="candidate output folder (or its manifest.metrics.json)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--allow-unmeasured", action="store_true", help="pass when a criterion had no cases (default: exit 1, it was not measured)")
    p.set_defaults(func=cmd_compare)


# -- jobs, gc ------------------------------------------------------------------------


def _store_from_args(args: argparse.Namespace) -> Any:
    from contentdownload.errors import DamagedStoreError
    from contentdownload.jobs.rebuild import damaged
    from contentdownload.jobs.workspace import Workspace
    from contentdownload.store import open_store

    ws = Workspace.open(args.out, create=False) if args.out else None
    try:
        if args.db:
            return open_store(args.db)
        if ws is None:
            raise UsageError("give --db URL or --out DIR (the output folder whose store to use)")
        if not (ws.hidden / "jobs.db").exists():
            raise UsageError(f"no job store in {ws.out}: run `contentdownload run ... --out {args.out}` first")
        return open_store(ws.default_db)
    except DamagedStoreError as exc:
        raise damaged(exc, ws.out if ws else Path("DIR"), args.db) from None


def cmd_jobs(args: argparse.Namespace) -> int:
    command = {"requeue": _jobs_requeue, "rebuild": _jobs_rebuild, "verify": _jobs_verify}.get(args.jobs_command)
    if command is not None:
        return command(args)
    store = _store_from_args(args)
    try:
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
    if len(stats["by_location"]) > 1:
        _print_locations(stats["by_location"])
    return EXIT_OK


def _print_locations(by_location: dict) -> None:
    """Counts per output folder of a store several folders share."""
    states = list(next(iter(by_location.values())))
    rows = [[location, *(str(counts[s]) for s in states)] for location, counts in sorted(by_location.items())]
    print()
    print(_table(rows, ["LOCATION", *(s.upper() for s in states)]))


def _jobs_requeue(args: argparse.Namespace) -> int:
    if not args.failed:
        raise UsageError("jobs requeue needs --failed")
    store = _store_from_args(args)
    try:
        n = store.requeue_failed()
    finally:
        store.close()
    print(json.dumps({"requeued": n}) if args.json else f"requeued {n} failed jobs")
    return EXIT_OK


def _jobs_rebuild(args: argparse.Namespace) -> int:
    """Move a damaged SQLite store aside (renamed, never deleted) and rebuild it from the manifest and the files."""
    from contentdownload.jobs.rebuild import move_aside, rebuild_from_manifest
    from contentdownload.jobs.workspace import Workspace
    from contentdownload.store import open_store
    from contentdownload.store.sqlite import parse_sqlite_url

    if not args.out:
        raise UsageError("jobs rebuild needs --out DIR: the folder whose manifest and files are the record")
    ws = Workspace.open(args.out, create=False)
    if not ws.manifest.is_file():
        raise UsageError(f"no manifest in {ws.out}: nothing to rebuild the job store from")
    url = args.db or ws.default_db
    sqlite = url.lower().startswith("sqlite:")
    moved = move_aside(parse_sqlite_url(url)) if sqlite else ()
    store = open_store(url)
    store.location = ws.location
    try:
        import attrs

        rebuilt = attrs.evolve(rebuild_from_manifest(store, ws), moved_aside=moved)
    finally:
        store.close()
    if args.json:
        _print_json(rebuilt.as_dict())
        return EXIT_OK
    for path in moved:
        print(f"moved the old store aside: {path}")
    print(rebuilt.line())
    return EXIT_OK


def _jobs_verify(args: argparse.Namespace) -> int:
    """Exit 0 when every finished file checked out, 1 when some were re-queued."""
    from contentdownload.jobs.rebuild import verify_files
    from contentdownload.jobs.workspace import Workspace

    out = Workspace.open(args.out, create=False).out if args.out else None
    store = _store_from_args(args)
    try:
        report = verify_files(store, out, deep=args.deep)
    finally:
        store.close()
    if args.json:
        _print_json(report.as_dict())
    else:
        for path in report.requeued:
            print(f"re-queued {path}")
        print(f"verified {report.verified}, missing {report.missing}, changed {report.changed}; "
              f"requeued {len(report.requeued)}" + ("" if args.deep else " (sizes only: --deep checks SHA-256)"))
    return EXIT_FAILED if report.requeued else EXIT_OK


def add_jobs(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("jobs", help="job store: counts by state, expired leases, failures; requeue, rebuild, verify")
    p.add_argument("jobs_command", nargs="?", choices=["requeue", "rebuild", "verify"], metavar="requeue|rebuild|verify",
                   help="requeue: failed jobs (with --failed); rebuild: the store from the manifest and the files; "
                        "verify: the finished files against their records")
    p.add_argument("--failed", action="store_true", help="with requeue: the failed jobs")
    p.add_argument("--deep", action="store_true", help="with verify: also compare each file's SHA-256")
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


# -- config --------------------------------------------------------------------------


def cmd_config(args: argparse.Namespace) -> int:
    report = _runtime(args).settings_report()
    if args.json:
        _print_json(report)
        return EXIT_OK
    rows = [[key, json.dumps(s["value"]), s["source"]] for key, s in report["settings"].items()]
    print(_table(rows, ["SETTING", "VALUE", "SOURCE"]))
    files = report["config_files"]
    print(f"\nconfig files read: {', '.join(files) if files else '(none)'}")
    print(f"user config file:  {report['user_config']}")
    return EXIT_OK


def add_config(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("config", parents=[common], help="the effective [run] settings and where each came from")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_config)


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


cli.SUBCOMMANDS.extend([add_run, add_get, add_config, add_demo, add_compare, add_jobs, add_gc])
