"""The job store rides out a PostgreSQL server that restarts, stops for a while, or loses its backends.

Store calls wait (bounded exponential backoff, ``retry_s``) while the server is away and then
carry on; past the budget they raise StoreUnavailableError, which is neither a job failure nor
a plugin fault.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psycopg
import pytest

from contentdownload.errors import ContentDownloadError, StoreError, StoreUnavailableError
from contentdownload.store import JobState, PlannedJob, open_store
from contentdownload.store.base import OUTAGE_MAX_WAIT_S
from contentdownload.testing.server import Fault
from contentdownload.testing.pg import PostgresNotAvailable, TemporaryPostgres, fresh_postgres_dsn, postgres_dsn  # noqa: F401

pytestmark = pytest.mark.postgres
N = 60
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def private_pg(tmp_path):
    """A server of this test's own, so that stopping it disturbs no other test."""
    try:
        pg = TemporaryPostgres().start()
    except PostgresNotAvailable as exc:
        pytest.skip(str(exc))
    yield pg
    pg.stop()


class Outage:
    """Whether the outage is under way: while it is, each worker keeps calling the store on the
    job it holds, so that some store call meets the outage however fast the jobs run."""

    def __init__(self) -> None:
        self.begun = threading.Event()
        self.over = threading.Event()
        self.calls: list[tuple[float, float]] = []  # (start, end) of each store call of the workers, wall clock

    def call(self, fn, *args):
        """``fn(*args)``, a store call, with its start and end noted."""
        start = time.time()  # the server's clock too (the same machine): see _restarted_at
        try:
            return fn(*args)
        finally:
            self.calls.append((start, time.time()))

    def hold(self, store, key: str, epoch: int) -> None:
        while self.begun.is_set() and not self.over.wait(0.01):
            self.call(store.heartbeat, key, epoch, 30)

    def met(self, moments: list[float]) -> bool:
        """Whether a store call was under way at one of ``moments`` (when the server was away)."""
        return any(began < moment < ended for began, ended in self.calls for moment in moments)


def _work(url: str, done: list, errors: list, started: threading.Event, outage: Outage) -> None:
    """One worker: claim, heartbeat, record an operation and finish jobs until none is left."""
    store = open_store(url, retry_s=60)
    try:
        while True:
            claim = outage.call(store.claim, "w", 30)
            if claim is None:
                return
            outage.call(store.heartbeat, claim.key, claim.epoch, 30)
            outage.hold(store, claim.key, claim.epoch)
            outage.call(store.op_begin, f"op-{claim.key}", claim.key, "transfer", claim.epoch)
            outage.call(store.op_done, f"op-{claim.key}", {"n": 1})
            outage.call(functools.partial(store.finish, path=f"/out/{claim.key}", size=1, sha256="ab" * 32), claim.key, claim.epoch)
            done.append(claim.key)
            if len(done) >= 10:
                started.set()
    except BaseException as exc:  # the test asserts there was none
        errors.append(exc)
    finally:
        store.close()


def _run_through(url: str, outage, caplog) -> list:
    store = open_store(url)
    store.plan([PlannedJob(key=f"k{i:03d}", scheme="t") for i in range(N)])
    done: list = []
    errors: list = []
    started = threading.Event()
    during = Outage()
    threads = [threading.Thread(target=_work, args=(url, done, errors, started, during)) for _ in range(3)]
    for t in threads:
        t.start()
    assert started.wait(60)
    caplog.set_level("WARNING", logger="contentdownload.store")
    during.begun.set()
    try:
        away = outage()
    finally:
        during.over.set()
    for t in threads:
        t.join(120)
    assert not errors, errors
    # The outage was met: a store call was under way while the server was away, and returned. It
    # waited either in the store's own retries (logged) or in the pool, which replaces the
    # connections the outage broke while callers wait for one.
    assert during.met(away), (away, len(during.calls))
    retries = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
    print(f"{len(retries)} logged retries; {len(during.calls)} store calls")
    records = list(store.records())
    store.close()
    assert sorted(done) == [f"k{i:03d}" for i in range(N)]  # each job finished once, none lost
    assert {r.state for r in records} == {JobState.FINALIZED} and all(r.claims >= 1 for r in records)
    return records


def test_a_fast_restart_in_the_middle_of_a_run(private_pg, caplog):
    url = private_pg.create_database()

    def outage() -> list[float]:
        private_pg.ctl("restart", "-m", "fast")
        return [_restarted_at(url)]  # the server was away until then

    _run_through(url, outage, caplog)


def _restarted_at(url: str) -> float:
    """When the server last started, on the machine's wall clock."""
    with psycopg.connect(url) as conn:
        return float(conn.execute("SELECT extract(epoch FROM pg_postmaster_start_time())").fetchone()[0])


def test_a_server_stopped_then_started(private_pg, caplog):
    url = private_pg.create_database()

    def outage() -> list[float]:
        private_pg.ctl("stop", "-m", "fast")
        stopped = time.time()
        threading.Event().wait(5)  # the outage itself: the server is down for 5 s
        private_pg.ctl("start", "-o", f"-p {private_pg.port} -k {private_pg.socket_dir}")
        return [stopped]

    _run_through(url, outage, caplog)


def test_backends_terminated_repeatedly(fresh_postgres_dsn, caplog):  # noqa: F811
    stop = threading.Event()

    def outage() -> list[float]:
        killed: list[float] = []  # the moments the workers' backends were gone
        with psycopg.connect(fresh_postgres_dsn, autocommit=True) as admin:
            for _ in range(20):
                admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE datname = current_database() AND pid <> pg_backend_pid()")
                killed.append(time.time())
                if stop.wait(0.2):
                    break
        return killed

    _run_through(fresh_postgres_dsn, outage, caplog)


def test_past_the_budget_the_store_is_unavailable(private_pg):
    url = private_pg.create_database()
    store = open_store(url, retry_s=1)
    store.plan([PlannedJob(key="k", scheme="t")])
    private_pg.ctl("stop", "-m", "fast")
    with pytest.raises(StoreUnavailableError, match="unavailable") as info:
        store.get("k")
    assert isinstance(info.value, ContentDownloadError) and isinstance(info.value, ConnectionError)
    assert not isinstance(info.value, StoreError)  # not a refusal by the store: an infrastructure failure
    store.close()


def test_a_permanent_error_is_not_retried(fresh_postgres_dsn):  # noqa: F811
    store = open_store(fresh_postgres_dsn, retry_s=600)
    with pytest.raises(StoreError, match="syntax"):
        store._run(lambda conn: conn.execute("SELEC 1"), write=False)
    store.close()


# -- the same outages under three real `contentdownload run` processes ------------------------

RUN_JOBS = 72


def _cli_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCSTOKG_", "CONTENTDOWNLOAD_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "core"), str(REPO / "plugins"), env.get("PYTHONPATH", "")])
    return env


def _wait_for_bodies(server, n: int, procs: list, timeout: float = 120) -> None:
    """The trigger: the server has sent ``n`` whole bodies (the run is in its middle)."""
    deadline = time.monotonic() + timeout
    while sum(1 for r in server.requests if r.complete and r.status == 200) < n:
        assert time.monotonic() < deadline, "the run did not get going"
        assert all(p.poll() is None for p in procs), "a process ended before the outage"
        time.sleep(0.02)  # polling the server's counter: there is no event to wait on across processes


def _three_runs(server, tmp_path: Path, db: str, outage, *, delay: float, trigger: int) -> dict:
    """Three processes on one job list and one PostgreSQL store; ``outage()`` once ``trigger`` bodies are served."""
    rng = random.Random(trigger)
    files = {}
    for i in range(RUN_JOBS):
        path = f"/o/f{i:03d}.bin"
        files[path] = rng.randbytes(rng.randint(1_000, 8_000))
        server.add_file(path, files[path])
        server.add_fault(path, Fault.delay(delay), times=-1)
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("".join(server.url(p) + "\n" for p in files))
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "contentdownload", "run", str(jobs), "--out", str(out), "--no-progress",
           "--db", db, "--workers", "2", "--store-retry-s", "120"]
    started = time.monotonic()
    procs = [subprocess.Popen(cmd, env=_cli_env(), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    _wait_for_bodies(server, trigger, procs)
    fault_at = time.monotonic()
    outage()
    fault_done, fault_done_wall = time.monotonic(), time.time()
    errs, took = [], []
    for proc in procs:
        errs.append(proc.communicate(timeout=300)[1])
        took.append(time.monotonic() - started)
    codes = [p.returncode for p in procs]
    assert codes == [0, 0, 0], (codes, [e[-3000:] for e in errs])
    assert not any("Traceback" in e for e in errs), [e[-3000:] for e in errs]
    for path, data in files.items():
        stats = server.stats(path)
        assert stats.full_bodies == 1 and stats.body_bytes == len(data), (path, stats)  # fetched once
        assert (out / Path(path).name).read_bytes() == data
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines() if line.strip()]
    per_job = Counter(r["job_key"] for r in rows)
    assert len(per_job) == RUN_JOBS and set(per_job.values()) == {1}, [k for k, n in per_job.items() if n != 1]
    assert not [r for r in rows if r["outcome"] == "failed"]
    log = (out / "logs" / "download.log").read_text()
    retries = [json.loads(line) for line in log.splitlines() if "retrying in" in line]
    waits = [float(m.group(1)) for r in retries if (m := re.search(r"retrying in ([\d.]+) s", json.dumps(r)))]
    after = [r.time for r in server.requests if r.time > fault_done_wall]
    assert after, "the outage was not in the middle of the run: no request came after it"
    resumed = min(after)
    figures = {"outage_s": round(fault_done - fault_at, 1), "resumed_after_s": round(resumed - fault_done_wall, 1),
               "runs_s": [round(t, 1) for t in took],
               "retries_logged": len(retries), "retry_sleep_total_s": round(sum(waits), 1),
               "rows": len(rows), "exit_codes": codes}
    print("store outage figures:", figures)
    return figures


@pytest.mark.slow
def test_three_runs_ride_out_a_fast_restart(private_pg, server, tmp_path):
    url = private_pg.create_database()
    _three_runs(server, tmp_path, url, lambda: private_pg.ctl("restart", "-m", "fast"), delay=0.3, trigger=18)


@pytest.mark.slow
def test_three_runs_ride_out_a_server_stopped_for_20_s(private_pg, server, tmp_path):
    url = private_pg.create_database()

    def outage() -> None:
        private_pg.ctl("stop", "-m", "fast")
        threading.Event().wait(20)  # the outage itself: the server is down for 20 s
        private_pg.ctl("start", "-o", f"-p {private_pg.port} -k {private_pg.socket_dir}")

    figures = _three_runs(server, tmp_path, url, outage, delay=0.3, trigger=18)
    # Work resumes within one retry step of the server's return, not after the pool's own
    # reconnection backoff (1, 2, 4, 8, 16... s) has come round again.
    assert figures["resumed_after_s"] <= OUTAGE_MAX_WAIT_S + 1.5, figures


@pytest.mark.slow
def test_three_runs_ride_out_backends_terminated_every_second(fresh_postgres_dsn, server, tmp_path):  # noqa: F811
    url = fresh_postgres_dsn

    def outage() -> None:
        with psycopg.connect(url, autocommit=True) as admin:
            for _ in range(8):
                admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE datname = current_database() AND pid <> pg_backend_pid()")
                threading.Event().wait(1.0)  # the fault's own rhythm: once a second

    _three_runs(server, tmp_path, url, outage, delay=1.0, trigger=6)


def test_after_backends_were_terminated_a_call_does_not_wait_out_each_dead_connection(fresh_postgres_dsn):  # noqa: F811
    """Every pooled connection died at once: the first one found dead has the pool drop the
    others, instead of checking them one by one with a pause of 1, 2, 4... s between checks."""
    store = open_store(fresh_postgres_dsn, retry_s=60)
    try:
        store.plan([PlannedJob(key="k", scheme="t")])
        idle = [store._pool.getconn() for _ in range(5)]
        for conn in idle:
            store._pool.putconn(conn)
        with psycopg.connect(fresh_postgres_dsn, autocommit=True) as admin:
            killed = admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                   "WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchone()[0]
        assert killed >= 5
        started = time.monotonic()
        assert store.get("k").key == "k"
        assert time.monotonic() - started < 0.9  # below the pool's first pause between checks
    finally:
        store.close()
