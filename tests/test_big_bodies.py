"""Big bodies: whole writes despite short writes, the early writeback of durable parts, the hash thread's buffers.

Real files and the loopback server; the short write is forced by wrapping ``os.write``.
"""

from __future__ import annotations

import errno
import hashlib
import os

import pytest

from contentdownload.hooks.model import Effects, Job, StagePaths, TransferOptions
from contentdownload.testing.conformance import TransferRig
from contentdownload.testing.server import Fault
from contentdownload.transfer import blocks, parts
from contentdownload.transfer.parts import PartStore

OPTIONS = TransferOptions(chunk_size=1 << 20, checkpoint_bytes=4 << 20)


@pytest.mark.parametrize("plugin", ["streaming", "legacy"])
def test_short_writes_are_continued_not_dropped(server, tmp_path, monkeypatch, plugin):
    data = os.urandom((9 << 20) + 77)  # hashed in the thread, several blocks
    server.add_file("/big.bin", data)
    real_write = os.write
    monkeypatch.setattr(blocks.os, "write", lambda fd, buf: real_write(fd, memoryview(buf)[:100_003]))
    with TransferRig(plugin, tmp_path / "rig", options=OPTIONS) as rig:
        result = rig.run(Job(urls=(server.url("/big.bin"),)), "big.bin")
    assert result.outcome == "downloaded", result.reason
    assert (rig.out / "big.bin").read_bytes() == data
    assert result.sha256 == hashlib.sha256(data).hexdigest()


def test_a_durable_part_starts_its_writeback_while_it_is_received(server, tmp_path, monkeypatch):
    data = os.urandom(30 << 20)
    server.add_file("/big.bin", data)
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(parts, "start_writeback", lambda fd, start, length: calls.append((start, length)) or True)
    with TransferRig("streaming", tmp_path / "rig", options=OPTIONS) as rig:
        assert rig.run(Job(urls=(server.url("/big.bin"),)), "big.bin").outcome == "downloaded"
    assert len(calls) >= 3
    assert all(start == sum(length for _, length in calls[:i]) for i, (start, _) in enumerate(calls))  # in order, no gap
    assert all(length >= parts.WRITEBACK_EVERY for _, length in calls)


def test_a_durable_part_at_level_none_never_asks_for_writeback(server, tmp_path, monkeypatch):
    """Early writeback only prepares the final fsync, which level ``none`` skips."""
    from contentdownload.transfer import durability

    server.add_file("/big.bin", os.urandom(20 << 20))
    calls: list[int] = []
    monkeypatch.setattr(parts, "start_writeback", lambda *args: calls.append(1) or True)
    with TransferRig("streaming", tmp_path / "rig", options=OPTIONS) as rig, durability.using("none"):
        assert rig.run(Job(urls=(server.url("/big.bin"),)), "big.bin").outcome == "downloaded"
    assert calls == []


def test_a_plain_part_never_asks_for_writeback(server, tmp_path, monkeypatch):
    server.add_file("/big.bin", os.urandom(20 << 20))
    calls: list[int] = []
    monkeypatch.setattr(parts, "start_writeback", lambda *args: calls.append(1) or True)
    with TransferRig("legacy", tmp_path / "rig", options=OPTIONS) as rig:
        assert rig.run(Job(urls=(server.url("/big.bin"),)), "big.bin").outcome == "downloaded"
    assert calls == []


@pytest.mark.skipif(not os.uname().sysname == "Linux", reason="sync_file_range is Linux's")
def test_start_writeback_is_the_real_system_call(tmp_path):
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        blocks.write_all(fd, os.urandom(1 << 20))
        assert blocks.start_writeback(fd, 0, 1 << 20) is True
        assert blocks.start_writeback(-1, 0, 1 << 20) is False  # EBADF: reported, not raised
    finally:
        os.close(fd)


class Source:
    """A body read into the caller's buffers as fast as it can, in odd sizes."""

    def __init__(self, body: bytes):
        self.body, self.position = body, 0

    def readinto(self, view):
        n = min(len(view), len(self.body) - self.position, 300_001)
        view[:n] = self.body[self.position:self.position + n]
        self.position += n
        return n


def _open(tmp_path, size, mode="plain"):
    staging = tmp_path / "staging"
    staging.mkdir()
    paths = StagePaths.for_key(tmp_path / "out.bin", staging, "k", root=tmp_path)
    return paths, PartStore(staging, mode=mode).open(paths, expected_size=size)


def test_buffers_are_reused_only_after_the_hash_thread_is_done(tmp_path):
    """The reader reuses buffers as fast as it can: the SHA-256 and the file must still be the body's."""
    body = os.urandom(40 << 20)
    paths, part = _open(tmp_path, len(body))
    outcome = part.receive(Source(body), effects=Effects(), block_size=1 << 20)
    assert outcome.error is None
    assert part.close() == hashlib.sha256(body).hexdigest()
    assert paths.part.read_bytes() == body


def test_a_body_cut_mid_block_keeps_every_byte_received(server, tmp_path):
    data = os.urandom(5 << 20)
    server.add_file("/cut.bin", data)
    server.add_fault("/cut.bin", Fault.cut_after((2 << 20) + 12345))
    with TransferRig("streaming", tmp_path / "rig", options=OPTIONS, retries=0) as rig:
        result = rig.run(Job(urls=(server.url("/cut.bin"),)), "cut.bin")
        part = rig.paths("cut.bin").part
        assert result.outcome == "failed"
        assert part.read_bytes() == data[: (2 << 20) + 12345]  # nothing held back in a half-filled buffer


def test_a_full_disk_in_the_writer_thread_is_raised_by_receive(tmp_path, monkeypatch):
    body = os.urandom(30 << 20)
    paths, part = _open(tmp_path, len(body))
    real_write, written = os.write, [0]

    def write(fd, data):
        if written[0] > (5 << 20):
            raise OSError(errno.ENOSPC, "No space left on device")
        n = real_write(fd, data)
        written[0] += n
        return n

    monkeypatch.setattr(blocks.os, "write", write)
    with pytest.raises(OSError) as info:
        part.receive(Source(body), effects=Effects(), block_size=1 << 20)
    assert info.value.errno == errno.ENOSPC
    part.abandon()
    assert paths.part.stat().st_size == written[0]


def test_a_stage_bounds_the_blocks_it_owns_and_never_blocks_on_the_caller_s():
    """Blocks fed with their ``done`` are bounded by the caller's buffers: feeding them never waits on the thread
    (an event loop must not); blocks fed without one wait once ``depth`` of them are queued."""
    import threading

    gate, seen = threading.Event(), []

    def step(block, done):
        gate.wait()
        seen.append(block)
        if done is not None:
            done()

    stage = blocks.Stage(step, threaded=True, name="test-stage", depth=2)
    given_back = []
    for i in range(10):  # the step is stuck: none of these may block
        stage.feed(b"%d" % i, lambda i=i: given_back.append(i))
    stage.feed(b"a")
    stage.feed(b"b")  # both slots taken
    third = threading.Thread(target=stage.feed, args=(b"c",))
    third.start()
    third.join(0.2)
    assert third.is_alive()  # waits for a slot
    gate.set()
    third.join()
    stage.stop()
    assert seen == [b"%d" % i for i in range(10)] + [b"a", b"b", b"c"] and given_back == list(range(10))


def test_a_block_queued_behind_a_failed_write_never_lands_in_its_place(tmp_path, monkeypatch):
    """A failed write (a full disk) ends the part's writes: a block already queued behind it is not written
    once the error was raised in the caller (the disk may have room again by then), so the file and the
    count the sidecar records stay the body's first bytes."""
    import json
    import threading

    body = os.urandom(4 << 20)
    paths, part = _open(tmp_path, 30 << 20, mode="durable")
    real_write, failed = os.write, []

    def write(fd, data):
        if fd == part.fd and not failed:
            failed.append(1)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(blocks.os, "write", write)
    first_failed = threading.Event()
    part.take(memoryview(body)[: 1 << 20], Effects(), done=first_failed.set)  # given back once its write failed
    first_failed.wait()
    with pytest.raises(OSError) as info:
        part.take(memoryview(body)[1 << 20: 2 << 20], Effects(), done=lambda: None)  # queued, then the error is raised
    assert info.value.errno == errno.ENOSPC
    part.abandon()
    on_disk = paths.part.read_bytes()
    assert on_disk == body[: len(on_disk)]
    if paths.sidecar.exists():
        assert json.loads(paths.sidecar.read_text())["committed"] <= len(on_disk)
