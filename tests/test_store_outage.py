"""The job store rides out a PostgreSQL server that restarts, stops for a while, or loses its backends.

Store calls wait (bounded exponential backoff, ``retry_s``) while the server is away and then
carry on; past the budget they raise StoreUnavailableError, which is neither a job failure nor
a plugin fault.
"""

from __future__ import annotations

import threading

import psycopg
import pytest

from contentdownload.errors import ContentDownloadError, StoreError, StoreUnavailableError
from contentdownload.store import JobState, PlannedJob, open_store
from contentdownload.testing.pg import PostgresNotAvailable, TemporaryPostgres, fresh_postgres_dsn, postgres_dsn  # noqa: F401

pytestmark = pytest.mark.postgres
N = 60


@pytest.fixture
def private_pg(tmp_path):
    """A server of this test's own, so that stopping it disturbs no other test."""
    try:
        pg = TemporaryPostgres().start()
    except PostgresNotAvailable as exc:
        pytest.skip(str(exc))
    yield pg
    pg.stop()


def _work(url: str, done: list, errors: list, started: threading.Event) -> None:
    """One worker: claim, heartbeat, record an operation and finish jobs until none is left."""
    store = open_store(url, retry_s=60)
    try:
        while True:
            claim = store.claim("w", 30)
            if claim is None:
                return
            store.heartbeat(claim.key, claim.epoch, 30)
            store.op_begin(f"op-{claim.key}", claim.key, "transfer", claim.epoch)
            store.op_done(f"op-{claim.key}", {"n": 1})
            store.finish(claim.key, claim.epoch, path=f"/out/{claim.key}", size=1, sha256="ab" * 32)
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
    threads = [threading.Thread(target=_work, args=(url, done, errors, started)) for _ in range(3)]
    for t in threads:
        t.start()
    assert started.wait(60)
    caplog.set_level("WARNING", logger="contentdownload.store")
    outage()
    for t in threads:
        t.join(120)
    assert not errors, errors
    retries = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
    assert retries and "retrying in" in retries[0]  # the outage was met, and waited out
    print(f"{len(retries)} retries; last: {retries[-1]}")
    records = list(store.records())
    store.close()
    assert sorted(done) == [f"k{i:03d}" for i in range(N)]  # each job finished once, none lost
    assert {r.state for r in records} == {JobState.FINALIZED} and all(r.claims >= 1 for r in records)
    return records


def test_a_fast_restart_in_the_middle_of_a_run(private_pg, caplog):
    url = private_pg.create_database()
    _run_through(url, lambda: private_pg.ctl("restart", "-m", "fast"), caplog)


def test_a_server_stopped_then_started(private_pg, caplog):
    url = private_pg.create_database()

    def outage() -> None:
        private_pg.ctl("stop", "-m", "fast")
        threading.Event().wait(5)  # the outage itself: the server is down for 5 s
        private_pg.ctl("start", "-o", f"-p {private_pg.port} -k {private_pg.socket_dir}")

    _run_through(url, outage, caplog)


def test_backends_terminated_repeatedly(fresh_postgres_dsn, caplog):  # noqa: F811
    stop = threading.Event()

    def outage() -> None:
        with psycopg.connect(fresh_postgres_dsn, autocommit=True) as admin:
            for _ in range(20):
                admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE datname = current_database() AND pid <> pg_backend_pid()")
                if stop.wait(0.2):
                    return

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
