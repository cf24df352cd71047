"""Real processes share one store: every job is claimed and finished exactly once, and the work is split.

Three OS processes with four threads each claim from the same 500 planned jobs (some of
them left leased by a "dead" worker whose lease has expired). Now and then a thread
pauses past its lease before finishing, so another worker takes the job over and the
paused one must be refused at finish. Each process writes the keys it finished
successfully to its own result file; the test counts them across processes.

This module is also the worker program: ``python test_store_concurrency.py worker ...``.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from contentdownload.testing.pg import fresh_postgres_dsn, postgres_dsn  # noqa: F401  (fixtures)

CORE = Path(__file__).resolve().parents[1] / "core"
N_JOBS = 500
N_PROCS = 3
N_THREADS = 4
TTL = 0.5
DEAD = 20  # jobs left leased by a worker that died


def _job_keys() -> list[str]:
    return [f"job-{i:04d}" for i in range(N_JOBS)]


# -- the worker process ----------------------------------------------------------------------


def worker_main(url: str, name: str, ready: str, go: str, out: str) -> int:
    from contentdownload.errors import LeaseLostError
    from contentdownload.store import open_store

    store = open_store(url)
    keys = frozenset(_job_keys())
    finished: list[str] = []
    refused: list[str] = []
    lock = threading.Lock()
    Path(ready).touch()
    deadline = time.monotonic() + 30
    while not os.path.exists(go):
        if time.monotonic() > deadline:
            return 3
        time.sleep(0.002)

    def thread_main(t: int) -> None:
        rng = random.Random(f"{name}-{t}")
        owner = f"{name}/t{t}"
        end = time.monotonic() + 60
        while time.monotonic() < end:
            claim = store.claim(owner, TTL, keys=keys if t % 2 == 0 else None)
            if claim is None:
                if store.stats()["by_state"]["finalized"] >= N_JOBS:
                    return
                time.sleep(0.02)  # the rest is held by others: wait for it to finish or expire
                continue
            try:
                store.heartbeat(claim.key, claim.epoch, TTL)
                store.mark_streaming(claim.key, claim.epoch)
                time.sleep(rng.uniform(0.0, 0.004))  # the "download"
                if rng.random() < 0.02:
                    time.sleep(TTL * 2.5)  # paused past the lease: someone takes the job over
                store.finish(claim.key, claim.epoch, path=f"/out/{claim.key}", size=1, sha256=owner)
            except LeaseLostError:
                with lock:
                    refused.append(claim.key)
                continue
            with lock:
                finished.append(claim.key)

    threads = [threading.Thread(target=thread_main, args=(t,)) for t in range(N_THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    store.close()
    Path(out).write_text(json.dumps({"finished": finished, "refused": refused}))
    return 0


# -- the test --------------------------------------------------------------------------------


def _run(url: str, tmp_path: Path) -> None:
    from contentdownload.store import JobState, PlannedJob, open_store

    store = open_store(url)
    try:
        store.plan([PlannedJob(key=k, scheme="test", payload={"n": i}) for i, k in enumerate(_job_keys())])
        dead = [store.claim("dead-process", 60) for _ in range(DEAD)]
        for claim in dead[::2]:
            store.mark_streaming(claim.key, claim.epoch)
        store._run(lambda conn: conn.execute(  # their leases ran out an hour ago, on either store's clock
            "UPDATE jobs SET lease_expires_at = lease_expires_at - 3600, lease_boot_deadline = lease_boot_deadline - 3600 "
            "WHERE lease_owner = 'dead-process'"), write=True)

        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(CORE), os.environ.get("PYTHONPATH", "")]))
        go = tmp_path / "go"
        names = [f"p{i}" for i in range(N_PROCS)]
        procs = [
            subprocess.Popen([sys.executable, __file__, "worker", url, name, str(tmp_path / f"{name}.ready"), str(go),
                              str(tmp_path / f"{name}.json")], env=env, stderr=subprocess.PIPE, text=True)
            for name in names
        ]
        deadline = time.monotonic() + 30
        while not all((tmp_path / f"{n}.ready").exists() for n in names):
            assert time.monotonic() < deadline, "the worker processes did not start"
            assert all(p.poll() is None for p in procs), [p.stderr.read() for p in procs if p.poll() is not None]
            time.sleep(0.01)
        go.touch()  # all at once
        for proc in procs:
            _, err = proc.communicate(timeout=90)
            assert proc.returncode == 0, err[-3000:]

        results = {n: json.loads((tmp_path / f"{n}.json").read_text()) for n in names}
        per_key = Counter(k for r in results.values() for k in r["finished"])
        assert set(per_key) == set(_job_keys()), sorted(set(_job_keys()) - set(per_key))[:5]
        assert set(per_key.values()) == {1}, [k for k, n in per_key.items() if n > 1][:5]
        by_process = {n: len(r["finished"]) for n, r in results.items()}
        assert all(n > 0 for n in by_process.values()), by_process

        records = {r.key: r for r in store.records()}
        assert all(r.state is JobState.FINALIZED for r in records.values())
        for claim in dead:  # taken over from the dead worker, with a higher epoch
            assert records[claim.key].epoch > claim.epoch and records[claim.key].lease_owner is None
        for key, rec in records.items():
            assert rec.sha256.startswith(("p0/", "p1/", "p2/")), rec  # finished by the owner that held the last epoch
        refused = [k for r in results.values() for k in r["refused"]]
        for key in refused:  # a paused worker lost the job: someone else finished it, at a later epoch
            assert per_key[key] == 1 and records[key].claims >= 2
        print(f"finished per process {by_process}, refused after takeover {len(refused)}")
    finally:
        store.close()


def test_processes_share_one_sqlite_store(tmp_path):
    _run(f"sqlite:///{tmp_path / 'jobs.db'}", tmp_path)


@pytest.mark.postgres
def test_processes_share_one_postgresql_store(tmp_path, fresh_postgres_dsn):  # noqa: F811
    _run(fresh_postgres_dsn, tmp_path)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    sys.exit(worker_main(*sys.argv[2:7]))
