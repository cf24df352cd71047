"""``contentdownload demo``: the whole product on a generated corpus, offline.

It serves a small generated corpus from the package's loopback server, runs the
pipeline over it with one connection cut mid-file (so that file resumes), then runs
again with revalidation of one unchanged file (answered 304), and prints what
happened: outcomes, resumed bytes, 304s, and which plugin answered each hook.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Any

import attrs

from contentdownload.cli.parser import EXIT_FAILED, EXIT_OK, _print_json, _table, runtime_from_args
from contentdownload.errors import UsageError
from contentdownload.records.log import close_logging, configure_logging
from contentdownload.hooks.model import HOOKS, Job
from contentdownload.jobs.runner import Run

MARKER = ".contentdownload/demo-folder"


def _corpus(n: int, seed: int = 7) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    files = []
    for i in range(n):
        size = 3 * (1 << 20) if i == 0 else rng.randint(2_000, 400_000)
        files.append((f"/corpus/doc-{i:03d}.pdf", b"%PDF-1.7\n" + rng.randbytes(size)))  # real magic bytes, or the content check refuses them
    return files


def _prepare(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise UsageError(f"{out} exists and is not a demo folder; choose another --out")
        shutil.rmtree(out)
    (out / MARKER).parent.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by contentdownload demo; safe to delete\n")


def run_demo(args: argparse.Namespace) -> int:
    from contentdownload.testing.server import Fault, LoopbackServer

    if args.files < 2:
        raise UsageError("--files must be at least 2")
    runtime = runtime_from_args(args, {"progress": False, "retries": 5, "backoff_factor": 0.05})
    out = Path(args.out).resolve()
    _prepare(out)
    corpus = _corpus(args.files)
    configure_logging("INFO", out / "logs" / "download.log")
    try:
        with LoopbackServer() as server:
            jobs = []
            for path, data in corpus:
                url = server.add_file(path, data, content_type="application/pdf")
                jobs.append(Job(urls=(url,), sha256=hashlib.sha256(data).hexdigest(), size=len(data)))
            big_path, big = corpus[0]
            server.add_fault(big_path, Fault.cut_after(len(big) // 3))  # the injected interruption

            first = Run(runtime, out, jobs, show_progress=False).execute()
            server.reset_stats()
            runtime.settings = attrs.evolve(runtime.settings, revalidate=True)
            second = Run(runtime, out, jobs[1:2], show_progress=False).execute()
            revalidation_stats = server.stats(corpus[1][0])
    finally:
        close_logging()

    report = _report(out, corpus, first, second, revalidation_stats)
    passed = report["passed"]
    if args.json:
        _print_json(report)
        return EXIT_OK if passed else EXIT_FAILED
    _print_report(out, corpus, report, first, second, revalidation_stats)
    return EXIT_OK if passed else EXIT_FAILED


def _report(out: Path, corpus: list, first: Any, second: Any, revalidation_stats: Any) -> dict:
    """What the two runs did, and whether the demo passed."""
    ok_files = sum(1 for path, data in corpus if (out / Path(path).name).read_bytes() == data)
    resumed = [r for r in first.results if r.outcome == "resumed"]
    report = {
        "output": str(out),
        "first_run": {
            "outcomes": first.metrics["outcomes"],
            "resumed_files": [{"path": str(r.path), "resumed_from": r.resumed_from, "size": r.size} for r in resumed],
            "plugins": {h: sorted({r.plugins.get(h) for r in first.results if r.plugins.get(h)}) for h in HOOKS},
            "exit_code": first.exit_code,
        },
        "revalidation_run": {
            "outcomes": second.metrics["outcomes"],
            "status_codes": revalidation_stats.statuses,
            "body_bytes_sent": revalidation_stats.body_bytes,
            "exit_code": second.exit_code,
        },
        "files_identical_to_source": f"{ok_files}/{len(corpus)}",
    }
    passed = (
        first.exit_code == 0 and second.exit_code == 0 and ok_files == len(corpus)
        and bool(resumed) and second.metrics["outcomes"]["not_modified"] == 1
    )
    report["passed"] = passed
    return report


def _print_report(out: Path, corpus: list, report: dict, first: Any, second: Any, revalidation_stats: Any) -> None:
    resumed = [r for r in first.results if r.outcome == "resumed"]
    print(f"demo corpus: {len(corpus)} files served on loopback; output in {out}\n")
    print("run 1 (one connection cut mid-file):")
    print(_table([[o, str(n)] for o, n in first.metrics["outcomes"].items() if n], ["OUTCOME", "JOBS"]))
    for r in resumed:
        print(f"  resumed {Path(r.path).name} from byte {r.resumed_from:,} of {r.size:,} (only the rest was fetched)")
    print("  plugins: " + ", ".join(f"{h}={'/'.join(p)}" for h, p in report["first_run"]["plugins"].items()))
    print("\nrun 2 (revalidate one unchanged file):")
    print(f"  outcome {json.dumps({o: n for o, n in second.metrics['outcomes'].items() if n})}, "
          f"server answered {revalidation_stats.statuses} with {revalidation_stats.body_bytes} body bytes")
    print(f"\nfiles byte-identical to the source: {report['files_identical_to_source']}")
    print(f"manifest: {out / 'manifest.jsonl'}   metrics: {out / 'manifest.metrics.json'}   logs: {out / 'logs'}")
    print("demo " + ("passed" if report["passed"] else "FAILED"))
