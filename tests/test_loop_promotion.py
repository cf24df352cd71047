"""Promotion on the event loop: ``PartStore.promote_async`` and its loop committer, ``LoopCommitter``, ``finalize_async``."""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from contentdownload.errors import LeaseLostError
from contentdownload.hooks.model import Job, Lease, StagePaths
from contentdownload.transfer import durability
from contentdownload.transfer.parts import PartStore, PromoteRequest


class _Lost(Lease):
    """A lease taken over by another worker."""

    def assert_held(self) -> None:
        raise LeaseLostError("taken over")


def _request(store: PartStore, root: Path, name: str, data: bytes, *, lease: Lease | None = None,
             size: int | None = None) -> PromoteRequest:
    paths = StagePaths.for_key(root / name, store.staging, hashlib.sha256(name.encode()).hexdigest(), root=root)
    with store.open(paths, expected_size=len(data)) as part:
        part.append(data)
        sha = part.close()
    extra = {"lease": lease} if lease is not None else {}
    return PromoteRequest(paths=paths, job=Job(urls=(f"http://example.org/{name}",), size=size), size=len(data), sha256=sha, **extra)


def _store(tmp_path: Path) -> tuple[PartStore, Path]:
    root = tmp_path / "out"
    staging = root / ".contentdownload" / "staging"
    staging.mkdir(parents=True)
    return PartStore(staging, root=root), root


def _on_a_loop(coroutine_fn, *args):
    """Run ``coroutine_fn(*args)`` on a fresh loop whose executor threads are counted."""
    threads: set[str] = set()
    pool = ThreadPoolExecutor(max_workers=4, initializer=lambda: threads.add(threading.current_thread().name))
    loop = asyncio.new_event_loop()
    loop.set_default_executor(pool)
    try:
        return loop.run_until_complete(coroutine_fn(*args))
    finally:
        loop.close()
        pool.shutdown(wait=True)


@pytest.fixture
def counted_fsyncs():
    counts = {"file": 0, "folder": 0}

    def counting(fd: int) -> None:
        counts["folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"] += 1
        os.fsync(fd)

    previous = durability.set_fsync(counting)
    yield counts
    durability.set_fsync(previous)


def test_parts_finishing_together_on_a_loop_are_promoted_in_one_batch(tmp_path, counted_fsyncs):
    store, root = _store(tmp_path)
    bodies = {f"f{i}.bin": os.urandom(1000 + i) for i in range(12)}
    requests = [_request(store, root, name, data) for name, data in bodies.items()]
    before = len(durability.commit_batches())

    async def promote_all():
        return await asyncio.gather(*(store.promote_async(r) for r in requests))

    results = _on_a_loop(promote_all)
    assert all(r.ok and r.durable for r in results)
    assert {r.path.name: r.path.read_bytes() for r in results} == bodies
    batches = durability.commit_batches()[before:]
    assert batches == [12]  # all submitted before the committer's first turn: one batch
    assert counted_fsyncs == {"file": 12, "folder": 1}  # every part durable before its rename, the folder once
    assert not any(store.staging.glob("*.part"))


def test_a_refused_part_or_a_lost_lease_in_a_batch_spares_the_others(tmp_path):
    store, root = _store(tmp_path)
    good = _request(store, root, "good.bin", b"g" * 500)
    wrong_size = _request(store, root, "short.bin", b"s" * 500, size=501)
    lost = _request(store, root, "lost.bin", b"l" * 500, lease=_Lost())

    async def promote_all():
        return await asyncio.gather(*(store.promote_async(r) for r in (good, wrong_size, lost)), return_exceptions=True)

    ok, refused, raised = _on_a_loop(promote_all)
    assert ok.ok and ok.path.read_bytes() == b"g" * 500
    assert not refused.ok and refused.reason == "size_mismatch" and not (root / "short.bin").exists()
    assert isinstance(raised, LeaseLostError) and not (root / "lost.bin").exists()
    assert lost.paths.part.exists()  # the part of a lost lease stays for its new owner


@pytest.mark.parametrize("level", ["file", "none"])
def test_other_levels_promote_one_part_at_a_time_in_the_executor(tmp_path, counted_fsyncs, level):
    store, root = _store(tmp_path)
    requests = [_request(store, root, f"f{i}.bin", os.urandom(300)) for i in range(3)]
    before = len(durability.commit_batches())

    async def promote_all():
        with durability.using(level):
            return await asyncio.gather(*(store.promote_async(r) for r in requests))

    results = _on_a_loop(promote_all)
    assert all(r.ok for r in results) and durability.commit_batches()[before:] == []
    assert counted_fsyncs == ({"file": 3, "folder": 3} if level == "file" else {"file": 0, "folder": 0})


def test_a_loop_committer_batches_what_waits_and_gives_each_batch_its_own_error():
    committed: list[list[int]] = []
    in_first, release = threading.Event(), threading.Event()

    def commit(items):
        if items == [0]:
            in_first.set()
            release.wait()  # the first batch is held until the others wait behind it
        if 3 in items:
            raise OSError("disk gone")
        committed.append(list(items))
        return [item * 10 for item in items]

    async def main():
        committer = durability.LoopCommitter(commit, max_batch=3)
        first = asyncio.ensure_future(committer.submit(0))
        await asyncio.get_running_loop().run_in_executor(None, in_first.wait)
        others = [asyncio.ensure_future(committer.submit(i)) for i in range(1, 6)]
        await asyncio.sleep(0)  # they are all waiting now
        release.set()
        results = await asyncio.gather(first, *others, return_exceptions=True)
        return results, committer.batches

    results, batches = _on_a_loop(main)
    assert batches == [1, 3, 2]
    assert results[0] == 0 and all(isinstance(r, OSError) for r in results[1:4]) and results[4:] == [40, 50]
    assert committed == [[0], [4, 5]]  # the batch of 1, 2, 3 failed whole; the next one went on


def test_a_loop_committer_cancelled_with_its_loop_cancels_its_waiters():
    started = threading.Event()
    release = threading.Event()

    def commit(items):
        started.set()
        release.wait()
        return items

    async def main():
        committer = durability.LoopCommitter(commit)
        waiters = [asyncio.ensure_future(committer.submit(i)) for i in range(3)]
        await asyncio.sleep(0)
        await asyncio.get_running_loop().run_in_executor(None, started.wait)
        committer._draining.cancel()
        results = await asyncio.gather(*waiters, return_exceptions=True)
        release.set()
        return results

    results = _on_a_loop(main)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)


def test_a_part_whose_check_raises_fails_alone_in_its_batch(tmp_path, counted_fsyncs):
    store, root = _store(tmp_path)
    good = [_request(store, root, f"g{i}.bin", os.urandom(700)) for i in range(3)]
    broken = _request(store, root, "broken.bin", b"b" * 700, size=701)
    broken.paths.part.unlink()
    broken.paths.part.mkdir()  # its check refuses the size, and discarding the part then raises

    async def promote_all():
        return await asyncio.gather(*(store.promote_async(r) for r in (*good, broken)), return_exceptions=True)

    *promoted, raised = _on_a_loop(promote_all)
    assert isinstance(raised, IsADirectoryError)
    assert all(r.ok for r in promoted) and [r.path.name for r in promoted] == ["g0.bin", "g1.bin", "g2.bin"]
    assert counted_fsyncs == {"file": 3, "folder": 1}


def test_an_fsync_that_fails_fails_its_part_alone(tmp_path):
    store, root = _store(tmp_path)
    requests = [_request(store, root, f"f{i}.bin", os.urandom(400)) for i in range(4)]
    failing = os.stat(requests[2].paths.part).st_ino

    def fsync(fd: int) -> None:
        if os.fstat(fd).st_ino == failing:
            raise OSError(5, "Input/output error")
        os.fsync(fd)

    previous = durability.set_fsync(fsync)
    try:
        async def promote_all():
            return await asyncio.gather(*(store.promote_async(r) for r in requests), return_exceptions=True)

        results = _on_a_loop(promote_all)
    finally:
        durability.set_fsync(previous)
    assert isinstance(results[2], OSError) and results[2].errno == 5
    assert [r.ok for i, r in enumerate(results) if i != 2] == [True] * 3
    assert requests[2].paths.part.exists() and not (root / "f2.bin").exists()  # never promoted undurable


def test_items_handed_over_without_waiting_are_committed_in_batches_before_drain_returns():
    committed: list[list[int]] = []
    in_first, release = threading.Event(), threading.Event()

    def commit(items):
        if items == [0]:
            in_first.set()
            release.wait()
        committed.append(list(items))
        return [None] * len(items)

    async def main():
        committer = durability.LoopCommitter(commit, max_batch=4)
        committer.add(0)
        await asyncio.get_running_loop().run_in_executor(None, in_first.wait)
        for i in range(1, 7):
            committer.add(i)
        release.set()
        await committer.drain()
        return committer.batches

    assert _on_a_loop(main) == [1, 4, 2] and committed == [[0], [1, 2, 3, 4], [5, 6]]
