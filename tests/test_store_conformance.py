"""One contract, three job stores: the same tests on memory, SQLite (a real file) and PostgreSQL (a real server)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import pytest

from contentdownload.errors import IllegalTransition, LeaseLostError, StoreError, UsageError
from contentdownload.jobs.keys import operation_key
from contentdownload.store import (
    TRANSITIONS,
    JobState,
    JobStore,
    PlannedJob,
    SchemaVersionError,
    UnknownJobError,
    check_transition,
    open_store,
)
from contentdownload.store.schema import SCHEMA_VERSION
from contentdownload.store.sqlite import parse_sqlite_url
from contentdownload.testing import ManualClock
from contentdownload.testing.pg import fresh_postgres_dsn, postgres_dsn  # noqa: F401  (fixtures)

CORE = Path(__file__).resolve().parents[1] / "core"
P, L, S, F, X = JobState.PLANNED, JobState.LEASED, JobState.STREAMING, JobState.FINALIZED, JobState.FAILED


def jobs(n: int, prefix: str = "k", start: int = 0) -> list[PlannedJob]:
    return [PlannedJob(key=f"{prefix}{i:05d}", scheme="test", payload={"urls": [f"https://example.org/{i}"], "n": i})
            for i in range(start, start + n)]


@pytest.fixture(params=[
    "memory",
    "sqlite",
    pytest.param("postgres", marks=pytest.mark.postgres),
])
def url(request, tmp_path) -> str:
    """The URL of an empty store of each kind."""
    if request.param == "memory":
        return "memory:"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    return request.getfixturevalue("fresh_postgres_dsn")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def persistent_url(request, tmp_path) -> str:
    """The URL of an empty store that lives in a database (the memory store keeps nothing between openings)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    return request.getfixturevalue("fresh_postgres_dsn")


def stepper(url: str) -> tuple[ManualClock | None, Callable[[float], None]]:
    """A clock for a store at ``url``, and how to let time pass for its leases without sleeping.

    Memory and SQLite stores read a :class:`ManualClock`, which steps; PostgreSQL measures leases
    on the database's clock, so there the recorded lease times move back by as much instead.
    """
    if url.startswith("postgresql"):
        return None, lambda seconds: raw_update(
            url, "UPDATE jobs SET lease_expires_at = lease_expires_at - ?, leased_at = leased_at - ?", (seconds, seconds))
    clock = ManualClock(wall=time.time())
    return clock, clock.advance


@pytest.fixture
def stepped(url):
    return stepper(url)


@pytest.fixture
def store(url, stepped):
    s = open_store(url, clock=stepped[0])
    yield s
    s.close()


@pytest.fixture
def advance(stepped) -> Callable[[float], None]:
    """``advance(seconds)``: that much time passes for the store's leases."""
    return stepped[1]


def finish(store: JobStore, claim, **extra) -> None:
    store.finish(claim.key, claim.epoch, path=f"/out/{claim.key}", size=10, sha256="ab" * 32, **extra)


def raw_update(url: str, sql: str, params: tuple) -> None:
    """Run one statement on the store's database with the plain driver (no store code in between)."""
    if url.startswith("sqlite:"):
        conn = sqlite3.connect(parse_sqlite_url(url))
        try:
            conn.execute(sql, params)
            conn.commit()
        finally:
            conn.close()
    else:
        import psycopg

        with psycopg.connect(url) as conn:
            conn.execute(sql.replace("?", "%s") if params else sql, params or None)


# -- the transition table ------------------------------------------------------------------


def test_the_transition_table_is_the_contract():
    assert TRANSITIONS == {
        P: {L},
        L: {L, S, F, X, P},
        S: {L, F, X, P},
        X: {P},
        F: {P},
    }
    check_transition("planned", "leased")
    check_transition(F, P)
    for old, new in [(P, F), (P, S), (P, X), (F, L), (X, L), (S, S), (F, F), (P, P)]:
        with pytest.raises(IllegalTransition):
            check_transition(old, new)


# -- planning --------------------------------------------------------------------------------


def test_plan_is_idempotent(store):
    listed = jobs(50)
    assert store.plan(listed) == 50
    assert store.plan(listed) == 0
    assert store.plan(listed + jobs(10, start=50)) == 10  # only the new ones count
    assert store.plan(jobs(3, prefix="d") * 2) == 3  # duplicates within one list
    keys = [r.key for r in store.records()]
    assert len(keys) == 63 and len(set(keys)) == 63
    rec = store.get("k00007")
    assert rec.state is P and rec.scheme == "test" and rec.payload == {"urls": ["https://example.org/7"], "n": 7}
    assert (rec.attempts, rec.claims, rec.epoch, rec.lease_owner, rec.lease_expires_at) == (0, 0, 0, None, None)
    assert store.get("nope") is None
    assert store.plan([]) == 0


def test_planning_again_leaves_existing_jobs_alone(store):
    store.plan(jobs(2))
    claim = store.claim("w", 30)
    finish(store, claim)
    assert store.plan([PlannedJob(claim.key, "other", {"changed": True})]) == 0
    rec = store.get(claim.key)
    assert rec.state is F and rec.scheme == "test" and rec.payload["n"] == int(claim.key[1:])


def test_plan_of_thousands_is_one_fast_batch(store):
    start = time.perf_counter()
    assert store.plan(jobs(6000)) == 6000
    assert time.perf_counter() - start < 10
    assert sum(1 for _ in store.records()) == 6000  # records() pages through large stores
    assert sum(1 for _ in store.records(P)) == 6000
    assert store.stats()["by_state"]["planned"] == 6000


_PLAN_SCRIPT = """
import json, os, sys, time
sys.path.insert(0, {core!r})
from contentdownload.store import PlannedJob, open_store
url, go, out = sys.argv[1], sys.argv[2], sys.argv[3]
listed = [PlannedJob(key="k%05d" % i, scheme="test", payload={{"n": i}}) for i in range(3000)]
open(out + ".ready", "w").close()
while not os.path.exists(go):
    time.sleep(0.005)
store = open_store(url)  # a fresh store: both processes create the schema at once
added = store.plan(listed)
store.close()
open(out, "w").write(json.dumps(added))
"""


def test_two_processes_planning_the_same_list_at_once(url, tmp_path):
    n = 3000
    if url.startswith("memory:"):  # one process: two threads at once instead
        store = open_store(url)
        barrier, added = threading.Barrier(2), []

        def plan() -> None:
            barrier.wait()
            added.append(store.plan(jobs(n)))

        threads = [threading.Thread(target=plan) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        script = tmp_path / "plan.py"
        script.write_text(_PLAN_SCRIPT.format(core=str(CORE)))
        go = tmp_path / "go"
        outs = [tmp_path / f"out{i}.json" for i in range(2)]
        procs = [subprocess.Popen([sys.executable, str(script), url, str(go), str(out)]) for out in outs]
        deadline = time.monotonic() + 30
        while not all(Path(str(o) + ".ready").exists() for o in outs) and time.monotonic() < deadline:
            time.sleep(0.01)
        go.touch()
        for proc in procs:
            assert proc.wait(timeout=60) == 0
        added = [json.loads(o.read_text()) for o in outs]
        store = open_store(url)
    try:
        assert sum(added) == n, added
        keys = Counter(r.key for r in store.records())
        assert len(keys) == n and set(keys.values()) == {1}
    finally:
        store.close()


# -- claims ----------------------------------------------------------------------------------


def test_claim_takes_planned_jobs_then_none(store):
    store.plan(jobs(3))
    claims = [store.claim("worker-1", 30) for _ in range(3)]
    assert store.claim("worker-1", 30) is None
    assert sorted(c.key for c in claims) == ["k00000", "k00001", "k00002"]
    for c in claims:
        assert c.epoch == 1 and c.owner == "worker-1"
        rec = store.get(c.key)
        assert rec == c.record
        assert rec.state is L and rec.claims == 1 and rec.epoch == 1 and rec.lease_owner == "worker-1"
        assert rec.lease_expires_at == pytest.approx(rec.updated_at + 30, abs=0.1)
        assert abs(rec.updated_at - time.time()) < 600  # unix seconds


def test_claim_restricted_to_keys(store):
    store.plan(jobs(20))
    wanted = frozenset({"k00002", "k00005", "k00017", "not-planned"})
    got = {store.claim("w", 30, keys=wanted).key for _ in range(3)}
    assert got == {"k00002", "k00005", "k00017"}
    assert store.claim("w", 30, keys=wanted) is None
    assert store.claim("w", 30, keys=frozenset()) is None
    assert store.claim("w", 30, keys=["nothing", "here"]) is None
    # other collections work too, and a second key set on the same store
    assert store.claim("w", 30, keys=["k00009"]).key == "k00009"
    assert store.claim("w", 30, keys={"k00010", "k00011"}).key in {"k00010", "k00011"}
    assert store.stats()["by_state"]["planned"] == 20 - 5


def test_claim_among_thousands_of_keys(store):
    store.plan(jobs(4000))
    wanted = frozenset(f"k{i:05d}" for i in range(0, 4000, 2))
    seen = set()
    while (claim := store.claim("w", 30, keys=wanted)) is not None:
        assert claim.key in wanted and claim.key not in seen
        seen.add(claim.key)
        finish(store, claim)
    assert seen == wanted
    assert store.stats()["by_state"] == {"planned": 2000, "leased": 0, "streaming": 0, "finalized": 2000, "failed": 0}


def test_claim_key(store):
    store.plan(jobs(2))
    claim = store.claim_key("k00001", "w", 30)
    assert claim.key == "k00001" and claim.epoch == 1
    assert store.claim_key("k00001", "other", 30) is None  # held
    assert store.claim_key("missing", "w", 30) is None
    finish(store, claim)
    assert store.claim_key("k00001", "w", 30) is None  # finished


def test_an_expired_lease_is_taken_over_with_a_higher_epoch(store, advance):
    store.plan(jobs(2))
    first = store.claim("slow", 10, keys={"k00000"})
    store.mark_streaming(first.key, first.epoch)
    advance(9)
    assert store.claim("fast", 30, keys={"k00000"}) is None  # not expired yet
    assert store.claim_key("k00000", "fast", 30) is None
    advance(2)
    second = store.claim("fast", 30, keys={"k00000"})
    assert second.key == first.key and second.epoch == first.epoch + 1
    rec = store.get(first.key)
    assert rec.state is L and rec.lease_owner == "fast" and rec.claims == 2
    # and claim_key takes over an expired lease too
    third_claim = store.claim_key("k00001", "a", 10)
    advance(11)
    assert store.claim_key("k00001", "b", 30).epoch == third_claim.epoch + 1
    assert store.claim("c", 30) is None


def test_a_worker_whose_lease_was_taken_over_is_refused(store, advance):
    store.plan(jobs(1))
    old = store.claim("paused", 10)
    store.heartbeat(old.key, old.epoch, 10)
    store.mark_streaming(old.key, old.epoch)
    advance(11)
    new = store.claim("taker", 30)
    assert new.epoch == old.epoch + 1
    store.mark_streaming(new.key, new.epoch)
    with pytest.raises(LeaseLostError):
        store.heartbeat(old.key, old.epoch, 30)
    with pytest.raises(LeaseLostError):
        store.mark_streaming(old.key, old.epoch)
    with pytest.raises(LeaseLostError):
        store.finish(old.key, old.epoch, path="/stale", size=1, sha256="00")
    with pytest.raises(LeaseLostError):
        store.fail(old.key, old.epoch, "stale", retryable=True, max_attempts=5)
    store.release(old.key, old.epoch)  # stale: ignored
    rec = store.get(old.key)
    assert rec.state is S and rec.lease_owner == "taker" and rec.epoch == new.epoch and rec.attempts == 0
    store.finish(new.key, new.epoch, path="/new", size=5, sha256="cd" * 32, etag='"v2"', mtime_ns=123)
    rec = store.get(new.key)
    assert (rec.state, rec.path, rec.size, rec.etag, rec.mtime_ns) == (F, "/new", 5, '"v2"', 123)
    assert rec.lease_owner is None and rec.lease_expires_at is None
    with pytest.raises(LeaseLostError):  # still refused once it is finished
        store.finish(old.key, old.epoch, path="/stale", size=1, sha256="00")
    assert store.get(old.key).path == "/new"


def test_heartbeat_extends_the_lease(store, advance):
    store.plan(jobs(1))
    claim = store.claim("w", 10)
    for _ in range(4):
        advance(6)
        store.heartbeat(claim.key, claim.epoch, 10)
    assert store.claim("other", 30) is None  # 24 s after the claim, still held
    advance(11)
    assert store.claim("other", 30).epoch == claim.epoch + 1  # and it ends 10 s after the last heartbeat
    with pytest.raises(UnknownJobError):
        store.heartbeat("missing", 1, 30)


def test_moves_the_table_forbids_raise(store):
    store.plan(jobs(2))
    with pytest.raises(IllegalTransition):  # finishing a job nobody claimed
        store.finish("k00000", 0, path="/x", size=1, sha256="00")
    with pytest.raises(IllegalTransition):
        store.mark_streaming("k00000", 0)
    with pytest.raises(IllegalTransition):
        store.fail("k00000", 0, "x", retryable=False, max_attempts=1)
    claim = store.claim("w", 30)
    finish(store, claim)
    with pytest.raises(IllegalTransition):  # finished twice
        finish(store, claim)
    with pytest.raises(IllegalTransition):
        store.mark_streaming(claim.key, claim.epoch)
    with pytest.raises(LeaseLostError):  # nothing to extend
        store.heartbeat(claim.key, claim.epoch, 30)
    assert store.get(claim.key).state is F
    assert store.get("k00001").state is P
    with pytest.raises(UnknownJobError):
        store.finish("missing", 1, path="/x", size=1, sha256="00")


def test_the_database_refuses_an_illegal_update_itself(persistent_url):
    store = open_store(persistent_url)
    try:
        store.plan(jobs(2))
        driver_error = sqlite3.IntegrityError if persistent_url.startswith("sqlite:") else Exception
        with pytest.raises(driver_error, match="illegal job transition"):
            raw_update(persistent_url, "UPDATE jobs SET state = 'finalized' WHERE key = ?", ("k00000",))
        with pytest.raises(driver_error, match="illegal job transition"):
            raw_update(persistent_url, "UPDATE jobs SET state = 'streaming' WHERE key = ?", ("k00000",))
        raw_update(persistent_url, "UPDATE jobs SET state = 'leased' WHERE key = ?", ("k00001",))  # a legal move passes
        assert store.get("k00000").state is P and store.get("k00001").state is L
        # and through the store's own connection, the refusal is an IllegalTransition
        with pytest.raises(IllegalTransition):
            store._run(lambda conn: conn.execute(store.q("UPDATE jobs SET state = 'failed' WHERE key = ?"), ("k00000",)),
                       write=True)
    finally:
        store.close()


def test_fail_counts_attempts_until_failed(store):
    store.plan(jobs(2))
    states = []
    for _ in range(3):
        claim = store.claim_key("k00000", "w", 30)
        store.mark_streaming(claim.key, claim.epoch)
        states.append(store.fail(claim.key, claim.epoch, "http_503", retryable=True, max_attempts=3))
    assert states == [P, P, X]
    rec = store.get("k00000")
    assert rec.state is X and rec.attempts == 3 and rec.claims == 3 and rec.last_error == "http_503"
    assert rec.lease_owner is None and rec.lease_expires_at is None
    assert store.claim_key("k00000", "w", 30) is None  # failed jobs are not claimable
    claim = store.claim_key("k00001", "w", 30)
    assert store.fail(claim.key, claim.epoch, "http_404", retryable=False, max_attempts=5) is X
    assert store.get("k00001").attempts == 1
    assert store.claim("w", 30) is None


def test_requeue_failed(store):
    store.plan(jobs(3))
    for key in ("k00000", "k00001"):
        claim = store.claim_key(key, "w", 30)
        store.fail(claim.key, claim.epoch, "boom", retryable=False, max_attempts=1)
    assert store.requeue_failed() == 2
    assert store.requeue_failed() == 0
    for key in ("k00000", "k00001"):
        rec = store.get(key)
        assert rec.state is P and rec.attempts == 0 and rec.last_error == "boom"
    claim = store.claim_key("k00000", "w", 30)
    assert claim.epoch == 2
    store.fail(claim.key, claim.epoch, "again", retryable=False, max_attempts=1)
    assert store.requeue("k00000") is True
    assert store.requeue("k00000") is False  # planned now
    assert store.requeue("missing") is False
    assert store.get("k00000").state is P


def test_reopen_a_finished_job(store):
    store.plan(jobs(2))
    claim = store.claim_key("k00000", "w", 30)
    finish(store, claim, etag='"e1"')
    store.reopen("k00000")
    rec = store.get("k00000")
    assert rec.state is P and rec.etag == '"e1"'  # validators kept for revalidation
    store.reopen("k00001")  # planned: no-op
    held = store.claim_key("k00001", "w", 30)
    store.reopen("k00001")  # leased: no-op
    assert store.get("k00001").state is L
    store.reopen("missing")
    again = store.claim_key("k00000", "w2", 30)
    assert again.epoch == claim.epoch + 1 and held.epoch == 1


def test_release_gives_the_job_back_without_a_failure(store):
    store.plan(jobs(1))
    claim = store.claim("w", 30)
    store.mark_streaming(claim.key, claim.epoch)
    store.release(claim.key, claim.epoch)
    rec = store.get(claim.key)
    assert rec.state is P and rec.attempts == 0 and rec.lease_owner is None
    with pytest.raises(LeaseLostError):  # the released lease is over
        store.finish(claim.key, claim.epoch, path="/x", size=1, sha256="00")
    again = store.claim("w", 30)
    assert again.key == claim.key and again.epoch > claim.epoch
    store.release("missing", 1)


def test_stats(store, advance):
    assert store.stats() == {
        "by_state": {"planned": 0, "leased": 0, "streaming": 0, "finalized": 0, "failed": 0},
        "expired_leases": 0, "oldest_in_flight_s": None, "failures_by_reason": {}, "total": 0, "by_location": {},
    }
    store.plan(jobs(8))
    expiring = store.claim_key("k00000", "w", 10)
    streaming = store.claim_key("k00001", "w", 60)
    store.mark_streaming(streaming.key, streaming.epoch)
    store.claim_key("k00002", "w", 60)
    finish(store, store.claim_key("k00003", "w", 60))
    for key, why in [("k00004", "http_404"), ("k00005", "http_404"), ("k00006", "checksum_mismatch")]:
        claim = store.claim_key(key, "w", 60)
        store.fail(claim.key, claim.epoch, why, retryable=False, max_attempts=1)
    advance(30)
    stats = store.stats()
    assert stats["by_state"] == {"planned": 1, "leased": 2, "streaming": 1, "finalized": 1, "failed": 3}
    assert stats["total"] == 8
    assert stats["expired_leases"] == 1
    assert 30 <= stats["oldest_in_flight_s"] < 40
    assert stats["failures_by_reason"] == {"http_404": 2, "checksum_mismatch": 1}
    assert list(stats["failures_by_reason"]) == ["http_404", "checksum_mismatch"]
    json.dumps(stats)
    assert expiring.epoch == 1
    assert stats["by_location"] == {}  # no location was given


def test_jobs_are_counted_per_location(store):
    store.location = "host-a:/data/a"
    store.plan(jobs(3))
    finish(store, store.claim_key("k00000", "w", 30))
    store.location = "host-b:/data/b"  # another folder finishes one and fails one
    finish(store, store.claim_key("k00001", "w", 30))
    claim = store.claim_key("k00002", "w", 30)
    store.fail(claim.key, claim.epoch, "http_404", retryable=False, max_attempts=1)
    assert [r.location for r in store.records()] == ["host-a:/data/a", "host-b:/data/b", "host-b:/data/b"]
    nothing = {"planned": 0, "leased": 0, "streaming": 0, "finalized": 0, "failed": 0}
    assert store.stats()["by_location"] == {"host-a:/data/a": {**nothing, "finalized": 1},
                                            "host-b:/data/b": {**nothing, "finalized": 1, "failed": 1}}


def test_records_by_state(store):
    store.plan(jobs(5))
    finish(store, store.claim_key("k00003", "w", 30))
    assert [r.key for r in store.records(F)] == ["k00003"]
    assert [r.key for r in store.records("planned")] == ["k00000", "k00001", "k00002", "k00004"]
    assert [r.key for r in store.records()] == [f"k{i:05d}" for i in range(5)]


def test_one_store_shared_by_threads(store):
    store.plan(jobs(300))
    keys = frozenset(f"k{i:05d}" for i in range(300))
    done: list[str] = []
    lock = threading.Lock()

    def work(i: int) -> None:
        while (claim := store.claim(f"t{i}", 30, keys=keys if i % 2 else None)) is not None:
            store.heartbeat(claim.key, claim.epoch, 30)
            store.mark_streaming(claim.key, claim.epoch)
            finish(store, claim)
            with lock:
                done.append(claim.key)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(done) == sorted(keys)
    assert store.stats()["by_state"]["finalized"] == 300


# -- the operation ledger ----------------------------------------------------------------------


def test_ledger_statuses(store):
    store.plan(jobs(1))
    claim = store.claim("w", 30)
    op = operation_key(claim.key, "transfer")
    assert store.op_get(op) is None
    assert store.op_begin(op, claim.key, "transfer", claim.epoch) == "new"
    got = store.op_get(op)
    assert (got["status"], got["kind"], got["job_key"], got["result"], got["epoch"]) == ("pending", "transfer", claim.key, None, 1)
    assert isinstance(got["updated_at"], float)
    assert store.op_begin(op, claim.key, "transfer", 2) == "pending"  # started, never finished: redo it
    assert store.op_get(op)["epoch"] == 2
    store.op_failed(op, "connection reset")
    assert store.op_get(op)["status"] == "failed" and store.op_get(op)["error"] == "connection reset"
    assert store.op_begin(op, claim.key, "transfer", 3) == "failed"  # retry allowed: pending again
    assert store.op_get(op)["status"] == "pending"
    store.op_done(op, {"bytes": 1234, "outcome": "downloaded"})
    assert store.op_get(op)["result"] == {"bytes": 1234, "outcome": "downloaded"}
    assert store.op_begin(op, claim.key, "transfer", 4) == "done"  # done: do not repeat
    got = store.op_get(op)
    assert got["status"] == "done" and got["epoch"] == 3 and got["result"] == {"bytes": 1234, "outcome": "downloaded"}
    manifest = operation_key(claim.key, "manifest")
    assert store.op_begin(manifest, claim.key, "manifest", 0) == "new"
    store.op_done(manifest)
    assert store.op_get(manifest)["result"] is None and store.op_get(manifest)["status"] == "done"


def test_ledger_replay_after_a_crash(store, advance):
    """A job replayed after a crash redoes the effect that did not complete and skips those that did."""
    store.plan(jobs(1))
    first = store.claim("crashed", 10)
    key = first.key
    ops = {kind: operation_key(key, kind) for kind in ("transfer", "finalize", "manifest")}
    store.op_begin(ops["transfer"], key, "transfer", first.epoch)
    store.op_done(ops["transfer"], {"bytes": 10})
    store.op_begin(ops["finalize"], key, "finalize", first.epoch)
    # ... the process dies here: finalize started, not done; manifest never started
    advance(11)
    replay = store.claim("next", 30)
    assert replay.key == key and replay.epoch == first.epoch + 1
    performed = []
    for kind in ("transfer", "finalize", "manifest"):
        if store.op_begin(ops[kind], key, kind, replay.epoch) != "done":
            performed.append(kind)
            store.op_done(ops[kind], {"by": replay.epoch})
    assert performed == ["finalize", "manifest"]
    finish(store, replay)
    assert all(store.op_begin(op, key, kind, 9) == "done" for kind, op in ops.items())


def test_ledger_errors(store):
    store.plan(jobs(1))
    with pytest.raises(UnknownJobError):
        store.op_begin("op-x", "never-planned", "transfer", 1)
    with pytest.raises(StoreError):
        store.op_done("op-never-begun", {})
    with pytest.raises(StoreError):
        store.op_failed("op-never-begun", "x")
    assert store.op_get("op-x") is None


# -- schema, persistence, URLs -------------------------------------------------------------------


def test_schema_version_table(persistent_url):
    store = open_store(persistent_url)
    store.plan(jobs(3))
    assert store.schema_version() == SCHEMA_VERSION == 4 and store.created
    store.close()
    raw_update(persistent_url, "INSERT INTO schema_version (version, applied_at) VALUES (?, 0)", (99,))
    with pytest.raises(SchemaVersionError, match="schema version 99"):
        open_store(persistent_url)
    assert issubclass(SchemaVersionError, StoreError)
    raw_update(persistent_url, "DELETE FROM schema_version WHERE version = ?", (99,))
    store = open_store(persistent_url)  # nothing was dropped or repaired
    try:
        assert len(list(store.records())) == 3
    finally:
        store.close()


def test_a_reopened_store_keeps_its_data(persistent_url):
    store = open_store(persistent_url)
    store.plan(jobs(3))
    claim = store.claim_key("k00001", "w", 30)
    finish(store, claim, etag='"abc"', last_modified="Tue, 01 Apr 2025 00:00:00 GMT", final_url="https://cdn/x",
           content_type="application/pdf", mtime_ns=1_700_000_000_123_456_789)
    op = operation_key("k00001", "manifest")
    store.op_begin(op, "k00001", "manifest", 0)
    store.op_done(op, {"row": 1})
    before = store.get("k00001")
    store.close()
    with pytest.raises(StoreError):
        store.get("k00001")

    again = open_store(persistent_url)
    try:
        assert again.get("k00001") == before
        assert before.mtime_ns == 1_700_000_000_123_456_789 and before.size == 10
        assert again.op_get(op)["status"] == "done" and again.op_get(op)["result"] == {"row": 1}
        assert again.op_begin(op, "k00001", "manifest", 0) == "done"
        assert again.stats()["by_state"]["planned"] == 2
        assert again.claim("w", 30).epoch == 1
    finally:
        again.close()


def test_open_store_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for url in ("sqlite:rel.db", f"sqlite:///{tmp_path / 'abs.db'}", f"sqlite:///{tmp_path}/abs2.db".replace("sqlite:///", "sqlite:////")):
        s = open_store(url)
        s.plan(jobs(1))
        s.close()
    assert (tmp_path / "rel.db").exists() and (tmp_path / "abs.db").exists() and (tmp_path / "abs2.db").exists()
    s = open_store(f"sqlite:///{tmp_path / 'abs.db'}")
    assert s.url == f"sqlite://{tmp_path / 'abs.db'}" and parse_sqlite_url(s.url) == tmp_path / "abs.db"
    s.close()
    memory = open_store("memory:")
    assert type(memory).__name__ == "MemoryStore"
    memory.close()
    for bad in ("mysql://host/db", "jobs.db", "", "sqlite:", "sqlite::memory:", f"sqlite:///{tmp_path}/no/such/dir/jobs.db"):
        with pytest.raises(UsageError) as info:
            open_store(bad)
        assert "\n" not in str(info.value)


def test_sqlite_connection_settings(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'jobs.db'}")
    try:
        def pragmas(conn):
            return tuple(conn.execute(f"PRAGMA {name}").fetchone()[0] for name in ("journal_mode", "foreign_keys", "busy_timeout", "synchronous"))

        seen = []
        threads = [threading.Thread(target=lambda: seen.append(store._run(pragmas, write=False))) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seen.append(store._run(pragmas, write=False))
        assert set(seen) == {("wal", 1, 30000, 1)}
        tables = {r[0] for r in sqlite3.connect(tmp_path / "jobs.db").execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"jobs", "job_transitions", "operations", "schema_version", "job_states"} <= tables
    finally:
        store.close()


@pytest.mark.postgres
def test_postgres_url_hides_the_password(fresh_postgres_dsn):  # noqa: F811
    from contentdownload.store.postgres import redact

    assert redact("postgresql://user:secret@db.example:5432/jobs") == "postgresql://user:***@db.example:5432/jobs"
    store = open_store(fresh_postgres_dsn)
    try:
        assert store.url == fresh_postgres_dsn and "postgresql://" in repr(store)
    finally:
        store.close()
    with pytest.raises(StoreError) as info:
        open_store("postgresql://nobody:pw@127.0.0.1:1/none")
    assert "pw" not in str(info.value) and "\n" not in str(info.value)


def test_closed_store_refuses_work(store):
    store.close()
    with pytest.raises(StoreError):
        store.plan(jobs(1))
    with pytest.raises(StoreError):
        store.claim("w", 30)
    store.close()  # twice is fine


def test_records_are_plain_values(store):
    store.plan(jobs(1))
    rec = store.get("k00000")
    assert isinstance(rec.state, JobState) and rec.state == "planned" and isinstance(rec.updated_at, float)
    assert isinstance(rec.payload, dict) and isinstance(rec.epoch, int)


def test_an_expired_lease_is_taken_by_the_next_claim_wherever_the_cursor_is(store, advance):
    """Takeover comes within the TTL plus one claim, however far the claimers' cursors are past the job."""
    listed = jobs(400)
    store.plan(listed)
    keys = frozenset(j.key for j in listed)
    held = [store.claim("a", 30, keys=keys) for _ in range(3)]
    dying = store.claim("dying", 5, keys=keys)
    for _ in range(300):  # this connection's cursor is now far past the dying job
        finish(store, store.claim("b", 30, keys=keys))
    store.heartbeat(dying.key, dying.epoch, 5)  # its last beat: PostgreSQL's clock ran on during the claims above
    advance(4)
    assert store.claim("b", 30, keys=keys).key == "k00304"  # not expired yet: the next planned job
    advance(2)
    taken = store.claim("b", 30, keys=keys)
    assert (taken.key, taken.epoch) == (dying.key, dying.epoch + 1)
    assert store.claim("c", 30, keys=keys).key == "k00305"  # then planned jobs, in order, again
    other = store.claim("d", 30)  # the same without a key set (in no promised order): a planned job, first claimed
    assert other.key not in {c.key for c in held} | {dying.key, "k00304", "k00305"} and other.epoch == 1
    assert all(store.get(c.key).lease_owner == "a" for c in held)


# -- the clocks leases are measured with ---------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite"])
def local_url(request, tmp_path) -> str:
    """A store on one machine, whose leases run on the machine's steady clock."""
    return "memory:" if request.param == "memory" else f"sqlite:///{tmp_path / 'jobs.db'}"


def test_a_wall_clock_step_neither_expires_nor_prolongs_a_lease(local_url):
    clock = ManualClock()
    store = open_store(local_url, clock=clock)
    try:
        store.plan(jobs(6))
        claims = [store.claim("w", 60) for _ in range(6)]
        for claim in claims[:4]:
            store.mark_streaming(claim.key, claim.epoch)
        clock.step_wall(120)  # NTP, an administrator: twice the TTL at once
        assert store.claim("thief", 60) is None
        assert all(store.claim_key(c.key, "thief", 60) is None for c in claims)
        assert store.stats()["expired_leases"] == 0
        clock.step_wall(-3600)  # and back, far: the leases still end on time
        clock.advance(59)
        assert store.claim("thief", 60) is None
        clock.advance(2)
        assert store.stats()["expired_leases"] == 6
        taken = {store.claim("next", 60).key for _ in range(6)}
        assert taken == {c.key for c in claims}
    finally:
        store.close()


def test_without_a_boot_id_sqlite_leases_run_on_the_wall_clock(tmp_path):
    clock = ManualClock(boot=None)  # a system that does not say which boot this is
    store = open_store(f"sqlite:///{tmp_path / 'jobs.db'}", clock=clock)
    try:
        store.plan(jobs(1))
        claim = store.claim("w", 60)
        clock.advance(120)  # the steady clock alone would not do: readings of an unknown boot mean nothing
        clock.steady_s -= 120
        assert store.claim("next", 60).epoch == claim.epoch + 1
    finally:
        store.close()


def test_the_real_steady_clock_and_boot_id(tmp_path):
    from contentdownload.clock import SYSTEM_CLOCK, boot_id

    first = SYSTEM_CLOCK.steady()
    assert SYSTEM_CLOCK.steady() >= first and SYSTEM_CLOCK.boot_id() == boot_id()
    if Path("/proc/sys/kernel/random/boot_id").exists():
        assert len(boot_id()) == 36
    store = open_store(f"sqlite:///{tmp_path / 'jobs.db'}")
    try:
        store.plan(jobs(1))
        store.claim("w", 60)
        lease = sqlite3.connect(tmp_path / "jobs.db").execute(
            "SELECT lease_boot_id, lease_boot_deadline FROM jobs").fetchone()
        assert lease[0] == boot_id() and first + 59 < lease[1] < SYSTEM_CLOCK.steady() + 61
    finally:
        store.close()


def test_a_lease_taken_in_another_boot_is_claimable(tmp_path):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    before_reboot = ManualClock(boot="boot-1", steady=50_000.0)
    store = open_store(url, clock=before_reboot)
    store.plan(jobs(3))
    claims = [store.claim("old-boot", 3600) for _ in range(2)]
    store.mark_streaming(claims[0].key, claims[0].epoch)
    store.close()

    after_reboot = ManualClock(boot="boot-2", steady=60_000.0)  # its steady clock even reads later: no matter
    store = open_store(url, clock=after_reboot)
    try:
        assert store.stats()["expired_leases"] == 2
        assert store.claim_key(claims[0].key, "new-boot", 60).epoch == claims[0].epoch + 1
        assert store.claim("new-boot", 60, keys=frozenset(j.key for j in jobs(3))).key == claims[1].key
        assert store.claim("new-boot", 60).key == "k00002"
        assert store.claim("other", 60) is None  # the new boot's leases hold
    finally:
        store.close()
    raw_update(url, "UPDATE jobs SET lease_boot_id = ? WHERE key = ?", ("an-older-boot", "k00002"))
    store = open_store(url)  # this machine's real boot: every lease above is of another boot
    try:
        assert {store.claim("real", 60).key for _ in range(3)} == {"k00000", "k00001", "k00002"}
        assert store.claim("real", 60) is None
    finally:
        store.close()


def _old_format_store(url: str) -> None:
    """A store as the first schema version made it, with two leases measured on the wall clock."""
    from contentdownload.store.schema import MIGRATIONS, POSTGRES, SQLITE, version_table

    dialect = SQLITE if url.startswith("sqlite:") else POSTGRES
    now = time.time()
    statements = [version_table(dialect), *MIGRATIONS[0][1](dialect),
                  "INSERT INTO schema_version (version, applied_at) VALUES (1, 0)"]
    for key, state, expires in (("k00000", "planned", None), ("k00001", "leased", now + 3600),
                                ("k00002", "streaming", now - 10)):
        statements.append(
            "INSERT INTO jobs (key, scheme, state, payload, epoch, lease_owner, lease_expires_at, leased_at, created_at, "
            f"updated_at) VALUES ('{key}', 'test', '{state}', '{{}}', {0 if expires is None else 1}, "
            f"{'NULL' if expires is None else repr('old')}, {'NULL' if expires is None else expires}, "
            f"{now - 60}, {now - 60}, {now - 60})")
    if url.startswith("sqlite:"):
        conn = sqlite3.connect(parse_sqlite_url(url))
        conn.executescript(";\n".join(statements) + ";")
        conn.close()
    else:
        import psycopg

        with psycopg.connect(url) as conn:
            for statement in statements:
                conn.execute(statement)


def test_a_store_of_the_first_schema_opens_and_keeps_its_leases(persistent_url):
    _old_format_store(persistent_url)
    store = open_store(persistent_url)
    try:
        assert store.schema_version() == SCHEMA_VERSION
        assert [r.key for r in store.records()] == ["k00000", "k00001", "k00002"]
        assert store.stats()["expired_leases"] == 1
        keys = frozenset(j.key for j in jobs(3))
        taken = store.claim("new", 60, keys=keys)  # the old lease that ran out on the clock it was taken with
        assert (taken.key, taken.epoch) == ("k00002", 2)
        assert store.claim("new", 60, keys=keys).key == "k00000"
        assert store.claim("new", 60, keys=keys) is None  # the old lease still running is left alone
        finish(store, taken)
        assert store.get("k00002").state is F
    finally:
        store.close()


def named(key: str, identity: str | None, name: str) -> PlannedJob:
    payload = {"urls": [f"https://example.org/{name}"], "relative_path": name}
    if identity is not None:
        payload["identity"] = identity
    return PlannedJob(key=key, scheme="test", payload=payload)


def test_lookup_by_key_identity_and_name(store):
    store.plan([named("k1", "id-1", "Paper.pdf"), named("k2", None, "old.pdf"), named("k3", "id-3", "Straße.pdf"),
                *jobs(50)])
    assert [r.key for r in store.lookup(keys=["k1", "nope", "k00007"])] == ["k00007", "k1"]
    assert [r.key for r in store.lookup(identities=["id-3", "id-9"])] == ["k3"]
    # names compare case-insensitively (casefold): safe on case-insensitive filesystems
    assert [r.key for r in store.lookup(names=["paper.PDF", "STRASSE.pdf", "OLD.pdf"])] == ["k1", "k2", "k3"]
    both = store.lookup(keys=["k1"], identities=["id-1"], names=["paper.pdf"])
    assert [r.key for r in both] == ["k1"] and both[0].payload["relative_path"] == "Paper.pdf"
    assert store.lookup() == []
    many = store.lookup(keys=[f"k{i:05d}" for i in range(0, 2000)])  # more keys than one statement takes
    assert len(many) == 50


def test_count_active_among_keys(store):
    store.plan(jobs(6))
    mine = frozenset(["k00000", "k00001", "k00002"])
    assert store.count_active(mine) == 3
    finish(store, store.claim_key("k00000", "w", 30))
    store.claim_key("k00001", "w", 30)  # leased: still active
    claim = store.claim_key("k00002", "w", 30)
    store.fail(claim.key, claim.epoch, "http_404", retryable=False, max_attempts=1)
    assert store.count_active(mine) == 1
    assert store.count_active(frozenset(["k00000"])) == 0
    assert store.count_active(frozenset()) == 0


def test_a_store_of_the_first_schema_is_migrated_with_its_lookups(persistent_url):
    from contentdownload.store.schema import MIGRATIONS, POSTGRES, SQLITE, version_table
    dialect = SQLITE if persistent_url.startswith("sqlite:") else POSTGRES
    for statement in [version_table(dialect), *MIGRATIONS[0][1](dialect)]:  # a store as the first schema left it
        raw_update(persistent_url, statement, ())
    raw_update(persistent_url, "INSERT INTO schema_version (version, applied_at) VALUES (1, 0)", ())
    for i in range(1, 1203):  # more than one page of the fill
        raw_update(persistent_url, "INSERT INTO jobs (key, scheme, payload, created_at, updated_at) VALUES (?, 'test', ?, 0, 0)",
                   (f"k{i:05d}", json.dumps({"identity": f"id-{i}", "relative_path": f"Big{i}.PDF"})))
    store = open_store(persistent_url)
    try:
        assert store.schema_version() == SCHEMA_VERSION >= 2
        assert [r.key for r in store.lookup(identities=["id-1", "id-1202"])] == ["k00001", "k01202"]
        assert [r.key for r in store.lookup(names=["big7.pdf"])] == ["k00007"]
    finally:
        store.close()
