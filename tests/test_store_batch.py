"""Batches of store calls in one transaction (``JobStore.batched``, ``claim_many``, ``heartbeat_many``)
on the three stores: all or nothing, nested batches joined, a refused key leaving the others, a
transient failure running the whole batch again, and real processes claiming in batches.

This module is also the claimer program: ``python test_store_batch.py claimer URL OUT``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

import psycopg
import pytest

from contentdownload.errors import LeaseLostError
from contentdownload.store import JobState, PlannedJob, UnknownJobError, open_store
from contentdownload.store.sqlite import SQLiteStore
from contentdownload.testing.pg import create_database, fresh_postgres_dsn, postgres_dsn  # noqa: F401  (fixtures)
from test_store_conformance import persistent_url, stepper, url  # noqa: F401  (fixtures)

CORE = Path(__file__).resolve().parents[1] / "core"
L, F = JobState.LEASED, JobState.FINALIZED
SHA = "ab" * 32
N_CLAIMED = 2000  # jobs the claimer processes share
BODY = bytes(256 << 10)


class Abort(Exception):
    """Raised by a batch's function after its store calls."""


def keys(n: int, prefix: str = "k") -> list[str]:
    return [f"{prefix}{i:04d}" for i in range(n)]


def planned_store(url: str, n: int, clock=None):
    store = open_store(url, clock=clock)
    store.plan([PlannedJob(key=k, scheme="test") for k in keys(n)])
    return store


def finish(store, claim) -> None:
    store.finish(claim.key, claim.epoch, path=f"/out/{claim.key}", size=1, sha256=SHA)


# -- one transaction ---------------------------------------------------------------------------


def test_a_batch_that_raises_after_three_finishes_records_none(url):
    store = planned_store(url, 5)
    claims = [store.claim("w", 60) for _ in range(5)]

    def work() -> None:
        for claim in claims[:3]:
            finish(store, claim)
        store.op_begin("op-1", claims[0].key, "transfer", claims[0].epoch)
        store.plan([PlannedJob(key="new", scheme="test")])
        raise Abort("after three finishes")

    with pytest.raises(Abort):
        store.batched(work)
    assert [store.get(c.key).state for c in claims] == [L] * 5
    assert [store.get(c.key).epoch for c in claims] == [c.epoch for c in claims]
    assert store.op_get("op-1") is None and store.get("new") is None
    for claim in claims[:3]:  # the leases still hold: the jobs can be finished now
        finish(store, claim)
    assert store.stats()["by_state"]["finalized"] == 3
    store.close()


def test_a_batch_returns_fn_result_and_commits_every_call(url):
    store = planned_store(url, 4)
    claims = store.batched(lambda: [store.claim("w", 60) for _ in range(4)])
    assert sorted(c.key for c in claims) == keys(4)
    assert store.batched(lambda: [finish(store, c) for c in claims] and "done") == "done"
    assert {r.state for r in store.records()} == {F}
    store.close()


def test_nested_batches_join_the_outer_one(url):
    store = planned_store(url, 3)
    claims = [store.claim("w", 60) for _ in range(3)]

    def outer() -> None:
        assert store.batched(lambda: finish(store, claims[0]) or "inner") == "inner"
        finish(store, claims[1])
        raise Abort

    with pytest.raises(Abort):
        store.batched(outer)
    assert [store.get(c.key).state for c in claims] == [L] * 3  # the inner batch went with the outer
    store.close()


def test_other_connections_see_a_batch_only_when_it_returns(persistent_url):
    store = planned_store(persistent_url, 2)
    other = open_store(persistent_url)
    claims = [store.claim("w", 60) for _ in range(2)]
    seen = []

    def work() -> None:
        for claim in claims:
            finish(store, claim)
            seen.append(other.get(claim.key).state)  # another connection (SQLite: while this one holds the write lock)

    store.batched(work)
    assert seen == [L, L]
    assert [other.get(c.key).state for c in claims] == [F, F]
    other.close()
    store.close()


def test_a_fenced_key_inside_a_batch_does_not_abort_the_others(url):
    store = planned_store(url, 4)
    claims = [store.claim("w", 60) for _ in range(4)]
    store.release(claims[1].key, claims[1].epoch)
    taken = store.claim_key(claims[1].key, "other", 60)  # someone else holds this one now
    refused: dict[str, Exception] = {}
    runs = []

    def work() -> None:
        runs.append(1)
        for claim in claims:
            try:
                finish(store, claim)
            except LeaseLostError as exc:
                refused[claim.key] = exc
        try:  # a statement the database refuses (PostgreSQL: it would abort a transaction without a savepoint)
            store.op_begin("op-unknown", "no-such-job", "transfer", 1)
        except UnknownJobError as exc:
            refused["no-such-job"] = exc
        store.op_begin("op-after", claims[0].key, "transfer", claims[0].epoch)

    store.batched(work)
    # PostgreSQL: the refused statement aborted the transaction, and the batch ran again with a savepoint per call
    assert len(runs) == (2 if url.startswith("postgres") else 1)
    assert set(refused) == {claims[1].key, "no-such-job"}
    assert [store.get(c.key).state for c in claims] == [F, L, F, F]
    assert store.get(claims[1].key).lease_owner == "other" and store.get(claims[1].key).epoch == taken.epoch
    assert store.op_get("op-after")["status"] == "pending" and store.op_get("op-unknown") is None
    store.close()


def test_heartbeat_many_names_the_leases_lost(url):
    store = planned_store(url, 4)
    claims = [store.claim("w", 60) for _ in range(4)]
    assert store.heartbeat_many([(c.key, c.epoch) for c in claims], 60) == {}
    store.release(claims[2].key, claims[2].epoch)
    refused = store.heartbeat_many([(c.key, c.epoch) for c in claims] + [("nope", 1)], 120)
    assert set(refused) == {claims[2].key, "nope"}
    assert isinstance(refused[claims[2].key], LeaseLostError) and isinstance(refused["nope"], UnknownJobError)
    for claim in (claims[0], claims[1], claims[3]):  # the held ones were extended, in the same transaction
        rec = store.get(claim.key)
        assert rec.lease_expires_at - rec.updated_at == pytest.approx(120, abs=1)
    store.close()


# -- claim_many --------------------------------------------------------------------------------


def test_claim_many_takes_expired_leases_first_then_planned_keys_in_order(url):
    clock, advance = stepper(url)
    store = planned_store(url, 12, clock)
    run_keys = frozenset(keys(12))
    dead = []
    for key in ("k0009", "k0004", "k0007"):  # held by a worker that died, expiring in this order
        dead.append(store.claim_key(key, "dead", 1800))
        advance(1)
    advance(3600)
    claims = store.claim_many("live", 600, run_keys, 6)
    assert [c.key for c in claims] == ["k0009", "k0004", "k0007", "k0000", "k0001", "k0002"]
    assert [c.epoch for c in claims[:3]] == [d.epoch + 1 for d in dead]
    assert {c.owner for c in claims} == {"live"}
    rest = store.claim_many("live", 600, run_keys, 100)
    assert [c.key for c in rest] == ["k0003", "k0005", "k0006", "k0008", "k0010", "k0011"]
    assert store.claim_many("live", 600, run_keys, 100) == []
    store.close()


@pytest.fixture
def two_db_urls(persistent_url, tmp_path) -> list[str]:
    """Two empty stores of one kind."""
    if persistent_url.startswith("sqlite"):
        return [persistent_url, f"sqlite:///{tmp_path / 'other.db'}"]
    return [persistent_url, create_database(persistent_url)]


def test_claim_many_claims_what_successive_claims_would(two_db_urls):
    """Two stores in the same state: ``claim_many`` and a loop of ``claim`` hand out the same jobs in the same order."""
    stores = []
    run_keys = frozenset(keys(40)[5:])
    for each in two_db_urls:
        clock, advance = stepper(each)
        store = planned_store(each, 40, clock)
        for key in ("k0030", "k0002", "k0011"):
            store.claim_key(key, "dead", 1800)
            advance(1)
        for key in keys(20)[12:18]:
            store.claim_key(key, "someone", 100_000)
        advance(3600)
        stores.append(store)
    batched, single = stores
    handed = []
    for limit in (4, 7, 100):
        many = [(c.key, c.epoch) for c in batched.claim_many("w", 60, run_keys, limit)]
        one = []
        while len(one) < limit and (claim := single.claim("w", 60, run_keys)) is not None:
            one.append((claim.key, claim.epoch))
        assert many == one and many
        handed += [k for k, _ in many]
    assert handed[:4] == ["k0030", "k0011", "k0005", "k0006"]  # the expired of the run's keys first, longest expired first
    assert len(handed) == 35 - 6 and "k0012" not in handed  # what "someone" holds stays held
    for store in stores:
        store.close()


def test_a_rolled_back_batch_leaves_the_claims_to_come_as_they_were(persistent_url):
    """The batch loaded the run's key set and moved its claim cursor: both are undone with its transaction."""
    store = planned_store(persistent_url, 10)
    run_keys = frozenset(keys(10))
    taken = []

    def work() -> None:
        taken.extend(store.claim_many("w", 60, run_keys, 4))
        raise Abort

    with pytest.raises(Abort):
        store.batched(work)
    assert [c.key for c in taken] == keys(4)
    assert [c.key for c in store.claim_many("w", 60, run_keys, 4)] == keys(4)
    assert [c.key for c in store.claim_many("w", 60, run_keys, 4)] == keys(8)[4:]
    store.close()


def claimer_main(url: str, out: str) -> int:
    """A claimer process: waits for a line on stdin, then claims in batches of 7 and finishes them."""
    store = open_store(url)
    run_keys = frozenset(keys(N_CLAIMED))
    print("ready", flush=True)
    sys.stdin.readline()
    claimed: list[str] = []
    while claims := store.claim_many(f"p{os.getpid()}", 60, run_keys, 7):
        claimed += [c.key for c in claims]
        for claim in claims:
            hashlib.sha256(BODY).digest()  # the "download": time out of the store, for the others to claim
            finish(store, claim)
    store.close()
    Path(out).write_text(json.dumps(claimed))
    return 0


def test_three_processes_claiming_in_batches_claim_each_key_once(persistent_url, tmp_path):
    store = planned_store(persistent_url, N_CLAIMED)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(CORE), os.environ.get("PYTHONPATH", "")]))
    outs = [tmp_path / f"p{i}.json" for i in range(3)]
    procs = [subprocess.Popen([sys.executable, __file__, "claimer", persistent_url, str(out)], env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for out in outs]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    for proc in procs:  # all at once
        proc.stdin.write("go\n")
        proc.stdin.flush()
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
    per_process = [json.loads(out.read_text()) for out in outs]
    counts = Counter(k for claimed in per_process for k in claimed)
    assert set(counts) == set(keys(N_CLAIMED)) and set(counts.values()) == {1}
    assert all(claimed for claimed in per_process), [len(c) for c in per_process]
    assert {r.state for r in store.records()} == {F} and {r.claims for r in store.records()} == {1}
    store.close()


# -- transient failures run the whole batch again ----------------------------------------------

HOLDER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("holding", flush=True)
sys.stdin.readline()
conn.execute("ROLLBACK")
"""


def test_sqlite_batch_waits_out_a_write_lock_held_by_another_process(tmp_path, caplog):
    path = tmp_path / "jobs.db"
    planned_store(f"sqlite:///{path}", 3).close()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "holding"

    def release_holder(_seconds: float) -> None:  # the store's pause between retries: the other process lets go
        if holder.poll() is None:
            holder.stdin.write("done\n")
            holder.stdin.flush()
            holder.wait(30)

    store = SQLiteStore(path, busy_timeout=0.05, sleep=release_holder, retry_s=60)
    attempts = []

    def work() -> list:
        attempts.append(1)
        return [store.claim("w", 60) for _ in range(3)]

    caplog.set_level(logging.WARNING, logger="contentdownload.store")
    claims = store.batched(work)
    assert holder.returncode == 0 and len(attempts) == 1  # the first attempt never began: the lock was held
    assert sorted(c.key for c in claims) == keys(3)
    retries = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(retries) == 1 and "locked" in retries[0] and "retrying in" in retries[0]
    store.close()


@pytest.mark.parametrize("swallowed", [False, True])
def test_a_transient_failure_mid_batch_runs_the_whole_batch_again(tmp_path, caplog, swallowed):
    """The batch's second store call meets "database is locked" (as the driver raises it); even when fn
    catches it, the transaction is lost: everything is rolled back and fn runs again from the start."""
    store = SQLiteStore(tmp_path / "jobs.db", sleep=lambda _s: None)
    store.plan([PlannedJob(key=k, scheme="test") for k in keys(3)])
    claims = [store.claim("w", 60) for _ in range(3)]
    statuses = []

    def locked(conn) -> None:
        raise sqlite3.OperationalError("database is locked")

    def work() -> None:
        statuses.append(store.op_begin("op", claims[0].key, "transfer", claims[0].epoch))
        finish(store, claims[0])
        if len(statuses) == 1:
            try:
                store._run(locked, write=True)
            except sqlite3.OperationalError:
                if not swallowed:
                    raise
        for claim in claims[1:]:
            finish(store, claim)

    caplog.set_level(logging.WARNING, logger="contentdownload.store")
    store.batched(work)
    assert statuses == ["new", "new"]  # the first attempt's op_begin was rolled back with it
    assert {r.state for r in store.records()} == {F}
    assert len([r for r in caplog.records if "retrying in" in r.getMessage()]) == 1
    store.close()


@pytest.mark.postgres
def test_postgres_batch_whose_backend_is_terminated_runs_again(fresh_postgres_dsn, caplog):  # noqa: F811
    store = planned_store(fresh_postgres_dsn, 3)
    claims = [store.claim("w", 60) for _ in range(3)]
    statuses, pids = [], []

    def work() -> None:
        statuses.append(store.op_begin("op", claims[0].key, "transfer", claims[0].epoch))
        finish(store, claims[0])
        pids.append(store._run(lambda conn: conn.info.backend_pid, write=False))  # the batch's own connection
        if len(pids) == 1:
            with psycopg.connect(fresh_postgres_dsn, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (pids[0],))
        for claim in claims[1:]:
            finish(store, claim)

    caplog.set_level(logging.WARNING, logger="contentdownload.store")
    store.batched(work)
    assert statuses == ["new", "new"] and pids[0] != pids[1]
    assert {r.state for r in store.records()} == {F} and {r.epoch for r in store.records()} == {1}
    assert [r for r in caplog.records if "retrying in" in r.getMessage()]
    store.close()


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "claimer":
    sys.exit(claimer_main(sys.argv[2], sys.argv[3]))
