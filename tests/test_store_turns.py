"""SQLite's write turn among processes: a writer waits for the other process's transaction, not in SQLite's busy sleeps."""

from __future__ import annotations

import fcntl
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from contentdownload.errors import StoreError
from contentdownload.store.base import PlannedJob
from contentdownload.store.sqlite import SQLiteStore
from helpers import cli_env

#: A process of contentdownload inside a write transaction of the store, until it reads a line.
HOLDER = textwrap.dedent("""
    import sys
    from contentdownload.store.base import PlannedJob
    from contentdownload.store.sqlite import SQLiteStore
    store = SQLiteStore(sys.argv[1])
    def hold():
        store.plan([PlannedJob(key="held", scheme="t")])
        print("holding", flush=True)
        sys.stdin.readline()
    store.batched(hold)
    store.close()
""")


def _store(path, slept: list[float], **kwargs) -> SQLiteStore:
    """A store whose SQLite lock is never waited for (busy timeout 0): a write meeting it at once is a retry, and sleeps."""
    def sleep(seconds: float) -> None:
        slept.append(seconds)
        time.sleep(min(seconds, 0.05))

    return SQLiteStore(path, busy_timeout=0, sleep=sleep, **kwargs)


def _holding(db) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(db)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=cli_env())
    assert proc.stdout.readline().strip() == "holding"
    return proc


def _write_in_thread(store: SQLiteStore) -> threading.Thread:
    writer = threading.Thread(target=store.plan, args=([PlannedJob(key="mine", scheme="t")],))
    writer.start()
    return writer


def test_a_writer_waits_for_the_other_process_s_transaction_without_a_retry(tmp_path):
    db = tmp_path / "jobs.db"
    SQLiteStore(db).close()
    slept: list[float] = []
    store = _store(db, slept, turn_timeout=60.0)
    holder = _holding(db)
    writer = _write_in_thread(store)
    writer.join(timeout=0.5)
    assert writer.is_alive()  # its turn comes when the other process's transaction ends
    holder.communicate("\n", timeout=60)
    writer.join(timeout=60)
    assert not writer.is_alive() and holder.returncode == 0
    assert slept == []  # never met SQLite's lock: no busy error, no retry
    assert {store.get("held") is not None, store.get("mine") is not None} == {True}
    store.close()


def test_a_forked_child_takes_its_own_turn_not_its_parent_s(tmp_path):
    """A child inherits the parent's open turn file; a lock on it would be the parent's, so the child opens its own."""
    db = tmp_path / "jobs.db"
    slept: list[float] = []
    store = _store(db, slept, turn_timeout=60.0)
    store.plan([PlannedJob(key="before", scheme="t")])  # the parent's turn file is open now
    to_child, from_parent = os.pipe()
    from_child, to_parent = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: once the parent holds a transaction, its write must wait for it, not meet SQLite's lock
        try:
            os.read(to_child, 1)
            store.plan([PlannedJob(key="child", scheme="t")])
            os.write(to_parent, b"retried" if slept else b"waited")
        finally:
            os._exit(0)
    holding, release = threading.Event(), threading.Event()

    def hold():
        store.plan([PlannedJob(key="held", scheme="t")])
        holding.set()
        release.wait()

    parent = threading.Thread(target=store.batched, args=(hold,))
    parent.start()
    holding.wait()
    os.write(from_parent, b"go")
    ready, _, _ = select.select([from_child], [], [], 0.5)
    assert ready == []  # the child is still waiting for its turn
    release.set()
    parent.join()
    _, status = os.waitpid(pid, 0)
    assert os.read(from_child, 16) == b"waited" and os.waitstatus_to_exitcode(status) == 0
    assert store.get("child") is not None
    store.close()


def test_a_stopped_process_holding_the_turn_only_delays_the_others(tmp_path):
    db = tmp_path / "jobs.db"
    SQLiteStore(db).close()
    turn = tmp_path / "jobs.db-writer"
    code = f"import fcntl, os, time; fd = os.open({str(turn)!r}, os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(600)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        holder.send_signal(signal.SIGSTOP)
        store = SQLiteStore(db, turn_timeout=0.2)
        store.plan([PlannedJob(key="mine", scheme="t")])  # past its turn's timeout, on to SQLite's own lock
        assert store.get("mine") is not None
        fd = os.open(turn, os.O_RDWR)
        try:  # the stopped process still has the turn
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                still_held = False
            except BlockingIOError:
                still_held = True
        finally:
            os.close(fd)
        assert still_held
        store.close()
    finally:
        holder.kill()
        holder.wait()


def _open_fds() -> set[str]:
    return {os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}")}


def test_a_store_closed_during_a_write_gives_the_turn_back_when_the_write_ends(tmp_path):
    db = tmp_path / "jobs.db"
    store = SQLiteStore(db)
    holding, release, outcome = threading.Event(), threading.Event(), []

    def hold():
        store.plan([PlannedJob(key="held", scheme="t")])
        holding.set()
        release.wait()

    def write():
        try:
            store.batched(hold)
            outcome.append("ok")
        except Exception as exc:  # a closed store may refuse what comes after; the turn must not be what fails
            outcome.append(repr(exc))

    writer = threading.Thread(target=write)
    writer.start()
    holding.wait()
    store.close()
    turn = str(tmp_path / "jobs.db-writer")
    assert turn in _open_fds()  # the writer still holds its turn
    release.set()
    writer.join()
    assert "Bad file descriptor" not in outcome[0]
    assert turn not in _open_fds()
    fd = os.open(turn, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # given back: free
    finally:
        os.close(fd)
    with pytest.raises(StoreError):
        store.plan([PlannedJob(key="late", scheme="t")])
    assert turn not in _open_fds()  # a write on a closed store opens no turn file


def test_a_store_opened_through_a_symlink_takes_its_turns_beside_the_real_file(tmp_path, monkeypatch):
    real = tmp_path / "data" / "jobs.db"
    real.parent.mkdir()
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "jobs.db").symlink_to(real)
    monkeypatch.chdir(tmp_path)
    for path in ("links/jobs.db", real):
        store = SQLiteStore(path)
        store.plan([PlannedJob(key=str(path), scheme="t")])
        store.close()
    assert (tmp_path / "data" / "jobs.db-writer").is_file() and not (tmp_path / "links" / "jobs.db-writer").exists()
