"""Hostile servers reach the same outcome through worker processes and the batch committer as through one process filing each file.

Both runs go through the one pipeline (status rules, validators, digests, content check,
sizes); what differs is how jobs are spread and made durable. Every case must end alike:
same outcome, same reason, same bytes at the final path, nothing else promoted.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os

from contentdownload.testing.server import Fault
from helpers import run_cli

PDF = b"%PDF-1.4\n"


BODIES = {"ok": PDF + os.urandom(30_000), "cut": os.urandom(80_000), "short": os.urandom(40_000), "sized": os.urandom(5_000)}


def _serve(server):
    """The cases (path -> job fields) with their faults armed for one run."""
    body = BODIES["ok"]
    server.add_file("/ok.pdf", body)
    server.add_file("/page.pdf", b"<!doctype html><html><body>sign in</body></html>")  # an error page as a PDF
    server.add_file("/lies.pdf", body, headers={"Repr-Digest": f"sha-256=:{base64.b64encode(hashlib.sha256(b'x').digest()).decode()}:"})
    server.add_file("/cut.bin", BODIES["cut"])
    server.add_fault("/cut.bin", Fault.cut_after(20_000))  # resumed on the retry
    server.add_file("/short.bin", BODIES["short"])
    server.add_fault("/short.bin", Fault.short_body(100), times=10)  # never whole
    server.add_status("/gone.pdf", 404)
    server.add_status("/busy.pdf", 503)
    server.add_redirect("/away.pdf", "ftp://files.example/away.pdf")
    server.add_file("/sized.bin", BODIES["sized"])
    return {"/ok.pdf": {}, "/page.pdf": {}, "/lies.pdf": {}, "/cut.bin": {}, "/short.bin": {}, "/gone.pdf": {},
            "/busy.pdf": {}, "/away.pdf": {}, "/sized.bin": {"size": 4_999}}


def _run(server, tmp_path, name, *flags):
    server.clear_faults()
    cases = _serve(server)
    jobs = tmp_path / f"{name}.jsonl"
    jobs.write_text("".join(json.dumps({"url": server.url(path), **fields}) + "\n" for path, fields in cases.items()))
    out = tmp_path / name
    proc = run_cli("run", str(jobs), "--out", str(out), "--no-progress", "--retries", "2", "--workers", "3", *flags, cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr  # some cases fail, by design
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines() if line.strip()]
    outcomes = {row["url"].rsplit("/", 1)[1]: (row["outcome"], row["reason"] if row["outcome"] == "failed" else None) for row in rows}
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir() if p.is_file() and p.suffix in (".pdf", ".bin")}
    return outcomes, files, json.loads((out / "manifest.metrics.json").read_text())


def test_hostile_cases_end_alike_through_processes_and_the_committer(server, tmp_path):
    (tmp_path / "contentdownload.toml").write_text("[run]\nbackoff_factor = 0.01\n")
    single, single_files, single_metrics = _run(server, tmp_path, "single", "--processes", "1", "--durability", "file")
    spread, spread_files, spread_metrics = _run(server, tmp_path, "spread", "--processes", "2", "--durability", "batch")
    assert single_metrics["processes"] == 1 and spread_metrics["processes"] == 2
    assert spread_metrics["commit_batches"]["files"] == 2  # ok.pdf and cut.bin, the two promoted, through the committer
    assert spread == single
    assert spread_files == single_files == {name: hashlib.sha256(BODIES[name.split(".")[0]]).hexdigest() for name in ("ok.pdf", "cut.bin")}
    assert single["ok.pdf"] == ("downloaded", None) and single["cut.bin"] == ("resumed", None)
    assert single["page.pdf"][1] == "unexpected_content" and single["lies.pdf"][1] == "digest_mismatch"
    assert single["gone.pdf"][1] == "http_404" and single["away.pdf"][1] == "unsafe_redirect"
    assert single["sized.bin"][1] == "size_mismatch" and single["short.bin"][1] == "short_body"
    assert single["busy.pdf"][1].startswith("http_503")


def test_hostile_cases_end_alike_on_the_event_loop_and_in_threads(server, tmp_path):
    (tmp_path / "contentdownload.toml").write_text("[run]\nbackoff_factor = 0.01\n")
    threads, threads_files, threads_metrics = _run(server, tmp_path, "threads", "--processes", "1", "--transport", "sync")
    loop, loop_files, loop_metrics = _run(server, tmp_path, "loop", "--processes", "1")
    assert threads_metrics["jobs_on_loop"] == 0 and loop_metrics["jobs_on_loop"] == len(loop) == 9
    assert loop == threads and loop_files == threads_files
    assert loop["ok.pdf"] == ("downloaded", None) and loop["cut.bin"] == ("resumed", None)
