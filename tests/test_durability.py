"""``--durability file|batch|none``: what the part store fsyncs at each level, counted through the injectable sync function."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import threading
import time

import pytest

from contentdownload.transfer import durability
from helpers import cli_env

COUNT_FSYNCS = textwrap.dedent("""
    import atexit, json, os, stat, sys
    from contentdownload.transfer import durability
    counts = {"file": 0, "folder": 0}
    def counting(fd):
        counts["folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"] += 1
        os.fsync(fd)
    durability.set_fsync(counting)
    report = sys.argv.pop(1)
    atexit.register(lambda: open(report, "w").write(json.dumps(counts)))
    from contentdownload.cli.parser import main
    sys.argv[0] = "contentdownload"
    raise SystemExit(main())
""")


def _run_counting(tmp_path, jobs, level):
    import subprocess

    wrapper, report, out = tmp_path / "count_fsyncs.py", tmp_path / f"fsyncs-{level}.json", tmp_path / f"out-{level}"
    wrapper.write_text(COUNT_FSYNCS)
    proc = subprocess.run([sys.executable, str(wrapper), str(report), "run", str(jobs), "--out", str(out), "--no-progress",
                           "--workers", "8", "--per-host", "8", "--processes", "1", "--durability", level],
                          env=cli_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "manifest.metrics.json").read_text())
    assert metrics["outcomes"]["downloaded"] == 30 and metrics["durability"] == level
    return json.loads(report.read_text()), metrics["commit_batches"]


def test_each_durability_level_fsyncs_what_it_says(server, tmp_path):
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("".join(server.add_file(f"/d{i}.pdf", b"%PDF-1.4\n" + os.urandom(3000)) + "\n" for i in range(30)))
    per_file, file_batches = _run_counting(tmp_path, jobs, "file")
    assert per_file == {"file": 30, "folder": 30} and file_batches["count"] == 0  # each part, then its folder, every time
    batched, batches = _run_counting(tmp_path, jobs, "batch")
    assert batched["file"] == 30  # every part still made durable before its rename
    assert batches["files"] == 30 and batched["folder"] == batches["count"] <= 30  # one folder fsync per batch
    nothing, _ = _run_counting(tmp_path, jobs, "none")
    assert nothing == {"file": 0, "folder": 0}


def test_the_committer_commits_what_waits_together_in_one_batch():
    committed: list[list[int]] = []
    committer = durability.Committer(lambda items: committed.append(list(items)) or items, max_batch=4, window=60.0)
    committer.batches.append(2)  # jobs have finished together before: the window is open
    results: list[int] = []
    threads = [threading.Thread(target=lambda i=i: results.append(committer.submit(i))) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(committed) == 1 and sorted(committed[0]) == [0, 1, 2, 3]  # a full batch goes at once, not after the window
    assert sorted(results) == [0, 1, 2, 3] and committer.batches == [2, 4]


def test_a_part_store_batch_stays_open_for_its_window_after_its_first_item(monkeypatch, tmp_path):
    """An item arriving after the staging folder's committer took the first one still joins its batch within the window."""
    committed: list[list[str]] = []
    monkeypatch.setattr(durability, "BATCH_WINDOW_S", 1.0)
    release = threading.Event()

    def commit(items):
        release.wait()  # the first batch ("x") is held until two more wait behind it
        committed.append(list(items))
        return items

    committer = durability.committer((tmp_path, "window"), commit)
    submitters = [threading.Thread(target=committer.submit, args=(item,)) for item in ("x", "y", "z")]
    submitters[0].start()
    _until(lambda: committer._thread is not None and not committer._queue.qsize())
    for t in submitters[1:]:
        t.start()
    _until(lambda: committer._queue.qsize() == 2)
    release.set()
    for t in submitters:
        t.join()
    assert committed == [["x"], ["y", "z"]]  # no window yet: "x" alone, then what waited
    first = threading.Thread(target=committer.submit, args=("a",))
    first.start()
    _until(lambda: not committer._queue.qsize())  # the committer has taken "a"
    assert committer.submit("b") == "b"
    first.join()
    assert committed[2:] == [["a", "b"]] and committer.batches == [1, 2, 2]


def test_a_lone_item_is_committed_without_waiting_for_the_window():
    """One job at a time (``--workers 1``) pays no window: it opens only once batches hold more than one item."""
    committer = durability.Committer(lambda items: items, window=3600.0)
    done = threading.Thread(target=lambda: [committer.submit(i) for i in range(3)])
    done.start()
    done.join(timeout=60)
    assert not done.is_alive() and committer.batches == [1, 1, 1]


def _until(condition) -> None:
    while not condition():
        time.sleep(0.001)


def test_an_error_in_a_batch_reaches_every_job_of_it():
    def failing(items):
        raise OSError("disk gone")

    committer = durability.Committer(failing)
    with pytest.raises(OSError, match="disk gone"):
        committer.submit("x")


def test_the_level_is_per_thread_and_restored():
    assert durability.current().level == "batch"
    seen = []
    with durability.using("none"):
        assert not durability.current().syncs
        t = threading.Thread(target=lambda: seen.append(durability.current().level))
        t.start()
        t.join()
    assert seen == ["batch"] and durability.current().level == "batch"
    with pytest.raises(ValueError):
        durability.Durability("sometimes")


def test_level_none_fsyncs_no_sidecar_in_a_background_checkpoint(tmp_path):
    """The checkpoint's thread writes the sidecar at the part's level, not at the default ``batch``."""
    from contentdownload.transfer.parts import Effects, PartStore, Sidecar, StagePaths

    synced: list[int] = []
    previous = durability.set_fsync(synced.append)
    body = os.urandom(3 << 20)
    blocks = iter([body[i:i + (256 << 10)] for i in range(0, len(body), 256 << 10)] + [b""])
    staging = tmp_path / "staging"
    staging.mkdir()
    paths = StagePaths.for_key(tmp_path / "out.bin", staging, "k", root=tmp_path)
    try:
        with durability.using("none"):
            part = PartStore(staging).open(paths, meta=Sidecar(url="http://h/x", committed=0), expected_size=len(body))
            outcome = part.receive(lambda: next(blocks), effects=Effects(), checkpoint_every=1 << 20)
            part.close()
    finally:
        durability.set_fsync(previous)
    assert outcome.error is None and json.loads(paths.sidecar.read_text())["committed"] == len(body)
    assert synced == []
