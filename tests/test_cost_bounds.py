"""A run's cost follows its own jobs, not the folder's history: no read of the whole store, no
re-plan of the folder per library call, no listing of the output folder."""

from __future__ import annotations

import os
import pathlib
from collections import Counter
from pathlib import Path

import pytest

from contentdownload import Downloader
from contentdownload.hooks.model import Job
from contentdownload.jobs import downloader as downloader_module
from contentdownload.jobs.inputs import read_jobs
from contentdownload.jobs.keys import identity_key
from contentdownload.jobs.runner import Run, open_job_store
from contentdownload.jobs.worker import job_payload
from contentdownload.jobs.workspace import Workspace
from contentdownload.machinery.flags import FlagLayer
from contentdownload.machinery.runtime import Runtime
from contentdownload.store import PlannedJob, open_store


class Counting:
    """A job store that counts the calls made to it (and the values asked of ``lookup``)."""

    def __init__(self, store):
        self._store = store
        self.calls: Counter = Counter()

    def __getattr__(self, name):
        attr = getattr(self._store, name)
        if not callable(attr):
            return attr

        def counted(*args, **kw):
            self.calls[name] += 1
            if name == "lookup":
                self.calls["looked_up"] += sum(len(list(v)) for v in kw.values())
            return attr(*args, **kw)

        return counted


def fill_history(out: Path, n: int) -> None:
    """``n`` finished jobs of earlier runs in the folder's store (their files long gone elsewhere)."""
    ws = Workspace.open(out)
    store = open_store(ws.default_db)
    try:
        planned = []
        for i in range(n):
            job = Job(urls=(f"http://history.invalid/old/{i:06d}.bin",))
            identity, _ = identity_key(job)
            planned.append(PlannedJob(key=identity, scheme="streaming-v1", payload=job_payload(job, f"{i:06d}.bin", identity)))
        store.plan(planned)
        for job in planned:
            claim = store.claim_key(job.key, "history", 60.0)
            store.finish(job.key, claim.epoch, path=f"/elsewhere/{job.key}", size=1, sha256="0" * 64)
    finally:
        store.close()


def _runtime() -> Runtime:
    return Runtime.from_options(config_path=None, cli=FlagLayer(source="cli"), environ={},
                                run_overrides={"workers": 2, "progress": False, "lease_ttl": 30.0})


def _run_counting(server, tmp_path: Path, history: int) -> Counter:
    out = tmp_path / f"out-{history}"
    fill_history(out, history)
    jobs = tmp_path / f"jobs-{history}.txt"
    jobs.write_text("".join(server.add_file(f"/h{history}/f{i}.bin", os.urandom(3000)) + "\n" for i in range(6)))
    counting: list[Counting] = []

    def factory(runtime, ws):
        counting.append(Counting(open_job_store(runtime, ws)))
        return counting[-1]

    for _ in range(2):  # a run of new files, then a plain rerun
        report = Run(_runtime(), out, read_jobs(str(jobs)), store_factory=factory).execute()
        assert report.exit_code == 0 and report.left == 0
    return counting[0].calls + counting[1].calls


def test_a_run_never_reads_the_whole_store_and_its_store_work_does_not_grow_with_history(server, tmp_path):
    small, large = _run_counting(server, tmp_path, 20), _run_counting(server, tmp_path, 1500)
    assert small["records"] == large["records"] == 0  # neither planning, idle polls nor the end reads every record
    assert small["get"] == large["get"] == 0  # records come in batches, by key, identity or name
    planning = ("lookup", "looked_up", "plan", "stats")
    assert {k: small[k] for k in planning} == {k: large[k] for k in planning}  # the same values asked, whatever the history
    for counts in (small, large):  # claims and idle polls follow the run's jobs and workers (timing decides the rest)
        claims = counts["claim"] + counts["claim_many"]  # one at a time (threads) or in batches (the event-loop lane)
        assert counts["count_active"] <= claims <= 2 * (6 + 2) + counts["count_active"], counts


def _downloader_calls(server, tmp_path: Path, monkeypatch, history: int) -> Counter:
    out = tmp_path / f"dl-{history}"
    fill_history(out, history)
    counting: list[Counting] = []

    def opener(runtime, ws):
        counting.append(Counting(open_job_store(runtime, ws)))
        return counting[-1]

    monkeypatch.setattr(downloader_module, "open_job_store", opener)
    listed: list[Path] = []
    real_iterdir = pathlib.Path.iterdir
    monkeypatch.setattr(pathlib.Path, "iterdir", lambda self: (listed.append(self), real_iterdir(self))[1])
    with Downloader(environ={}) as dl:
        for i in range(3):
            url = server.add_file(f"/dl{history}/d{i}.pdf", b"%PDF-1.7\n" + os.urandom(2000))
            assert dl.download(url, out).outcome == "downloaded"
            assert dl.download(url, out).outcome == "skipped"
    assert Path(out).resolve() not in [p.resolve() for p in listed]  # the output folder is never listed
    return counting[0].calls


def test_downloader_download_costs_the_same_store_work_whatever_the_folder_holds(server, tmp_path, monkeypatch):
    small = _downloader_calls(server, tmp_path, monkeypatch, 10)
    large = _downloader_calls(server, tmp_path, monkeypatch, 1500)
    assert small["records"] == large["records"] == 0
    assert small == large


@pytest.mark.parametrize("history", [0, 30])
def test_names_stay_unique_across_pages_and_against_history(server, tmp_path, monkeypatch, history):
    """Paging the plan does not let two jobs of one run, or a job and a recorded one, share a name."""
    from contentdownload.jobs import planner

    monkeypatch.setattr(planner, "PLAN_PAGE", 7)
    out = tmp_path / "out"
    fill_history(out, history)  # recorded names 000000.bin ... (no files on disk)
    (out / "foreign.bin").write_bytes(b"a file no job recorded")
    urls = [server.add_file(f"/p{i % 5}/{'000003' if i % 2 else 'foreign'}.bin", os.urandom(100 + i)) for i in range(10)]
    urls += [server.add_file(f"/u/{i:06d}.bin", os.urandom(50)) for i in range(20)]
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("".join(u + "\n" for u in urls))
    report = Run(_runtime(), out, read_jobs(str(jobs)), store_factory=open_job_store).execute()
    assert report.exit_code == 0
    paths = [r.path.name for r in report.results if r.outcome == "downloaded"]
    assert len(paths) == len(set(p.casefold() for p in paths)) == len(set(urls))
    assert (out / "foreign.bin").read_bytes() == b"a file no job recorded"
    if history:
        assert not {"000003.bin", "000010.bin"} & set(paths)  # names recorded by earlier jobs stay theirs
