"""Fixed and per-job costs outside the transfers: planning, a rerun of finished jobs, startup.

    python benchmarks/planning.py [--jobs 2000,100000] [--rerun 2000] [--repeat 3]

- **planning**: ``plan_jobs`` in this process, against an empty SQLite store (new jobs)
  and again once every job is recorded finished with its file present (a rerun's
  planning); CPU milliseconds per job (steadier than wall time on a shared machine), and SQL
  statements per job (SQLite's trace callback; each row of an ``executemany`` counts).
- **rerun**: ``contentdownload run`` of ``--rerun`` small files already downloaded (every
  job skipped, no request), in its own process: wall and CPU seconds, medians of ``--repeat``.
- **startup**: ``contentdownload --help`` and ``contentdownload get URL -o FILE`` of one
  small file: wall seconds (median) and the modules' import time (``-X importtime``).

Compiled modules are cached under a temporary ``PYTHONPYCACHEPREFIX`` (warmed first), as an
installed package has them. Target: the rerun of 2,000 finished jobs under 0.3 s, a small
``get`` under 0.1 s.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "core"), str(REPO / "plugins")]

from contentdownload.hooks.model import Job  # noqa: E402
from contentdownload.jobs.planner import plan_jobs  # noqa: E402
from contentdownload.jobs.workspace import Workspace  # noqa: E402
from contentdownload.machinery.runtime import Runtime  # noqa: E402
from contentdownload.store import open_store  # noqa: E402
from contentdownload.testing.server import LoopbackServer  # noqa: E402

EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def _jobs(n: int):
    return (Job(urls=(f"http://h.invalid/a/{i:07d}.pdf",)) for i in range(n))


def _count_statements(store) -> list[int]:
    """A counter of the SQL statements this thread's store connection runs from now on (SQLite's trace callback)."""
    count = [0]
    conn: sqlite3.Connection = store._thread_conn()
    conn.set_trace_callback(lambda _sql: count.__setitem__(0, count[0] + 1))
    return count


def _finish_all(store, ws: Workspace, plan) -> None:
    """Record every planned job finished, with an empty file at its path."""
    keys = sorted(plan.items)
    for start in range(0, len(keys), 1000):
        def finish(chunk=keys[start:start + 1000]) -> None:
            for key in chunk:
                final = ws.final_path(plan.items[key].relative_path)
                final.parent.mkdir(parents=True, exist_ok=True)
                final.touch()
                claim = store.claim_key(key, "bench", 60.0)
                store.finish(key, claim.epoch, path=str(final), size=0, sha256=EMPTY_SHA256, mtime_ns=final.stat().st_mtime_ns)
        store.batched(finish)


def measure_planning(n: int) -> dict:
    runtime = Runtime.from_options(environ={})
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace.open(Path(tmp) / "out")
        store = open_store(ws.default_db)
        try:
            statements = _count_statements(store)
            started = time.process_time()
            plan = plan_jobs(runtime, store, ws, _jobs(n))
            new_s, new_sql = time.process_time() - started, statements[0]
            _finish_all(store, ws, plan)
            statements[0] = 0
            started = time.process_time()
            again = plan_jobs(runtime, store, ws, _jobs(n))
            done_s, done_sql = time.process_time() - started, statements[0]
            assert not again.items and len(again.settled) == n, (len(again.items), len(again.settled))
        finally:
            store.close()
    return {"jobs": n, "new_ms_per_job": new_s * 1000 / n, "new_sql_per_job": new_sql / n,
            "done_ms_per_job": done_s * 1000 / n, "done_sql_per_job": done_sql / n}


def _env(cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(cache)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "core"), str(REPO / "plugins"), os.environ.get("PYTHONPATH", "")])
    return env


def timed(argv: list[str], env: dict, *, check: bool = True) -> tuple[float, float, str]:
    """Wall seconds, CPU seconds (user + system) and stderr of one ``python -m contentdownload`` process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if check and proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), proc.stderr


def import_seconds(stderr: str) -> float:
    """The sum of the top-level imports' cumulative times in ``-X importtime`` output."""
    total = 0
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\S.*)$", line)
        if m and not m.group(2).startswith(" "):
            total += int(m.group(1))
    return total / 1e6


def measure_rerun(server: LoopbackServer, work: Path, files: int, repeat: int, env: dict) -> dict:
    jobs = work / "jobs.txt"
    jobs.write_text("".join(server.url(f"/small/{i:05d}.bin") + "\n" for i in range(files)))
    for i in range(files):
        server.add_file(f"/small/{i:05d}.bin", os.urandom(512))
    argv = ["-m", "contentdownload", "run", str(jobs), "--out", str(work / "out"), "--no-progress"]
    timed(argv, env)
    runs = [timed(argv, env)[:2] for _ in range(repeat)]
    return {"files": files, "wall_s": statistics.median(r[0] for r in runs), "cpu_s": statistics.median(r[1] for r in runs)}


def measure_startup(server: LoopbackServer, work: Path, repeat: int, env: dict) -> dict:
    server.add_file("/one.bin", b"x" * 1024)
    get = ["-m", "contentdownload", "get", server.url("/one.bin"), "-o"]
    helps = [timed(["-m", "contentdownload", "--help"], env)[0] for _ in range(repeat)]
    gets = []
    for i in range(repeat):
        gets.append(timed([*get, str(work / f"one-{i}.bin")], env)[0])
    imports = import_seconds(timed(["-X", "importtime", *get, str(work / "one-x.bin")], env)[2])
    return {"help_s": statistics.median(helps), "get_s": statistics.median(gets), "get_imports_s": imports}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", default="2000,100000", help="job counts to plan (comma-separated; empty: skip)")
    parser.add_argument("--rerun", type=int, default=2000, help="files of the rerun measurement (0: skip it)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    for n in [int(s) for s in args.jobs.split(",") if s]:
        r = measure_planning(n)
        print(f"planning {n:>7} jobs: new {r['new_ms_per_job']:.3f} ms/job ({r['new_sql_per_job']:.3f} SQL/job) | "
              f"all finished {r['done_ms_per_job']:.3f} ms/job ({r['done_sql_per_job']:.3f} SQL/job)", flush=True)
    with tempfile.TemporaryDirectory() as tmp, LoopbackServer() as server:
        work = Path(tmp)
        env = _env(work / "pycache")
        timed(["-m", "contentdownload", "--help"], env)  # compile the modules once
        s = measure_startup(server, work, args.repeat, env)
        print(f"startup: --help {s['help_s']:.3f} s; get of 1 KB {s['get_s']:.3f} s (imports {s['get_imports_s']:.3f} s)", flush=True)
        if args.rerun:
            r = measure_rerun(server, work, args.rerun, args.repeat, env)
            print(f"rerun of {r['files']} finished files: {r['wall_s']:.3f} s wall, {r['cpu_s']:.3f} s CPU", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
