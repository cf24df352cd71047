"""Store CPU per job: the ten store calls of a job made one by one, against the batched calls for 64 jobs.

    python benchmarks/store_batch.py [--jobs 2048] [--batch 64] [--repeats 3]

A SQLite job store in a real file (the store's own settings: WAL, ``synchronous=NORMAL``).
One by one, each job costs ten write transactions: claim, mark_streaming, the transfer op
begun, the finalize intent begun and done, the heartbeat of ``assert_held``, the manifest op
begun and done, finish, the transfer op done. Batched, a batch of jobs costs six:
``claim_many``; mark_streaming and ``begin_transfers``; ``record_intents``; ``heartbeat_many``;
the manifest ops begun; the manifest ops done, the finishes and ``end_transfers``.
Reported: CPU ms per job of this process (``time.process_time``, the store's work: SQL,
the driver, Python), the medians of ``--repeats`` runs, and their ratio. Also the CPU per
claim of ``claim`` and of ``claim_many``.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))

from contentdownload.hooks.model import Job, JobResult, StreamResult  # noqa: E402
from contentdownload.jobs import ledger  # noqa: E402
from contentdownload.store import PlannedJob, open_store  # noqa: E402

TTL = 300.0


def planned(n: int) -> list[PlannedJob]:
    return [PlannedJob(key=hashlib.sha256(f"bench:{i}".encode()).hexdigest(), scheme="streaming",
                       payload={"urls": [f"https://example.org/{i:06d}.pdf"], "relative_path": f"{i:06d}.pdf"})
            for i in range(n)]


def fresh_store(folder: Path, n: int):
    store = open_store(f"sqlite:///{folder / f'jobs-{time.monotonic_ns()}.db'}")
    jobs = planned(n)
    store.plan(jobs)
    return store, frozenset(j.key for j in jobs)


def stream_of(key: str) -> StreamResult:
    return StreamResult(status="complete", url=f"https://example.org/{key[:8]}", total_size=50_000, sha256=key)


def result_of(key: str) -> JobResult:
    return JobResult(outcome="downloaded", job=Job(urls=(f"https://example.org/{key[:8]}",)), job_key=key,
                     path=Path(f"/out/{key[:8]}"), size=50_000, sha256=key, bytes_downloaded=50_000)


def manifest_op(key: str) -> str:
    return ledger.manifest_op(key, "downloaded", "", "run", key)


def one_by_one(store, keys: frozenset[str], timed) -> int:
    return timed(_one_by_one, store, keys)


def _one_by_one(store, keys: frozenset[str]) -> int:
    done = 0
    while (claim := store.claim("w", TTL, keys)) is not None:
        key, epoch = claim.key, claim.epoch
        store.mark_streaming(key, epoch)
        ledger.begin_transfer(store, key, epoch)
        ledger.record_intent(store, key, epoch, stream_of(key))
        store.heartbeat(key, epoch, TTL)
        store.op_begin(manifest_op(key), key, "manifest", 0)
        store.op_done(manifest_op(key), {"run_id": "run", "outcome": "downloaded"})
        store.finish(key, epoch, path=f"/out/{key[:8]}", size=50_000, sha256=key)
        ledger.end_transfer(store, key, result_of(key))
        done += 1
    return done


def start_all(store, claims: list) -> None:
    for claim in claims:
        store.mark_streaming(claim.key, claim.epoch)
    ledger.begin_transfers(store, [(c.key, c.epoch) for c in claims])


def finish_all(store, claims: list) -> None:
    for claim in claims:
        store.op_done(manifest_op(claim.key), {"run_id": "run", "outcome": "downloaded"})
        store.finish(claim.key, claim.epoch, path=f"/out/{claim.key[:8]}", size=50_000, sha256=claim.key)
    ledger.end_transfers(store, [(c.key, result_of(c.key)) for c in claims])


def batched(store, keys: frozenset[str], timed, size: int) -> int:
    return timed(_batched, store, keys, size)


def _batched(store, keys: frozenset[str], size: int) -> int:
    done = 0
    while claims := store.claim_many("w", TTL, keys, size):
        store.batched(partial(start_all, store, claims))
        ledger.record_intents(store, [(c.key, c.epoch, stream_of(c.key)) for c in claims])
        assert not store.heartbeat_many([(c.key, c.epoch) for c in claims], TTL)
        ledger.in_one_transaction(store, [partial(store.op_begin, manifest_op(c.key), c.key, "manifest", 0) for c in claims])
        store.batched(partial(finish_all, store, claims))
        done += len(claims)
    return done


def cpu_ms_per_job(folder: Path, n: int, run) -> float:
    """CPU ms per job of ``run(store, keys, clock)``; ``clock()`` is the CPU time it counts (it may leave some out)."""
    store, keys = fresh_store(folder, n)
    spent = [0.0]

    def timed(fn, *args):
        started = time.process_time()
        try:
            return fn(*args)
        finally:
            spent[0] += time.process_time() - started

    try:
        done = run(store, keys, timed)
    finally:
        store.close()
    assert done == n, (done, n)
    return spent[0] * 1000 / n


def claims_only(store, keys: frozenset[str], timed, size: int | None) -> int:
    """The CPU of the claims alone; each claim (batch) is finished, untimed, before the next, as a worker would."""
    done = 0
    while True:
        claims = timed(store.claim, "w", TTL, keys) if size is None else timed(store.claim_many, "w", TTL, keys, size)
        claims = [claims] if size is None and claims is not None else (claims or [])
        if not claims:
            return done
        store.batched(lambda: [store.finish(c.key, c.epoch, path="/out", size=1, sha256=c.key) for c in claims])
        done += len(claims)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        figures: dict[str, list[float]] = {"single": [], "batched": [], "claim": [], "claim_many": []}
        for _ in range(args.repeats):  # interleaved, so a busy moment of the machine hits both
            figures["single"].append(cpu_ms_per_job(folder, args.jobs, one_by_one))
            figures["batched"].append(cpu_ms_per_job(folder, args.jobs, partial(batched, size=args.batch)))
            figures["claim"].append(cpu_ms_per_job(folder, args.jobs, partial(claims_only, size=None)))
            figures["claim_many"].append(cpu_ms_per_job(folder, args.jobs, partial(claims_only, size=args.batch)))
    med = {name: statistics.median(values) for name, values in figures.items()}
    print(f"{args.jobs} jobs, SQLite file, medians of {args.repeats} runs (CPU of this process)")
    print(f"  10 store calls per job, one by one:  {med['single']:.3f} ms/job")
    print(f"  batched calls, {args.batch} jobs per batch:   {med['batched']:.3f} ms/job")
    print(f"  ratio one by one / batched:          {med['single'] / med['batched']:.1f}x")
    print(f"  claim:      {med['claim']:.3f} ms/claim")
    print(f"  claim_many: {med['claim_many']:.3f} ms/claim ({args.batch} per call)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
