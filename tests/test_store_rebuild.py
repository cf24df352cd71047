"""A lost or broken job store: rebuilt from the manifest and the files on disk, never paid for
with downloads under new names; `jobs rebuild` and `jobs verify`. The real CLI in
subprocesses against the loopback server."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from contentdownload.testing.pg import fresh_postgres_dsn, postgres_dsn  # noqa: F401  (fixtures)
from helpers import run_cli

pytestmark = pytest.mark.slow

N = 20


def _serve(server, n: int = N) -> list[str]:
    for i in range(n):
        server.add_file(f"/s/{i}.bin", bytes([i]) * (3000 + 100 * i))
    return [server.url(f"/s/{i}.bin") for i in range(n)]


def _rows(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "manifest.jsonl").read_text().splitlines() if l.strip()]


def _files(out: Path) -> set[str]:
    """The downloaded files (not the records: manifest, metrics, logs, the hidden folder)."""
    return {p.relative_to(out).as_posix() for p in out.rglob("*")
            if p.is_file() and p.parts[len(out.parts)] not in (".contentdownload", "logs") and not p.name.startswith("manifest.")}


def _bodies(server) -> int:
    return sum(1 for r in server.requests if r.method == "GET" and r.body_bytes > 0)


def _run(jobs: Path, out: Path, *args: str):
    return run_cli("run", str(jobs), "--out", str(out), "--no-progress", *args, cwd=jobs.parent)


@pytest.fixture
def done(server, tmp_path):
    """A folder holding 20 finished jobs: (job list, output folder, files, manifest rows)."""
    jobs, out = tmp_path / "urls.txt", tmp_path / "out"
    jobs.write_text("".join(u + "\n" for u in _serve(server)))
    proc = _run(jobs, out)
    assert proc.returncode == 0, proc.stderr
    server.reset_stats()
    return jobs, out, _files(out), _rows(out)


def _store(out: Path) -> Path:
    return out / ".contentdownload" / "jobs.db"


def _nothing_fetched_again(server, out: Path, files: set[str], rows: list[dict]) -> None:
    assert _bodies(server) == 0
    assert _files(out) == files and len(files) == N
    assert _rows(out) == rows  # no new row, of any outcome


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_a_lost_store_is_rebuilt_from_the_manifest(server, done, damage):
    jobs, out, files, rows = done
    if damage == "deleted":
        _store(out).unlink()
    else:
        _store(out).write_bytes(b"")
    proc = _run(jobs, out)
    assert proc.returncode == 0, proc.stderr
    _nothing_fetched_again(server, out, files, rows)
    assert f"rebuilt {N} job records from the manifest" in proc.stderr
    assert "Traceback" not in proc.stderr
    stats = json.loads(run_cli("jobs", "--out", str(out), "--json").stdout)
    assert stats["by_state"]["finalized"] == N


def test_a_rebuilt_store_leaves_missing_and_changed_files_to_download(server, done):
    jobs, out, files, rows = done
    _store(out).unlink()
    (out / "3.bin").unlink()
    (out / "4.bin").write_bytes(b"shorter")
    proc = _run(jobs, out)
    assert proc.returncode == 0, proc.stderr
    assert "rebuilt 20 job records from the manifest (18 finished, 2 to download" in proc.stderr
    assert sorted(r.path for r in server.requests if r.body_bytes) == ["/s/3.bin", "/s/4.bin"]
    assert _files(out) == files
    assert (out / "4.bin").read_bytes() == bytes([4]) * 3400
    assert len(_rows(out)) == N + 2


def test_a_corrupt_store_is_exit_2_naming_the_command_that_rebuilds_it(server, done):
    jobs, out, files, rows = done
    _store(out).write_bytes(b"this is not a database, " * 200)
    proc = _run(jobs, out)
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    assert str(_store(out)) in lines[0] and f"contentdownload jobs rebuild --out {out}" in lines[0]
    assert _bodies(server) == 0
    assert run_cli("jobs", "--out", str(out)).returncode == 2

    proc = run_cli("jobs", "rebuild", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["finished"] == N and report["to_download"] == 0 and report["failed"] == 0
    aside = [p for p in _store(out).parent.iterdir() if p.name.startswith("jobs.db.corrupt-")]
    assert [p.read_bytes() for p in aside] == [b"this is not a database, " * 200]  # moved aside, never deleted
    assert report["moved_aside"] == [str(aside[0])]

    proc = _run(jobs, out)
    assert proc.returncode == 0, proc.stderr
    _nothing_fetched_again(server, out, files, rows)


def test_a_store_with_a_schema_it_cannot_read_is_exit_2(server, done):
    jobs, out, _, _ = done
    with sqlite3.connect(_store(out)) as conn:
        conn.execute("ALTER TABLE jobs RENAME TO something_else")
    proc = _run(jobs, out)
    assert proc.returncode == 2 and "contentdownload jobs rebuild --out" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert run_cli("jobs", "rebuild", "--out", str(out)).returncode == 0
    assert _run(jobs, out).returncode == 0
    assert _bodies(server) == 0


def test_jobs_rebuild_prints_counts(done):
    _, out, _, _ = done
    (out / "0.bin").unlink()
    proc = run_cli("jobs", "rebuild", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "rebuilt 20 job records from the manifest (19 finished, 1 to download, 0 failed)" in proc.stdout
    assert "jobs.db.corrupt-" in proc.stdout  # the old store, moved aside


def test_jobs_verify_requeues_missing_and_changed_files(server, done):
    jobs, out, files, rows = done
    (out / "5.bin").unlink()
    altered = bytearray((out / "6.bin").read_bytes())
    altered[100] ^= 0xFF
    (out / "6.bin").write_bytes(bytes(altered))  # same size, one byte different

    proc = run_cli("jobs", "verify", "--out", str(out), "--json")
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert report["verified"] == N - 1 and report["missing"] == 1 and report["changed"] == 0
    assert report["requeued"] == [str(out / "5.bin")]

    proc = run_cli("jobs", "verify", "--out", str(out), "--deep")
    assert proc.returncode == 1, proc.stderr
    assert "changed 1" in proc.stdout and "requeued 1" in proc.stdout
    stats = json.loads(run_cli("jobs", "--out", str(out), "--json").stdout)
    assert stats["by_state"]["planned"] == 2 and stats["by_state"]["finalized"] == N - 2

    proc = _run(jobs, out)
    assert proc.returncode == 0, proc.stderr
    assert sorted(r.path for r in server.requests if r.body_bytes) == ["/s/5.bin", "/s/6.bin"]
    assert (out / "6.bin").read_bytes() == bytes([6]) * 3600
    new = _rows(out)[len(rows):]
    assert sorted((r["path"], r["outcome"]) for r in new) == [("5.bin", "downloaded"), ("6.bin", "downloaded")]

    proc = run_cli("jobs", "verify", "--out", str(out), "--deep")
    assert proc.returncode == 0 and f"verified {N}" in proc.stdout, proc.stdout + proc.stderr


# -- several folders sharing one PostgreSQL store ------------------------------------------


def _by_location(db: str) -> dict:
    proc = run_cli("jobs", "--db", db, "--json")
    assert proc.returncode == 0, proc.stderr
    return {loc.split(":", 1)[1]: {s: n for s, n in states.items() if n} for loc, states in json.loads(proc.stdout)["by_location"].items()}


@pytest.mark.postgres
def test_jobs_shows_counts_per_output_folder_of_a_shared_store(server, tmp_path, fresh_postgres_dsn):  # noqa: F811
    urls = _serve(server, 12)
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    first.write_text("".join(u + "\n" for u in urls[:8]))
    second.write_text("".join(u + "\n" for u in urls[8:]) + server.url("/missing.bin") + "\n")
    a, b = tmp_path / "a", tmp_path / "b"
    assert _run(first, a, "--db", fresh_postgres_dsn).returncode == 0
    assert _run(second, b, "--db", fresh_postgres_dsn).returncode == 1  # one 404
    assert _by_location(fresh_postgres_dsn) == {str(a): {"finalized": 8}, str(b): {"finalized": 4, "failed": 1}}
    proc = run_cli("jobs", "--db", fresh_postgres_dsn)
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    assert any(str(a) in l and "8" in l for l in lines) and any(str(b) in l and "4" in l for l in lines), proc.stdout


@pytest.mark.postgres
def test_a_job_finished_in_a_folder_that_is_gone_is_fetched_into_this_one(server, tmp_path, fresh_postgres_dsn):  # noqa: F811
    import shutil

    urls = _serve(server, 10)
    half, whole = tmp_path / "half.txt", tmp_path / "whole.txt"
    half.write_text("".join(u + "\n" for u in urls[:5]))
    whole.write_text("".join(u + "\n" for u in urls))
    a, b = tmp_path / "a", tmp_path / "b"
    assert _run(half, b, "--db", fresh_postgres_dsn).returncode == 0
    server.reset_stats()
    # B's files exist: A trusts them and fetches only the other five.
    proc = _run(whole, a, "--db", fresh_postgres_dsn, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["outcomes"]["skipped"] == 5
    assert sorted(r.path for r in server.requests if r.body_bytes) == [f"/s/{i}.bin" for i in range(5, 10)]
    assert _files(a) == {f"{i}.bin" for i in range(5, 10)}

    shutil.rmtree(b)
    server.reset_stats()
    proc = _run(whole, a, "--db", fresh_postgres_dsn, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["outcomes"].get("skipped", 0) == 5  # A's own five
    assert sorted(r.path for r in server.requests if r.body_bytes) == [f"/s/{i}.bin" for i in range(5)]
    assert _files(a) == {f"{i}.bin" for i in range(10)}
    assert {r["path"] for r in _rows(a) if r["outcome"] == "downloaded"} == {f"{i}.bin" for i in range(10)}
    assert _by_location(fresh_postgres_dsn) == {str(a): {"finalized": 10}}


def test_a_write_ahead_log_left_beside_a_deleted_store_is_kept_aside(server, done):
    """SQLite would reset the old store's log when the new file is opened: it is renamed instead."""
    jobs, out, files, rows = done
    store = _store(out)
    conn = sqlite3.connect(store)  # a reader pins the log, as a crashed process leaves it
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.execute("UPDATE jobs SET state = 'planned' WHERE state = 'planned'")
    conn.execute("UPDATE jobs SET updated_at = updated_at + 1")
    conn.commit()
    wal = store.with_name("jobs.db-wal")
    saved = wal.read_bytes()
    assert saved
    conn.close()
    store.unlink()
    wal.write_bytes(saved)
    proc = _run(jobs, out)
    assert proc.returncode == 0, proc.stderr
    _nothing_fetched_again(server, out, files, rows)
    assert [p.read_bytes() for p in store.parent.glob("jobs.db-wal.stale-*")] == [saved]


@pytest.mark.postgres
def test_a_new_postgresql_store_for_a_folder_with_a_manifest_gets_its_records(server, done, postgres_dsn):  # noqa: F811
    from contentdownload.testing.pg import create_database, drop_database

    jobs, out, files, rows = done  # done with the folder's SQLite store; now the jobs move to a new database
    db = create_database(postgres_dsn)
    try:
        proc = _run(jobs, out, "--db", db)
        assert proc.returncode == 0, proc.stderr
        assert f"rebuilt {N} job records from the manifest ({N} finished" in proc.stderr
        _nothing_fetched_again(server, out, files, rows)
        proc = run_cli("jobs", "rebuild", "--out", str(out), "--db", db, "--json")  # nothing is missing now
        assert proc.returncode == 0 and json.loads(proc.stdout)["records"] == 0, proc.stderr
    finally:
        drop_database(postgres_dsn, db)
