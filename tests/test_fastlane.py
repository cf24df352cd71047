"""The event-loop lane of a run (``--transport auto``): which jobs take it, what it records, what happens when it fails."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from contentdownload.jobs import fastlane
from contentdownload.jobs.inputs import read_jobs
from contentdownload.jobs.runner import Run, open_job_store
from contentdownload.machinery.flags import FlagLayer
from contentdownload.machinery.runtime import Runtime
from contentdownload.testing.server import Fault


def _runtime(**settings) -> Runtime:
    return Runtime.from_options(config_path=None, cli=FlagLayer(source="cli"), environ={},
                                run_overrides={"workers": 4, "progress": False, "processes": 1, **settings})


def _files(server, tmp_path: Path, n: int, size: int = 3000) -> tuple[Path, dict[str, str]]:
    files = {}
    for i in range(n):
        data = b"%PDF-1.4\n" + os.urandom(size + i)
        server.add_file(f"/d/f{i}.pdf", data)
        files[f"f{i}.pdf"] = hashlib.sha256(data).hexdigest()
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("".join(server.url(f"/d/{name}") + "\n" for name in files))
    return jobs, files


def _run(tmp_path: Path, jobs: Path, **settings):
    return Run(_runtime(**settings), tmp_path / "out", read_jobs(str(jobs)), store_factory=open_job_store).execute()


def _on_disk(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir() if p.suffix == ".pdf"}


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines() if line.strip()]


def test_first_claims_run_on_the_loop_and_sync_runs_none_there(server, tmp_path):
    jobs, files = _files(server, tmp_path, 40)
    report = _run(tmp_path, jobs)
    assert report.exit_code == 0 and _on_disk(tmp_path / "out") == files
    assert report.metrics["transport"] == "auto" and report.metrics["jobs_on_loop"] == 40
    assert len(_rows(tmp_path / "out")) == 40
    assert sum(server.stats(f"/d/{name}").full_bodies for name in files) == 40  # each fetched once

    synced = tmp_path / "sync"
    synced.mkdir()
    report = _run(synced, jobs, transport="sync")
    assert report.exit_code == 0 and _on_disk(synced / "out") == files
    assert report.metrics["transport"] == "sync" and report.metrics["jobs_on_loop"] == 0


def test_a_job_claimed_before_is_resumed_by_the_worker_not_refetched(server, tmp_path):
    data = b"%PDF-1.4\n" + os.urandom(600_000)
    server.add_file("/big.pdf", data)
    server.add_fault("/big.pdf", Fault.cut_after(300_000))
    jobs = tmp_path / "jobs.txt"
    jobs.write_text(server.url("/big.pdf") + "\n")
    first = _run(tmp_path, jobs, retries=0)
    assert first.exit_code == 1 and first.metrics["jobs_on_loop"] == 1  # cut, no retry left: failed, part kept

    again = _run(tmp_path, jobs, retry_failed=True)
    assert again.exit_code == 0 and again.metrics["jobs_on_loop"] == 0  # claimed before: the synchronous worker
    assert hashlib.sha256((tmp_path / "out" / "big.pdf").read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
    ranges = server.stats("/big.pdf").ranges
    assert ranges[0] is None and ranges[-1] is not None and ranges[-1].startswith("bytes=")  # resumed from the part


def test_failures_and_redirects_on_the_loop_end_as_through_threads(server, tmp_path):
    data = b"%PDF-1.4\n" + os.urandom(5000)
    server.add_file("/real.pdf", data)
    server.add_redirect("/moved.pdf", "/real.pdf")
    server.add_status("/gone.pdf", 404)
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("".join(server.url(p) + "\n" for p in ("/moved.pdf", "/gone.pdf")))
    report = _run(tmp_path, jobs)
    outcomes = {row["url"].rsplit("/", 1)[1]: (row["outcome"], row.get("reason")) for row in _rows(tmp_path / "out")}
    assert outcomes["moved.pdf"][0] == "downloaded" and outcomes["gone.pdf"] == ("failed", "http_404")
    assert report.exit_code == 1 and (tmp_path / "out" / "moved.pdf").read_bytes() == data
    assert server.stats("/gone.pdf").requests == 1  # handed to the synchronous stream_io without asking twice


def test_if_the_lane_fails_worker_threads_finish_the_run(server, tmp_path, monkeypatch):
    jobs, files = _files(server, tmp_path, 12)
    calls = []

    def broken(self, limit):
        calls.append(limit)
        raise RuntimeError("a bug in the lane")

    monkeypatch.setattr(fastlane.FastLane, "_claim", broken)
    report = _run(tmp_path, jobs)
    assert calls and report.exit_code == 0 and _on_disk(tmp_path / "out") == files
    assert report.metrics["jobs_on_loop"] == 0 and len(_rows(tmp_path / "out")) == 12


def test_a_refused_body_going_on_to_the_next_url_stays_within_workers(server, tmp_path):
    """A finalize that refuses the first URL's body (HTML for a PDF) goes on to the next candidate inside the transfer slot."""
    server.add_file("/m/login.pdf", b"<!doctype html><html>please log in</html>")
    good = b"%PDF-1.4\n" + os.urandom(4000)
    server.add_file("/m/paper.pdf", good)
    server.add_fault("/m/paper.pdf", Fault.delay(0.5))
    others = {}
    for i in range(3):
        data = b"%PDF-1.4\n" + os.urandom(3000 + i)
        server.add_file(f"/m/other{i}.pdf", data)
        server.add_fault(f"/m/other{i}.pdf", Fault.delay(0.5))
        others[f"other{i}.pdf"] = hashlib.sha256(data).hexdigest()
    jobs = tmp_path / "jobs.txt"
    lines = [json.dumps({"urls": [server.url("/m/login.pdf"), server.url("/m/paper.pdf")], "filename": "paper.pdf"})]
    lines += [json.dumps({"url": server.url(f"/m/{name}")}) for name in others]
    jobs.write_text("\n".join(lines) + "\n")
    report = _run(tmp_path, jobs, workers=1)
    assert report.exit_code == 0
    assert _on_disk(tmp_path / "out") == {**others, "paper.pdf": hashlib.sha256(good).hexdigest()}
    assert server.most_at_once == 1  # --workers 1: never two transfers at once
