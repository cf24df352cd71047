"""The part lock across processes: a live writer's part is fenced off, never adopted; a dead writer's is resumed."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from contentdownload.jobs.workspace import Workspace
import pytest

from contentdownload.errors import UnsafePathError
from contentdownload.transfer.locks import ByteLock, PartLock
from contentdownload.transfer.parts import PartStore, Sidecar
from helpers import cli_env

WRITER = textwrap.dedent("""
    import sys
    from contentdownload.jobs.workspace import Workspace
    from contentdownload.transfer.parts import PartStore, Sidecar
    ws = Workspace.open(sys.argv[1])
    parts = PartStore(ws.staging, root=ws.out)
    paths = ws.stage_paths("f.bin", "k", epoch=1)
    with parts.claim("k", 1):
        part = parts.open(paths, meta=Sidecar(url="http://h/f.bin", committed=0), expected_size=2000)  # short: no sidecar yet
        part.append(b"a" * 1000)
        print("writing", flush=True)
        if sys.stdin.readline().strip() == "finish":
            part.append(b"b" * 1000)  # a paused worker goes on writing into the file it has open
            part.close()
        else:
            part.abandon()  # interrupted: the bytes so far are recorded for a resume
    print("done", flush=True)
""")


def _writer(out):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=cli_env())
    assert proc.stdout.readline().strip() == "writing"
    return proc


def test_a_short_body_being_written_by_a_live_process_is_fenced_not_adopted_by_the_next_epoch(tmp_path):
    """Without the lock the next epoch could not tell a live writer from a dead one, and would adopt the file it still writes."""
    ws = Workspace.open(tmp_path / "out")
    writer = _writer(ws.out)
    parts = PartStore(ws.staging, root=ws.out)
    with parts.claim("k", 2):
        assert not ws.stage_paths("f.bin", "k", epoch=2).part.exists()  # nothing adopted
        assert (ws.staging / "k.1.fenced").stat().st_size == 1000
        writer.communicate("finish\n", timeout=60)
        assert writer.returncode == 0
        assert not ws.stage_paths("f.bin", "k", epoch=2).part.exists()  # its later bytes went to the fenced file only
    assert (ws.staging / "k.1.fenced").read_bytes() == b"a" * 1000 + b"b" * 1000


def test_the_part_of_a_writer_that_is_gone_is_adopted_with_its_sidecar(tmp_path):
    ws = Workspace.open(tmp_path / "out")
    writer = _writer(ws.out)
    writer.communicate("stop\n", timeout=60)
    assert writer.returncode == 0
    parts = PartStore(ws.staging, root=ws.out)
    own = ws.stage_paths("f.bin", "k", epoch=2)
    with parts.claim("k", 2):
        assert own.part.read_bytes() == b"a" * 1000
        assert parts.load_sidecar(own).committed == 1000
    assert not (ws.staging / "k.1.lock").exists() and not (ws.staging / "k.2.lock").exists()


def test_a_lock_file_removed_by_its_holder_is_not_held_by_a_waiter(tmp_path):
    """A lock released with its file removed is free at once: the next holder makes the file anew and holds it alone."""
    path = tmp_path / "k.1.lock"
    first, second = PartLock(path), PartLock(path)
    assert first.acquire() and not second.acquire()
    first.release(remove=True)
    assert not path.exists()
    assert second.acquire() and path.exists() and not PartLock(path).acquire()
    second.release(remove=True)


def test_a_byte_lock_is_exclusive_between_two_opens_of_one_process_and_leaves_no_file_per_name(tmp_path):
    """Two holders in one process conflict as two processes do, so a thread past its lease is seen alive by the next epoch."""
    table = tmp_path / "epochs.locks"
    first, again, other = ByteLock(table, "k.1"), ByteLock(table, "k.1"), ByteLock(table, "k.2")
    assert first.acquire() and not again.acquire() and other.acquire()
    first.release()
    assert again.acquire()
    again.release(), other.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epochs.locks"]


def test_a_byte_lock_refuses_a_planted_symlink_for_its_file(tmp_path):
    (tmp_path / "elsewhere").write_bytes(b"")
    (tmp_path / "epochs.locks").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UnsafePathError):
        ByteLock(tmp_path / "epochs.locks", "k.1").acquire()


def test_a_first_claim_takes_its_lock_without_waiting_and_leaves_any_other_claim_to_claim(tmp_path):
    ws = Workspace.open(tmp_path / "out")
    parts = PartStore(ws.staging, root=ws.out)
    lock = parts.claim_first("k", 1)
    assert lock is not None and parts.claim_first("k", 1) is None  # held: the caller goes through claim(), which waits
    assert parts.claim_first("k", 2) is None  # older epochs may need fencing: never on the fast road
    lock.release(remove=True)
    again = parts.claim_first("k", 1)
    assert again is not None
    again.release(remove=True)
