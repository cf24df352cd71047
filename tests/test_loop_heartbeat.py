"""A transfer on the event loop keeps its lease alive without ever waiting on the job store in the loop.

The loop carries every transfer of the process: a heartbeat that waited there for a locked or
unreachable store would stall them all (their sockets unread, Ctrl-C unanswered) for as long
as the store's retries last.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading

import pytest

from contentdownload.errors import LeaseLostError
from contentdownload.jobs.pipeline import HeartbeatOffLoop
from contentdownload.jobs.worker import StoreLease
from contentdownload.store import PlannedJob, open_store

TTL = 3e-6  # a beat is due at every call: the lease asks the store again once a third of it passed


@pytest.fixture
def held(tmp_path):
    db = tmp_path / "jobs.db"
    store = open_store(f"sqlite:///{db}", retry_s=60)
    store.plan([PlannedJob(key="k", scheme="t")])
    claim = store.claim("w", 30)
    yield db, store, StoreLease(store, claim.key, claim.epoch, "w", TTL)
    store.close()


def _to_thread(fn, *args):
    return asyncio.get_running_loop().run_in_executor(None, fn, *args)


def test_a_beat_on_the_loop_returns_while_the_store_is_locked_and_lands_once_it_is_free(held):
    db, store, lease = held
    before = store.get("k").lease_expires_at
    locker = sqlite3.connect(str(db), isolation_level=None, check_same_thread=False)
    locker.execute("BEGIN EXCLUSIVE")  # another process writing: every write of the store waits
    unlocked = threading.Event()

    def unlock() -> None:  # so that a beat that waits in the loop ends, and the test can fail
        locker.execute("ROLLBACK")
        unlocked.set()

    guard = threading.Timer(20, unlock)
    guard.start()
    beat = HeartbeatOffLoop(lease, _to_thread)

    async def on_the_loop():
        beat()  # as the body loop calls it for a chunk
        returned_while_locked = not unlocked.is_set()
        guard.cancel()
        if not unlocked.is_set():
            unlock()
        await beat.settled()
        return returned_while_locked

    try:
        assert asyncio.run(on_the_loop()), "the beat waited on the locked store in the loop"
    finally:
        guard.cancel()
        locker.close()
    assert store.get("k").lease_expires_at != before  # the beat was not dropped: it rewrote the lease in the store


def test_a_lease_lost_in_a_background_beat_is_raised_by_the_next_call(held):
    db, store, lease = held
    other = open_store(f"sqlite:///{db}")  # another worker's
    beat = HeartbeatOffLoop(lease, _to_thread)

    async def on_the_loop():
        store.heartbeat("k", lease.epoch, TTL)  # the lease runs out at once...
        assert other.claim("v", 30) is not None  # ...and another worker took the job over
        beat()  # returns: the beat runs in a thread
        await beat.settled()  # the beat's end (it raised there, in the thread)
        with pytest.raises(LeaseLostError):
            beat()

    try:
        asyncio.run(on_the_loop())
    finally:
        other.close()


def test_off_the_loop_the_beat_is_the_leases_own(held):
    _, store, lease = held
    before = store.get("k").lease_expires_at
    HeartbeatOffLoop(lease, _to_thread)()  # a handed-over attempt, in a worker thread: no loop here
    assert store.get("k").lease_expires_at != before


def test_a_run_on_the_loop_beats_its_leases_in_threads_while_bodies_stream(server, tmp_path, monkeypatch):
    from contentdownload.hooks.model import Job
    from contentdownload.jobs.runner import Run
    from contentdownload.machinery.flags import FlagLayer
    from contentdownload.machinery.runtime import Runtime

    beats: list[bool] = []
    own = StoreLease.heartbeat

    def noting(lease):  # a beat that asks the store: on the loop or not?
        if lease.due():
            try:
                asyncio.get_running_loop()
                beats.append(True)
            except RuntimeError:
                beats.append(False)
        own(lease)

    monkeypatch.setattr(StoreLease, "heartbeat", noting)
    server.throttle(1 << 20)  # each body streams for about 1.5 s: several beats are due (every third of the ttl)
    urls = [server.add_large_file(f"/f{i}.bin", 3 << 19, seed=i)[0] for i in range(2)]
    runtime = Runtime.from_options(config_path=None, cli=FlagLayer(source="cli"), environ={},
                                   run_overrides={"accept_any_content": True, "workers": 2, "lease_ttl": 1.0, "processes": 1})
    report = Run(runtime, tmp_path / "out", [Job(urls=(u,)) for u in urls]).execute()
    assert report.exit_code == 0 and report.metrics["jobs_on_loop"] == 2
    assert beats and not any(beats), beats  # beats were due, and none ran on the loop
