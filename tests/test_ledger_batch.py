"""The records of a batch of finished jobs: ledger ops in one transaction, manifest rows with one fsync,
and once per ledger key even across a crash between writing the rows and recording them.

This module is also the program that crashes: ``python test_ledger_batch.py write-many DB OUT``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from contentdownload.hooks.model import Job, JobResult, StreamResult
from contentdownload.jobs import ledger
from contentdownload.jobs.worker import StoreLease
from contentdownload.records.manifest import ManifestWriter, iter_rows
from contentdownload.store import PlannedJob, open_store

CORE = Path(__file__).resolve().parents[1] / "core"
N = 64


def key(i: int) -> str:
    return f"job-{i:03d}"


def result(i: int, out: Path) -> JobResult:
    return JobResult(outcome="downloaded", job=Job(urls=(f"https://example.org/files/{i}.pdf",)), job_key=key(i),
                     path=out / f"{i}.pdf", size=10, sha256=f"{i:064x}", bytes_downloaded=10)


def planned_store(db: Path, n: int = N):
    store = open_store(f"sqlite:///{db}")
    store.plan([PlannedJob(key=key(i), scheme="test") for i in range(n)])
    return store


def write_transactions(store) -> list[str]:
    """The write transactions a SQLite store begins from now on (all on its writer connection)."""
    begun: list[str] = []
    store._writer_conn().set_trace_callback(lambda sql: begun.append(sql) if sql == "BEGIN IMMEDIATE" else None)
    return begun


@pytest.fixture
def fsyncs(monkeypatch):
    """The file descriptors passed to ``os.fsync``, in order."""
    calls: list[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return calls


def manifest_keys(path: Path) -> Counter:
    return Counter(row["job_key"] for row in iter_rows(path))


# -- the manifest --------------------------------------------------------------------------------


def test_a_batch_of_64_results_is_64_rows_one_fsync_and_two_transactions(tmp_path, fsyncs):
    store = planned_store(tmp_path / "jobs.db")
    writer = ManifestWriter(tmp_path / "manifest.jsonl")
    manifest = ledger.ManifestLedger(store, writer, "run-1", tmp_path)
    begun = write_transactions(store)
    fsyncs.clear()
    manifest.write_many([result(i, tmp_path) for i in range(N)], leasing=True)
    assert fsyncs == [writer._fd]
    assert begun == ["BEGIN IMMEDIATE"] * 2  # the ops begun, then the ops done
    assert manifest_keys(writer.path) == Counter({key(i): 1 for i in range(N)})
    ops = [store.op_get(ledger.manifest_op(key(i), "downloaded", "", "run-1", f"{i:064x}")) for i in range(N)]
    assert {op["status"] for op in ops} == {"done"}
    manifest.write_many([result(i, tmp_path) for i in range(N)], leasing=True)  # done already: nothing again
    assert len(fsyncs) == 1 and sum(manifest_keys(writer.path).values()) == N
    writer.close()
    store.close()


def test_the_jobs_records_join_the_transaction_of_their_rows_ops_done(tmp_path, fsyncs):
    store = planned_store(tmp_path / "jobs.db")
    claims = [store.claim_key(key(i), "me", 60.0) for i in range(N)]
    writer = ManifestWriter(tmp_path / "manifest.jsonl")
    manifest = ledger.ManifestLedger(store, writer, "run-1", tmp_path)
    begun = write_transactions(store)

    def records():
        for i, claim in enumerate(claims):
            store.finish(key(i), claim.epoch, path=str(tmp_path / f"{i}.pdf"), size=10, sha256=f"{i:064x}")

    manifest.write_many([result(i, tmp_path) for i in range(N)], leasing=True, then=records)
    assert begun == ["BEGIN IMMEDIATE"] * 2  # the ops begun; then the ops done with the records
    assert {store.get(key(i)).state for i in range(N)} == {"finalized"}
    writer.close()
    store.close()


def test_rows_on_disk_or_done_are_not_written_again_and_one_key_gets_one_row(tmp_path, fsyncs):
    store = planned_store(tmp_path / "jobs.db", 4)
    writer = ManifestWriter(tmp_path / "manifest.jsonl")
    first = ledger.ManifestLedger(store, writer, "run-1", tmp_path)
    first.write(result(0, tmp_path), leasing=True)  # recorded done
    op1 = ledger.manifest_op(key(1), "downloaded", "", "run-1", f"{1:064x}")
    store.op_begin(op1, key(1), "manifest", 0)  # a crash came after this row was written, before op_done
    writer.write(ledger.result_row(result(1, tmp_path), "run-1", tmp_path))
    again = ledger.ManifestLedger(store, writer, "run-1", tmp_path)
    fsyncs.clear()
    again.write_many([result(i, tmp_path) for i in (0, 1, 2, 3, 2)], leasing=True)
    assert manifest_keys(writer.path) == Counter({key(i): 1 for i in range(4)})
    assert fsyncs == [writer._fd]
    assert store.op_get(op1)["status"] == "done" and store.op_get(op1)["result"]["reconciled"] is True
    writer.close()
    store.close()


def test_without_leases_every_result_gets_its_row(tmp_path, fsyncs):
    writer = ManifestWriter(tmp_path / "manifest.jsonl")
    manifest = ledger.ManifestLedger(open_store("memory:"), writer, "run-1", tmp_path)
    fsyncs.clear()
    manifest.write_many([result(i, tmp_path) for i in (0, 1, 1)], leasing=False)
    assert manifest_keys(writer.path) == Counter({key(0): 1, key(1): 2}) and fsyncs == [writer._fd]
    writer.close()


def write_many_main(db: str, out: str) -> int:
    """Write the rows of a batch, then stop before recording them, until killed."""
    store = open_store(f"sqlite:///{db}")
    writer = ManifestWriter(Path(out) / "manifest.jsonl")
    real = writer.write_many

    def written_then_wait(rows) -> None:
        real(rows)
        print("written", flush=True)
        sys.stdin.readline()  # killed here, between the rows and their op_done batch

    writer.write_many = written_then_wait
    ledger.ManifestLedger(store, writer, "run-1", Path(out)).write_many([result(i, Path(out)) for i in range(N)], leasing=True)
    return 0


def test_a_kill_between_the_rows_and_their_record_then_a_rerun_writes_no_row_twice(tmp_path):
    db = tmp_path / "jobs.db"
    planned_store(db).close()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(CORE), os.environ.get("PYTHONPATH", "")]))
    child = subprocess.Popen([sys.executable, __file__, "write-many", str(db), str(tmp_path)], env=env, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert child.stdout.readline().strip() == "written", child.stderr.read()
    os.kill(child.pid, signal.SIGKILL)
    child.wait(30)
    assert child.returncode == -signal.SIGKILL
    store = open_store(f"sqlite:///{db}")
    ops = [ledger.manifest_op(key(i), "downloaded", "", "run-1", f"{i:064x}") for i in range(N)]
    assert {store.op_get(op)["status"] for op in ops} == {"pending"}  # the rows are on disk, their record is not
    writer = ManifestWriter(tmp_path / "manifest.jsonl")
    ledger.ManifestLedger(store, writer, "run-1", tmp_path).write_many([result(i, tmp_path) for i in range(N)], leasing=True)
    assert manifest_keys(writer.path) == Counter({key(i): 1 for i in range(N)})
    assert {store.op_get(op)["status"] for op in ops} == {"done"}
    assert all(store.op_get(op)["result"]["reconciled"] for op in ops)
    writer.close()
    store.close()


# -- the other ledger records ----------------------------------------------------------------------


def test_intents_and_transfers_of_a_batch_are_one_transaction_each(tmp_path):
    store = planned_store(tmp_path / "jobs.db", 8)
    claims = store.claim_many("w", 60, None, 8)
    begun = write_transactions(store)
    ledger.begin_transfers(store, [(c.key, c.epoch) for c in claims])
    streams = {c.key: StreamResult(status="complete", url=f"https://example.org/{c.key}", total_size=10, sha256=f"{i:064x}")
               for i, c in enumerate(claims)}
    ledger.record_intents(store, [(c.key, c.epoch, streams[c.key]) for c in claims])
    store.batched(lambda: [ledger.end_transfer(store, c.key, result(i, tmp_path)) for i, c in enumerate(claims)])
    assert begun == ["BEGIN IMMEDIATE"] * 3
    for i, claim in enumerate(claims):
        intent = ledger.finalize_intent(store, claim.key, f"{i:064x}")
        assert intent["url"] == f"https://example.org/{claim.key}" and intent["size"] == 10
        transfer = store.op_get(ledger.operation_key(claim.key, "transfer"))
        assert transfer["status"] == "done" and transfer["epoch"] == claim.epoch
    store.close()


def test_lost_of_heartbeats_once_per_store_and_names_the_leases_lost(tmp_path, monkeypatch):
    stores = [planned_store(tmp_path / "a.db", 3), planned_store(tmp_path / "b.db", 2)]
    leases = [StoreLease(store, c.key, c.epoch, "w", 60) for store in stores for c in store.claim_many("w", 60, None, 3)]
    lost = leases[1]
    lost.store.release(lost.key, lost.epoch)
    calls = []
    for store in stores:
        real = store.heartbeat_many
        monkeypatch.setattr(store, "heartbeat_many", lambda pairs, ttl, real=real: calls.append(len(pairs)) or real(pairs, ttl))
    assert StoreLease.lost_of(leases) == {lost}
    assert sorted(calls) == [2, 3]
    assert StoreLease.lost_of([lease for lease in leases if lease is not lost]) == set()
    for store in stores:
        store.close()


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "write-many":
    sys.exit(write_many_main(sys.argv[2], sys.argv[3]))
