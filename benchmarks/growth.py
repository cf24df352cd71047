"""Cost against history: a run of new small files, and a plain rerun, over stores of growing size.

    python benchmarks/growth.py [--sizes 1000,10000,100000] [--files 500] [--size 2048]

For each size N, an output folder's job store is filled with N finished jobs (through
the store's API), then ``contentdownload run`` fetches ``--files`` new small files from
the package's loopback server in its own process, and runs the same list again (every
job skipped). Prints wall time, CPU time and the run's peak RSS (from ``manifest.metrics.json``)
of both, and the ratio of the largest store's figures to the smallest's. Target: the
100k figures within 1.3x of the 1k figures. Then, in a process of its own, it plans a list
of ``--plan`` new jobs (100k by default) into an empty folder's store and prints the time
and peak RSS of that (target: under 150 MB).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "core"), str(REPO / "plugins")]

from contentdownload.hooks.model import Job  # noqa: E402
from contentdownload.jobs.keys import identity_key  # noqa: E402
from contentdownload.jobs.worker import job_payload  # noqa: E402
from contentdownload.jobs.workspace import Workspace  # noqa: E402
from contentdownload.store import PlannedJob, open_store  # noqa: E402
from contentdownload.testing.server import LoopbackServer  # noqa: E402

TARGET = 1.3
PLAN_TARGET_MB = 150.0
BATCH = 1000


def fill_store(out: Path, n: int) -> None:
    """Record ``n`` finished jobs of an earlier history in the folder's default store."""
    ws = Workspace.open(out)
    store = open_store(ws.default_db)
    try:
        for start in range(0, n, BATCH):
            planned = []
            for i in range(start, min(n, start + BATCH)):
                job = Job(urls=(f"http://history.invalid/old/{i:07d}.bin",))
                identity, _ = identity_key(job)
                planned.append(PlannedJob(key=identity, scheme="streaming-v1",
                                          payload=job_payload(job, f"{i:07d}.bin", identity)))
            store.plan(planned)
            for job in planned:
                claim = store.claim_key(job.key, "history", 60.0)
                store.finish(job.key, claim.epoch, path=str(ws.out / job.payload["relative_path"]), size=1, sha256="0" * 64)
    finally:
        store.close()


def fill_in_child(out: Path, n: int) -> None:
    """:func:`fill_store` in a process of its own: a child's peak RSS starts from its parent's (fork), so
    the measuring process must stay small whatever the history's size."""
    subprocess.run([sys.executable, __file__, "--fill-only", str(n), str(out)], check=True)


def timed_run(jobs: Path, out: Path) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds (user + system: steadier than wall time on a shared machine) and peak RSS of one run."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "core"), str(REPO / "plugins"), os.environ.get("PYTHONPATH", "")]))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "contentdownload", "run", str(jobs), "--out", str(out), "--no-progress"],
                          env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}): {proc.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return elapsed, cpu, json.loads((out / "manifest.metrics.json").read_text())["peak_rss_mb"]


def measure(server: LoopbackServer, work: Path, n: int, files: int, size: int) -> dict:
    out = work / f"store-{n}"
    fill_in_child(out, n)
    jobs = work / f"jobs-{n}.txt"
    jobs.write_text("".join(server.url(f"/new-{n}/{i:05d}.bin") + "\n" for i in range(files)))
    for i in range(files):
        server.add_file(f"/new-{n}/{i:05d}.bin", os.urandom(size))
    new_s, new_cpu, new_mb = timed_run(jobs, out)
    rerun_s, rerun_cpu, rerun_mb = timed_run(jobs, out)
    return {"store": n, "new_s": new_s, "new_cpu_s": new_cpu, "new_rss_mb": new_mb,
            "rerun_s": rerun_s, "rerun_cpu_s": rerun_cpu, "rerun_rss_mb": rerun_mb}


def plan_only(n: int) -> None:
    """Plan ``n`` new jobs (generated, never a list in memory) into an empty folder; print seconds and peak RSS."""
    from contentdownload.jobs.planner import plan_jobs
    from contentdownload.machinery.runtime import Runtime

    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace.open(Path(tmp) / "out")
        store = open_store(ws.default_db)
        started = time.perf_counter()
        plan = plan_jobs(Runtime.from_options(environ={}), store, ws, (Job(urls=(f"http://h.invalid/a/{i:07d}.pdf",)) for i in range(n)))
        elapsed = time.perf_counter() - started
        store.close()
    print(json.dumps({"jobs": len(plan.items), "s": elapsed, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def measure_plan(n: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--plan-only", str(n)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"planning failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--files", type=int, default=500)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--plan", type=int, default=100_000, help="jobs to plan in the planning measurement (0: skip it)")
    parser.add_argument("--plan-only", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--fill-only", nargs=2, metavar=("N", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fill_only:
        fill_store(Path(args.fill_only[1]), int(args.fill_only[0]))
        return 0
    if args.plan_only is not None:
        plan_only(args.plan_only)
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp, LoopbackServer() as server:
        for n in sizes:
            rows.append(measure(server, Path(tmp), n, args.files, args.size))
            r = rows[-1]
            print(f"store {n:>7}: {args.files} new files {r['new_s']:6.2f} s (cpu {r['new_cpu_s']:5.2f} s) {r['new_rss_mb']:6.1f} MB | "
                  f"rerun {r['rerun_s']:6.2f} s (cpu {r['rerun_cpu_s']:5.2f} s) {r['rerun_rss_mb']:6.1f} MB", flush=True)
    first, last = rows[0], rows[-1]
    ratios = {k: last[k] / first[k] for k in ("new_s", "new_cpu_s", "new_rss_mb", "rerun_s", "rerun_cpu_s", "rerun_rss_mb")}
    print("largest/smallest: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    ok = all(v <= TARGET for v in ratios.values())
    print(f"target <= {TARGET}x: {'met' if ok else 'NOT met'}")
    if args.plan:
        planned = measure_plan(args.plan)
        print(f"planning {planned['jobs']} new jobs: {planned['s']:.2f} s, peak RSS {planned['peak_rss_mb']:.1f} MB "
              f"(target < {PLAN_TARGET_MB:.0f} MB: {'met' if planned['peak_rss_mb'] < PLAN_TARGET_MB else 'NOT met'})")
        ok = ok and planned["peak_rss_mb"] < PLAN_TARGET_MB
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
