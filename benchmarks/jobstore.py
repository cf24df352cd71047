"""Job store overhead per job: SQLite (a file on disk) and PostgreSQL (a throwaway local server).

    python benchmarks/jobstore.py [--jobs 2000] [--threads 1] [--backend sqlite|postgres|all]
    python benchmarks/jobstore.py --runs [--tiny-jobs 5000] [--processes 3]

Each job goes through what a worker does to the store around one download: planning
(in one batch, as the runner plans a job list), claim among the run's keys, heartbeat,
mark_streaming, the transfer op (op_begin/op_done), the finalize intent (op_begin/op_done),
finish and the manifest op (op_begin/op_done). Reported: wall time per job (``--threads``
workers share one store, as a run's workers do). Targets: SQLite < 2 ms/job,
PostgreSQL < 5 ms/job.

SQLite is a file in a temporary folder with the store's own settings (WAL,
``synchronous=NORMAL``: no disk flush per commit). PostgreSQL is a throwaway server from
initdb/pg_ctl (:class:`contentdownload.testing.pg.TemporaryPostgres`, skipped when
absent) with its test settings (``fsync=off``), so the figure is the store's own cost:
statements, round trips, locks. ``--durable`` runs it with ``fsync=on`` and
``synchronous_commit=on`` instead, adding this machine's disk flush latency to each
durable commit (claims, finishes and completed operations; heartbeats, mark_streaming
and op_begin commit without waiting for the flush).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))

from contentdownload.jobs.keys import operation_key  # noqa: E402
from contentdownload.store import PlannedJob, open_store  # noqa: E402

TARGETS_MS = {"sqlite": 2.0, "postgres": 5.0}


def make_jobs(n: int) -> list[PlannedJob]:
    jobs = []
    for i in range(n):
        key = hashlib.sha256(f"bench:{i}".encode()).hexdigest()
        jobs.append(PlannedJob(key=key, scheme="streaming", payload={
            "urls": [f"https://example.org/files/{i:06d}.pdf"], "work_id": f"W{i}", "artifact_id": f"A{i}",
            "filename": None, "sha256": None, "size": None, "line": i + 1,
            "relative_path": f"{i:06d}.pdf", "identity": key,
        }))
    return jobs


def work(store, keys: frozenset[str], owner: str, ttl: float, done: list[int]) -> None:
    count = 0
    while True:
        claim = store.claim(owner, ttl, keys=keys)
        if claim is None:
            break
        key, epoch = claim.key, claim.epoch
        store.heartbeat(key, epoch, ttl)
        store.mark_streaming(key, epoch)
        transfer = operation_key(key, "transfer")
        store.op_begin(transfer, key, "transfer", epoch)
        sha = hashlib.sha256(key.encode()).hexdigest()
        intent = operation_key(key, f"finalize:{sha}")
        store.op_begin(intent, key, "finalize", epoch)
        store.op_done(intent, {"sha256": sha, "size": 1234, "etag": '"e"', "final_url": "https://example.org/x"})
        store.finish(key, epoch, path=f"/out/{key}.pdf", size=1234, sha256=sha, etag='"e"',
                     last_modified=None, final_url="https://example.org/x", content_type="application/pdf",
                     mtime_ns=time.time_ns())
        store.op_done(transfer, {"outcome": "downloaded", "bytes": 1234})
        manifest = operation_key(key, "manifest")
        if store.op_begin(manifest, key, "manifest", 0) != "done":
            store.op_done(manifest, None)
        count += 1
    done.append(count)


def measure(name: str, url: str, n: int, threads: int, setting: str) -> float:
    jobs = make_jobs(n)
    keys = frozenset(j.key for j in jobs)
    store = open_store(url)
    try:
        start = time.perf_counter()
        store.plan(jobs)
        planned = time.perf_counter()
        done: list[int] = []
        workers = [threading.Thread(target=work, args=(store, keys, f"bench-{i}", 60.0, done)) for i in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        end = time.perf_counter()
        assert sum(done) == n, (sum(done), n)
        stats = store.stats()
        assert stats["by_state"]["finalized"] == n, stats
    finally:
        store.close()
    per_job = (end - start) * 1000 / n
    target = TARGETS_MS[name]
    verdict = "OK" if per_job < target else "MISSED"
    print(f"{name:<9} {n} jobs, {threads} thread(s), {setting}: {per_job:.3f} ms/job "
          f"(plan {(planned - start) * 1000 / n:.3f} ms/job)  target < {target:g} ms/job: {verdict}", flush=True)
    return per_job


def run_throughput(n: int, processes: int, workers: int, repeat: int) -> bool:
    """Jobs per second of ``processes`` real ``contentdownload run`` processes over ``n`` tiny files.

    Store on: every process gets the whole list and they split it through the shared
    SQLite store (leases). Store off (``DOCSTOKG_ENABLE_STREAMING_SCHEMA=0``): there is
    nothing to coordinate through, so the list is split by hand, one share per process.
    Target: store on >= 0.7x store off.
    """
    import shutil
    import statistics
    import subprocess

    from many_small import start_server

    env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCSTOKG_", "CONTENTDOWNLOAD_"))}
    with tempfile.TemporaryDirectory(prefix="cd-runs-") as tmp:
        work = __import__("pathlib").Path(tmp)
        root = work / "www"
        root.mkdir()
        for i in range(n):
            (root / f"t{i:05d}.bin").write_bytes(os.urandom(512))
        server, base, server_name = start_server(root, work)
        urls = [f"{base}/t{i:05d}.bin\n" for i in range(n)]
        whole = work / "all.txt"
        whole.write_text("".join(urls))
        shares = []
        for p in range(processes):
            share = work / f"share{p}.txt"
            share.write_text("".join(urls[p::processes]))
            shares.append(share)
        timings: dict[str, list[float]] = {"store on": [], "store off": []}
        try:
            for r in range(repeat):
                for mode in ("store on", "store off"):
                    out = work / f"out-{r}-{mode.replace(' ', '-')}"
                    lists = [whole] * processes if mode == "store on" else shares
                    extra = {} if mode == "store on" else {"DOCSTOKG_ENABLE_STREAMING_SCHEMA": "0"}
                    started = time.perf_counter()
                    procs = [subprocess.Popen([sys.executable, "-m", "contentdownload", "run", str(lst), "--out", str(out),
                                               "--workers", str(workers), "--per-host", str(workers), "--no-progress",
                                               "--log-level", "WARNING"], env={**env, **extra},
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for lst in lists]
                    codes = [p.wait() for p in procs]
                    timings[mode].append(time.perf_counter() - started)
                    files = sum(1 for p in out.iterdir() if p.suffix == ".bin")
                    if any(codes) or files != n:
                        raise RuntimeError(f"{mode}: exit codes {codes}, {files} of {n} files")
                    shutil.rmtree(out)
        finally:
            server.terminate()
            server.wait(timeout=10)
    rate = {mode: n / statistics.median(t) for mode, t in timings.items()}
    ratio = rate["store on"] / rate["store off"]
    print(f"runs      {processes} processes x {workers} workers, {n} tiny jobs ({server_name}), median of {repeat}: "
          f"store on {rate['store on']:.0f} jobs/s, store off {rate['store off']:.0f} jobs/s, "
          f"ratio {ratio:.2f} (target >= 0.7): {'OK' if ratio >= 0.7 else 'missed'}")
    return ratio >= 0.7


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backend", choices=["sqlite", "postgres", "all"], default="all")
    parser.add_argument("--durable", action="store_true", help="PostgreSQL with fsync=on and synchronous_commit=on")
    parser.add_argument("--runs", action="store_true", help="also: throughput of real runs with the store on and off")
    parser.add_argument("--tiny-jobs", type=int, default=5000)
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args(argv)
    missed = False
    if args.runs:
        missed |= not run_throughput(args.tiny_jobs, args.processes, workers=4, repeat=args.repeat)
    if args.backend in ("sqlite", "all"):
        with tempfile.TemporaryDirectory(prefix="cd-jobstore-") as folder:
            per_job = measure("sqlite", f"sqlite:///{os.path.join(folder, 'jobs.db')}", args.jobs, args.threads,
                              "file on disk, WAL")
            missed |= per_job >= TARGETS_MS["sqlite"]
    if args.backend in ("postgres", "all"):
        from contentdownload.testing.pg import PostgresNotAvailable, TemporaryPostgres

        try:
            durable = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}
            server = TemporaryPostgres(settings=durable if args.durable else None)
        except PostgresNotAvailable as exc:
            print(f"postgres  skipped: {exc}")
        else:
            with server:
                per_job = measure("postgres", server.create_database("bench"), args.jobs, args.threads,
                                  "fsync=on, synchronous_commit=on" if args.durable else "fsync=off")
                missed |= per_job >= TARGETS_MS["postgres"]
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
