"""Planning costs a few store statements per page, not per job; a rerun of finished jobs costs no
statement per job in planning, a transaction per page for its rows, and no read of the manifest."""

from __future__ import annotations

import os
from pathlib import Path

from contentdownload.hooks.model import Job
from contentdownload.jobs import ledger, planner
from contentdownload.jobs.inputs import read_jobs
from contentdownload.jobs.planner import plan_jobs
from contentdownload.jobs.runner import Run, open_job_store
from contentdownload.jobs.workspace import Workspace
from contentdownload.machinery.flags import FlagLayer
from contentdownload.machinery.runtime import Runtime
from contentdownload.store import open_store

from test_cost_bounds import Counting
from contentdownload.testing.pg import create_database, fresh_postgres_dsn, postgres_dsn  # noqa: F401  (fixtures)
from test_store_conformance import url  # noqa: F401  (fixture)

EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
PAGE, PAGES = 40, 3
JOBS = PAGE * PAGES


def _runtime() -> Runtime:
    return Runtime.from_options(config_path=None, cli=FlagLayer(source="cli"), environ={},
                                run_overrides={"workers": 2, "progress": False, "lease_ttl": 30.0})


def _statements(store) -> list[str]:
    """The SQL statements this thread's connections to ``store`` (its reads, and the process's writer) run from now on
    (each row of an ``executemany`` counts)."""
    seen: list[str] = []
    store._thread_conn().set_trace_callback(seen.append)
    store._writer_conn().set_trace_callback(seen.append)
    return seen


def _jobs() -> list[Job]:
    return [Job(urls=(f"http://h.invalid/a/{i:05d}.pdf",)) for i in range(JOBS)]


def test_planning_costs_statements_per_page_and_none_per_finished_job(tmp_path, monkeypatch):
    monkeypatch.setattr(planner, "PLAN_PAGE", PAGE)
    ws = Workspace.open(tmp_path / "out")
    store = open_store(ws.default_db)
    try:
        seen = _statements(store)
        plan = plan_jobs(_runtime(), store, ws, _jobs())
        assert len(plan.items) == JOBS
        inserts = [s for s in seen if s.lstrip().upper().startswith("INSERT")]
        assert len(inserts) == JOBS  # one row each, of one statement per page
        assert len(seen) - len(inserts) <= 12 * PAGES, seen  # lookups and transactions per page, never per job
        for key, item in plan.items.items():
            final = ws.final_path(item.relative_path)
            final.touch()
            claim = store.claim_key(key, "test", 60.0)
            store.finish(key, claim.epoch, path=str(final), size=0, sha256=EMPTY_SHA256, mtime_ns=final.stat().st_mtime_ns)
        seen.clear()
        settled: list[int] = []
        again = plan_jobs(_runtime(), store, ws, _jobs(), on_settled=lambda page: settled.append(len(page)))
        assert not again.items and again.settled == [] and again.settled_count == JOBS and settled == [PAGE] * PAGES
        assert not [s for s in seen if s.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE"))], seen  # all on record
        assert len(seen) <= 6 * PAGES, seen  # a few lookups per page
    finally:
        store.close()


def test_a_rerun_of_finished_jobs_reads_no_manifest_and_records_them_a_page_at_a_time(server, tmp_path, monkeypatch):
    monkeypatch.setattr(planner, "PLAN_PAGE", PAGE)
    monkeypatch.setattr("contentdownload.jobs.runner.PLAN_PAGE", PAGE)
    out = tmp_path / "out"
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("".join(server.add_file(f"/r/{i:04d}.bin", os.urandom(64)) + "\n" for i in range(JOBS)))
    assert Run(_runtime(), out, read_jobs(str(jobs)), store_factory=open_job_store).execute().exit_code == 0
    manifest_reads: list[Path] = []
    real = ledger.rows_on_disk
    monkeypatch.setattr(ledger, "rows_on_disk", lambda path: (manifest_reads.append(path), real(path))[1])
    counting: list[Counting] = []

    def factory(runtime, ws):
        counting.append(Counting(open_job_store(runtime, ws)))
        return counting[-1]

    requests_before = len(server.requests)
    report = Run(_runtime(), out, read_jobs(str(jobs)), store_factory=factory).execute()
    assert report.exit_code == 0 and report.metrics["outcomes"]["skipped"] == JOBS
    assert len(server.requests) == requests_before and manifest_reads == []
    calls = counting[0].calls
    assert calls["batched"] <= PAGES and calls["lookup"] <= 2 * PAGES and calls["get"] == calls["records"] == 0, calls
    assert calls["plan"] <= PAGES and calls["claim_key"] == 0 and calls["looked_up"] <= 2 * JOBS, calls


def test_op_begin_many_answers_as_op_begin_one_by_one_would(url):
    """On the three stores: new, pending (and set pending again), done, failed (set pending), a key twice;
    the statuses and what is recorded match successive ``op_begin`` calls."""
    from test_store_batch import planned_store

    store = planned_store(url, 4)
    try:
        for op in ("pending", "done", "failed"):
            store.op_begin(op, "k0000", "manifest", 0)
        store.op_done("done", {"ok": True})
        store.op_failed("failed", "gone")
        ops = [("new", "k0001", "manifest", 0), ("pending", "k0000", "manifest", 3), ("done", "k0000", "manifest", 3),
               ("failed", "k0000", "manifest", 3), ("new", "k0001", "manifest", 0)]
        assert store.op_begin_many(ops) == ["new", "pending", "done", "failed", "pending"]
        assert store.op_begin_many([]) == []
        got = {op: store.op_get(op) for op in ("new", "pending", "done", "failed")}
        assert {op: r["status"] for op, r in got.items()} == {"new": "pending", "pending": "pending", "done": "done", "failed": "pending"}
        assert got["pending"]["epoch"] == got["failed"]["epoch"] == 3 and got["done"]["result"] == {"ok": True}
        assert got["new"]["job_key"] == "k0001"
    finally:
        store.close()
