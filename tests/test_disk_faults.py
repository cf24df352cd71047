"""A full disk and a folder turned read-only in the middle of a run.

ENOSPC and EROFS are their own job reasons (``disk_full``, ``read_only``): an
infrastructure failure, not a plugin's (no fallback), never retried as a transport
error. The run stops claiming, keeps what is resumable, writes what records it can and
ends with one line; a rerun with room finishes.

The end-to-end tests run the real CLI on a real small filesystem: a tmpfs (a full disk)
or an ext4 image mounted ``errors=remount-ro`` (the kernel turns it read-only on an
error; a tmpfs cannot be remounted read-only while a file on it is open for writing,
and a run always holds its manifest open), each in a private mount namespace.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from contentdownload import hookimpl
from contentdownload.errors import NOT_PLUGIN_FAULTS, DiskError, DiskFullError, DiskIOError, ReadOnlyError
from contentdownload.hooks.model import Job
from contentdownload.records.log import close_logging, configure_logging, get_logger
from contentdownload.testing.conformance import TransferRig

from helpers import cli_env

MB = 1 << 20


# -- the error kind ------------------------------------------------------------------------


class WritesThenRaises:
    """A stream_io that writes ``before`` body bytes to its part, then meets the disk's ``error``."""

    def __init__(self, code: int, before: int):
        self.code, self.before, self.calls = code, before, 0

    @hookimpl
    def stream_io(self, ctx):
        self.calls += 1
        if self.before:
            ctx.paths.part.write_bytes(b"x" * self.before)
            ctx.effects.wrote(self.before)
        raise OSError(self.code, os.strerror(self.code), str(ctx.paths.part))


@pytest.mark.parametrize("before", [0, 4096], ids=["before-writing", "after-writing"])
@pytest.mark.parametrize("code, kind, reason", [(errno.ENOSPC, DiskFullError, "disk_full"), (errno.EDQUOT, DiskFullError, "disk_full"),
                                                (errno.EROFS, ReadOnlyError, "read_only"), (errno.EIO, DiskIOError, "io_error")],
                         ids=["ENOSPC", "EDQUOT", "EROFS", "EIO"])
def test_a_disk_error_in_a_stage_is_no_plugin_fault_and_is_never_retried(tmp_path, server, code, kind, reason, before):
    url = server.add_file("/d.pdf", b"%PDF-1.7\n" + os.urandom(50_000))
    plugin = WritesThenRaises(code, before)
    with TransferRig("disk", tmp_path / "rig", extra_plugins={"disk": plugin}, allow_fallback=True, retries=5) as rig:
        with pytest.raises(kind) as caught:
            rig.run(Job(urls=(url,)), "d.pdf")
    assert caught.value.reason == reason and caught.value.errno == code
    assert isinstance(caught.value, OSError) and issubclass(kind, NOT_PLUGIN_FAULTS)
    assert plugin.calls == 1  # not retried from the resume decision
    assert server.stats("/d.pdf").requests == 0  # legacy was not asked to fetch it instead
    assert not rig.paths("d.pdf").final.exists()


def test_the_reasons_of_disk_errors():
    assert DiskError.of(OSError(errno.ENOSPC, "full")).reason == "disk_full"
    assert DiskError.of(OSError(errno.EROFS, "ro")).reason == "read_only"
    assert DiskError.of(OSError(errno.EIO, "io", "/out/f.part")).filename == "/out/f.part"
    assert str(DiskError.of(OSError(errno.ENOSPC, "No space left on device", "/out/f.part"))) == "disk_full: No space left on device: /out/f.part"
    assert DiskError.of(OSError(errno.ECONNRESET, "reset")) is None
    assert DiskError.of(ValueError("x")) is None
    already = ReadOnlyError(errno.EROFS, "ro")
    assert DiskError.of(already) is already


def test_a_log_file_on_a_full_disk_costs_one_line_and_no_traceback(capfd):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    configure_logging("INFO", Path("/dev/full"), stderr_level="CRITICAL")
    log = get_logger("test.disk")
    for i in range(3):
        log.warning("a line that cannot be written", i=i, pad="x" * 10_000)
    close_logging()  # flushing what is left must not raise either
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Logging error" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "/dev/full" in lines[0] and "No space left" in lines[0], err


# -- a real small filesystem in a private mount namespace ------------------------------------


class PrivateMount:
    """A filesystem mounted at ``path`` in a mount namespace of its own, held open by a waiting process.

    ``run(cmd)`` runs a command inside the namespace; ``view(path)`` is where this process
    sees a path of the namespace (``/proc/PID/root/...``).
    """

    def __init__(self, path: Path, mount_script: str, *args: str):
        self.path = path
        unshare = ["unshare", "-m", "--propagation", "private"] if os.geteuid() == 0 else ["unshare", "-rm"]
        self.enter = ["nsenter", "-t"] + ([] if os.geteuid() == 0 else ["-U", "--preserve-credentials"])
        self.proc = subprocess.Popen([*unshare, "sh", "-c", f'{mount_script} && echo ready && exec sleep 3600', "sh", *args],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()  # blocks until the mount is done (or the shell gave up)
        if line.strip() != "ready":
            err = self.proc.communicate()[1].strip()
            pytest.skip(f"cannot mount a private filesystem here ({' '.join(unshare)}: {err or 'failed'})")

    def nsenter(self, *cmd: str) -> list[str]:
        return [*self.enter, str(self.proc.pid), "-m", "--", *cmd]

    def run(self, *cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.nsenter(*cmd), capture_output=True, text=True, timeout=120)

    def view(self, path: Path | str = "") -> Path:
        return Path(f"/proc/{self.proc.pid}/root{self.path / path}")

    def source(self) -> str:
        """The device mounted at ``path`` in the namespace."""
        for line in Path(f"/proc/{self.proc.pid}/mountinfo").read_text().splitlines():
            fields = line.split()
            if fields[4] == str(self.path):
                return fields[fields.index("-") + 2]
        raise AssertionError(f"{self.path} is not mounted in the namespace")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} to mount a private filesystem")


@pytest.fixture
def tmpfs_30m(tmp_path):
    _need("unshare", "nsenter", "mount")
    out = tmp_path / "out"
    out.mkdir()
    mount = PrivateMount(out, 'mount -t tmpfs -o size=30m tmpfs "$1"', str(out))
    yield mount
    mount.close()


def _corpus(server, n: int, size: int) -> dict[str, bytes]:
    """``n`` documents of ``size`` bytes (they start as PDFs do, which the content check wants)."""
    files = {}
    for i in range(n):
        data = b"%PDF-1.7\n" + os.urandom(size - 9)
        server.add_file(f"/docs/doc{i:02d}.pdf", data, content_type="application/pdf")
        files[f"doc{i:02d}.pdf"] = data
    return files


def _cli(mount: PrivateMount, jobs: Path, *extra: str) -> list[str]:
    return mount.nsenter(sys.executable, "-m", "contentdownload", "run", str(jobs), "--out", str(mount.path), "--no-progress",
                         "--workers", "4", *extra)


def _rows(out: Path) -> list[dict]:
    path = out / "manifest.jsonl"
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    assert not text or text.endswith("\n"), "a torn last row"
    return [json.loads(line) for line in text.splitlines()]  # every line is JSON


def _finals_are_whole(out: Path, files: dict[str, bytes]) -> int:
    """Every file at a final path is the server's, byte for byte; how many there are."""
    present = 0
    for name, data in files.items():
        final = out / name
        if final.exists():
            assert hashlib.sha256(final.read_bytes()).digest() == hashlib.sha256(data).digest(), f"{name} is not whole"
            present += 1
    return present


def _one_line(stderr: str, reason: str) -> str:
    assert "Traceback" not in stderr and "Logging error" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith(f"contentdownload: {reason}:")]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.slow
def test_a_full_disk_stops_the_run_cleanly_and_a_rerun_with_room_finishes(server, tmp_path, tmpfs_30m):
    files = _corpus(server, 20, 2 * MB)  # 40 MB of jobs into 30 MB
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("".join(server.url(f"/docs/{name}") + "\n" for name in files))
    out = tmpfs_30m.view()

    first = subprocess.run(_cli(tmpfs_30m, jobs), capture_output=True, text=True, env=cli_env(), cwd=tmp_path, timeout=300)
    assert first.returncode == 1, first.stderr
    line = _one_line(first.stderr, "disk_full")
    assert str(tmpfs_30m.path) in line and "of 20 planned jobs left" in line and "free space" in line, line
    done = _finals_are_whole(out, files)
    assert 0 < done < 20
    rows = _rows(out)
    assert {r["reason"] for r in rows if r["outcome"] == "failed"} <= {"disk_full"}, rows
    assert all(server.stats(f"/docs/{name}").requests <= 1 for name in files)  # nothing retried
    metrics = out / "manifest.metrics.json"
    if metrics.exists():  # written when there was room for it
        assert json.loads(metrics.read_text())["jobs_planned"] == 20
    else:
        assert "manifest.metrics.json" in first.stderr

    grow = tmpfs_30m.run("mount", "-o", "remount,size=80m", str(tmpfs_30m.path))
    assert grow.returncode == 0, grow.stderr
    with (out / "manifest.jsonl").open("ab") as fh:  # as a crash in the middle of a row would leave it
        fh.write(b'{"job_key": "torn", "outcome": "downl')
    second = subprocess.run(_cli(tmpfs_30m, jobs), capture_output=True, text=True, env=cli_env(), cwd=tmp_path, timeout=300)
    assert second.returncode == 0, second.stderr + second.stdout
    assert "Traceback" not in second.stderr
    assert _finals_are_whole(out, files) == 20
    rows = _rows(out)
    assert {r["job_key"] for r in rows if r["outcome"] in ("downloaded", "resumed")} == {r["job_key"] for r in rows}
    assert len({r["job_key"] for r in rows}) == 20
    assert json.loads((out / "manifest.metrics.json").read_text())["jobs_left"] == 0
    assert max(server.stats(f"/docs/{name}").full_bodies for name in files) <= 2


@pytest.fixture
def ext4_image(tmp_path):
    _need("unshare", "nsenter", "mount", "mkfs.ext4")
    image = tmp_path / "disk.img"
    with image.open("wb") as fh:
        fh.truncate(64 * MB)
    made = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"mkfs.ext4 failed: {made.stderr.strip()}")
    out = tmp_path / "out"
    out.mkdir()
    mount = PrivateMount(out, 'mount -o loop,errors=remount-ro "$1" "$2"', str(image), str(out))
    yield mount
    mount.close()


def _turn_read_only(mount: PrivateMount) -> None:
    """An error reported to ext4 mounted ``errors=remount-ro``: the kernel turns the filesystem read-only."""
    device = Path(mount.source()).name
    trigger = Path(f"/sys/fs/ext4/{device}/trigger_fs_error")
    if not trigger.exists():
        pytest.skip(f"{trigger} is not available: the kernel cannot be asked for an ext4 error")
    trigger.write_text("turning read-only in the middle of a run (test)")


@pytest.mark.slow
def test_a_folder_turned_read_only_in_the_middle_of_a_run(server, tmp_path, ext4_image):
    files = _corpus(server, 20, 1 * MB)
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("".join(server.url(f"/docs/{name}") + "\n" for name in files))
    out = ext4_image.view()

    def served(n: int) -> bool:
        return sum(server.stats(f"/docs/{name}").full_bodies for name in files) >= n

    proc = subprocess.Popen(_cli(ext4_image, jobs, "--workers", "2"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=cli_env(), cwd=tmp_path)
    try:
        assert server.wait_until(lambda: served(5) or proc.poll() is not None, timeout=120)
        assert proc.poll() is None, "the run ended before the folder turned read-only"
        _turn_read_only(ext4_image)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, stderr
    line = _one_line(stderr, "read_only")
    assert str(ext4_image.path) in line and "of 20 planned jobs left" in line, line
    assert {line.split(":")[1].strip() for line in stdout.splitlines() if line.strip().startswith("failed:")} <= {"read_only"}, stdout
    assert 0 < _finals_are_whole(out, files) < 20
    rows = _rows(out)
    assert {r["reason"] for r in rows if r["outcome"] == "failed"} <= {"read_only"}, rows
    assert all(server.stats(f"/docs/{name}").requests <= 1 for name in files)  # nothing retried


@pytest.mark.slow
@pytest.mark.parametrize("schema", ["1", "0"], ids=["store", "no-store"])
def test_a_disk_full_from_the_start_is_one_line(server, tmp_path, tmpfs_30m, schema):
    files = _corpus(server, 2, 100_000)
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("".join(server.url(f"/docs/{name}") + "\n" for name in files))
    fill = tmpfs_30m.run("sh", "-c", f'cat /dev/zero > "{tmpfs_30m.path}/filler"')
    assert fill.returncode != 0 and "No space left" in fill.stderr, fill.stderr
    env = cli_env({"DOCSTOKG_ENABLE_STREAMING_SCHEMA": schema})
    run = subprocess.run(_cli(tmpfs_30m, jobs), capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr and "unexpected" not in run.stderr, run.stderr
    assert [line for line in run.stderr.splitlines() if line.startswith("contentdownload: disk_full: ")], run.stderr
    assert _finals_are_whole(tmpfs_30m.view(), files) == 0


class FailsOnce:
    """A stream_io meeting a full disk on its first call, then the streaming plugin's transfer."""

    def __init__(self):
        self.calls = 0

    @hookimpl
    def stream_io(self, ctx):
        from contentdownload_streaming.stream import stream_io

        self.calls += 1
        if self.calls == 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(ctx.paths.part))
        return stream_io(ctx)


def test_the_library_raises_the_disk_error_and_gives_the_job_back(server, tmp_path):
    from contentdownload import Downloader
    from contentdownload.store import JobState, open_store

    data = b"%PDF-1.7\n" + os.urandom(70_000)
    url = server.add_file("/lib/a.pdf", data)
    plugin = FailsOnce()
    with Downloader(environ={}, pins={"stream_io": "disk"}, plugins={"disk": plugin}, lease_ttl=600) as dl:
        with pytest.raises(DiskFullError):
            dl.download(url, tmp_path / "out")
        store = open_store(f"sqlite:///{tmp_path / 'out' / '.contentdownload' / 'jobs.db'}")
        try:
            [job] = list(store.records())
        finally:
            store.close()
        assert job.state == JobState.PLANNED  # given back: the next call takes it at once, not after the lease
        result = dl.download(url, tmp_path / "out")
    assert result.outcome == "downloaded" and (tmp_path / "out" / "a.pdf").read_bytes() == data
    assert plugin.calls == 2


def test_closing_the_logs_gives_the_logger_back_to_the_host(tmp_path, caplog):
    """A run (or a ``Downloader``) configures the package's logger; once closed, the host's handlers see its records again."""
    configure_logging("INFO", tmp_path / "download.log", stderr_level="CRITICAL")
    close_logging()
    caplog.set_level("WARNING", logger="contentdownload.store")
    get_logger("contentdownload.store").warning("store unavailable")
    assert any("store unavailable" in r.getMessage() for r in caplog.records)
