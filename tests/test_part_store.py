"""The core part store: a third-party stream_io resumes on it, a paused worker never promotes, no symlink is followed."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from contentdownload.hooks.model import Job
from contentdownload.jobs.keys import identity_key
from contentdownload.testing.conformance import TransferRig
from contentdownload.transfer.validators import resume_start
from contentdownload.testing.server import Fault
from contentdownload.transfer.parts import PartStore
from helpers import docs_examples

PLUGIN = docs_examples()["acme_stream/plugin.py"]
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("DOCSTOKG_", "CONTENTDOWNLOAD_"))}


def test_a_third_party_stream_io_on_the_part_store_resumes_with_range(server, third_party, tmp_path):
    assert len(PLUGIN.splitlines()) < 40
    third_party("acme-partstream", {"partstream": PLUGIN})
    data = os.urandom(600_000)
    url = server.add_file("/cut.bin", data)
    server.add_fault("/cut.bin", Fault.cut_after(250_000))
    with TransferRig("partstream", tmp_path / "rig", hooks=("stream_io",)) as rig:
        result = rig.run(Job(urls=(url,)), "cut.bin")
        final = rig.paths("cut.bin").final
    assert result.outcome == "resumed", (result.outcome, result.reason)
    assert result.plugins["stream_io"] == "partstream"
    assert hashlib.sha256(final.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
    ranges = [r.range for r in server.requests if r.path == "/cut.bin"]
    # From the committed offset, with the overlap the part store compares before it appends.
    assert ranges == [None, f"bytes={resume_start(250_000)}-"] and result.resumed_from == 250_000


def _state(pid: int) -> str:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2]


def _wait_stopped(proc: subprocess.Popen) -> None:
    while proc.poll() is None and _state(proc.pid) != "T":
        try:
            proc.wait(timeout=0.02)
        except subprocess.TimeoutExpired:
            pass
    assert proc.poll() is None, proc.stderr.read()


def _cli(out: Path, jobs: Path, *extra: str, wrapper: Path | None = None) -> subprocess.Popen:
    head = [str(wrapper)] if wrapper else ["-m", "contentdownload"]
    return subprocess.Popen([sys.executable, *head, "run", str(jobs), "--out", str(out), "--no-progress", *extra],
                            env=CLEAN_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


STOP_BEFORE_RENAME = textwrap.dedent("""
    import signal, sys, threading
    from contentdownload.transfer import parts
    # Sent to this thread, so this thread is the one stopped before its next instruction (a
    # process-wide kill may be taken by another thread while this one goes on to the rename).
    parts.set_test_hook("before_rename", lambda paths: signal.pthread_kill(threading.get_ident(), signal.SIGSTOP))
    from contentdownload.cli.parser import main
    sys.argv[0] = "contentdownload"
    raise SystemExit(main())
""")


@pytest.mark.slow
def test_a_worker_paused_between_lease_check_and_rename_never_promotes(server, tmp_path):
    old, new = os.urandom(300_000), os.urandom(200_000)
    url = server.add_file("/paused.bin", old)
    jobs, out = tmp_path / "jobs.txt", tmp_path / "out"
    jobs.write_text(url + "\n")
    wrapper = tmp_path / "stop_before_rename.py"
    wrapper.write_text(STOP_BEFORE_RENAME)
    first = _cli(out, jobs, "--lease-ttl", "1", wrapper=wrapper)
    try:
        _wait_stopped(first)  # checked its lease, stopped right before the rename
        staging = out / ".contentdownload" / "staging"
        [first_part] = staging.glob("*.part")
        server.set_content("/paused.bin", new)
        second = _cli(out, jobs, "--lease-ttl", "1")
        _, err = second.communicate(timeout=120)
        assert second.returncode == 0, err
        final = out / "paused.bin"
        after_second = final.stat()
        assert hashlib.sha256(final.read_bytes()).hexdigest() == hashlib.sha256(new).hexdigest()
        assert not first_part.exists()  # fenced: the paused worker's part path is gone
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=120)
    assert "Traceback" not in err, err
    assert final.stat().st_ino == after_second.st_ino and final.stat().st_mtime_ns == after_second.st_mtime_ns
    assert final.read_bytes() == new
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines() if line.strip()]
    assert [r["outcome"] for r in rows] == ["downloaded"]
    assert rows[0]["sha256"] == hashlib.sha256(new).hexdigest() and rows[0]["size"] == len(new)
    log = (out / "logs" / "download.log").read_text()
    assert "fenced" in log and "not promoted" in log


def _sentinel_untouched(sentinel: Path, before: dict) -> None:
    assert {p.name: (p.read_bytes() if p.is_file() else None) for p in sentinel.iterdir()} == before


def _run(out: Path, jobs: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "contentdownload", "run", str(jobs), "--out", str(out), "--no-progress"],
                          env=CLEAN_ENV, capture_output=True, text=True, timeout=120)


@pytest.fixture
def planted(server, tmp_path):
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "keep.txt").write_bytes(b"sentinel")
    url = server.add_file("/victim.bin", os.urandom(100_000))
    jobs = tmp_path / "jobs.txt"
    jobs.write_text(url + "\n")
    out = tmp_path / "out"
    (out / ".contentdownload").mkdir(parents=True)
    return sentinel, url, jobs, out


def test_a_symlinked_staging_folder_refuses_the_run(planted):
    sentinel, _, jobs, out = planted
    (out / ".contentdownload" / "staging").symlink_to(sentinel, target_is_directory=True)
    done = _run(out, jobs)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "symlink" in done.stderr
    _sentinel_untouched(sentinel, {"keep.txt": b"sentinel"})


def test_a_symlink_at_a_part_path_fails_the_job(planted):
    sentinel, url, jobs, out = planted
    staging = out / ".contentdownload" / "staging"
    staging.mkdir()
    key, _ = identity_key(Job(urls=(url,)))
    for epoch in range(1, 4):
        (staging / f"{key}.{epoch}.part").symlink_to(sentinel / "keep.txt")
    done = _run(out, jobs)
    assert "Traceback" not in done.stderr and done.returncode != 0
    [row] = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert row["outcome"] == "failed" and row["reason"] == "part_path_is_symlink"
    _sentinel_untouched(sentinel, {"keep.txt": b"sentinel"})


@pytest.mark.parametrize("dangling", [False, True])
def test_a_run_never_writes_through_a_symlink_at_a_final_path(planted, dangling):
    sentinel, _, jobs, out = planted
    (out / "victim.bin").symlink_to(sentinel / ("missing.bin" if dangling else "keep.txt"))
    done = _run(out, jobs)
    assert "Traceback" not in done.stderr
    [row] = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    # planned to a free name beside it: the planner sees the link itself (lexists), dangling or not
    # (the part store's own refusal at promotion is tested with the rig below)
    assert done.returncode == 0 and row["outcome"] == "downloaded" and Path(row["path"]).name != "victim.bin"
    assert (out / "victim.bin").is_symlink()
    _sentinel_untouched(sentinel, {"keep.txt": b"sentinel"})


@pytest.mark.parametrize("planted_at, reason", [("final", "final_path_is_symlink"), ("dangling", "final_path_is_symlink"),
                                                 ("parent", "parent_is_symlink")])
def test_a_symlink_planted_at_a_final_path_or_its_folder_fails_the_job(server, tmp_path, planted_at, reason):
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "keep.txt").write_bytes(b"sentinel")
    url = server.add_file("/f.bin", os.urandom(50_000))
    name = "sub/f.bin" if planted_at == "parent" else "f.bin"
    with TransferRig("streaming", tmp_path / "rig") as rig:
        link = rig.out / ("sub" if planted_at == "parent" else "f.bin")
        link.symlink_to(sentinel if planted_at == "parent" else sentinel / ("gone" if planted_at == "dangling" else "keep.txt"))
        result = rig.run(Job(urls=(url,)), name)
    assert result.outcome == "failed" and result.reason == reason
    assert link.is_symlink()
    _sentinel_untouched(sentinel, {"keep.txt": b"sentinel"})


def test_the_part_store_refuses_a_part_path_symlink_and_a_symlinked_parent(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    out, staging = tmp_path / "out", tmp_path / "out" / ".staging"
    staging.mkdir(parents=True)
    rig_paths = PartStore(staging, root=out)
    from contentdownload.errors import UnsafePathError
    from contentdownload.hooks.model import StagePaths
    paths = StagePaths.for_key(out / "sub" / "f.bin", staging, "k", root=out)
    paths.part.symlink_to(outside / "x")
    with pytest.raises(UnsafePathError) as refused:
        rig_paths.open(paths)
    assert refused.value.reason == "part_path_is_symlink" and not (outside / "x").exists()
