"""Hostile job lists and output folders: the real CLI never prints a traceback, every bad line is a row."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from contentdownload.jobs.inputs import MAX_LINE, BadLine, parse_lines
from contentdownload.testing.server import Fault
from helpers import REPO, run_cli

pytestmark = pytest.mark.slow


def _rows(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "manifest.jsonl").read_text().splitlines() if l.strip()]


def _no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr


def test_bom_and_crlf_are_accepted():
    items = list(parse_lines(io.BytesIO("\ufeffhttp://h/a\r\nhttp://h/b\r\n".encode())))
    assert [i.url for i in items] == ["http://h/a", "http://h/b"]
    jsonl = list(parse_lines(io.BytesIO('\ufeff{"url": "http://h/a"}\r\n'.encode())))
    assert [i.url for i in jsonl] == ["http://h/a"]


class _Counting(io.RawIOBase):
    """A stream of one endless line that records the largest read asked of it."""

    def __init__(self, length: int):
        self.left, self.largest = length, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        self.largest = max(self.largest, len(buffer))
        buffer[:n] = b"a" * n
        self.left -= n
        return n


def test_a_long_line_is_a_bad_line_read_in_bounded_chunks():
    raw = _Counting(50 * MAX_LINE)
    items = list(parse_lines(io.BufferedReader(raw, buffer_size=8192)))
    assert items == [BadLine(1, "line longer than 64 KiB", "")]
    assert raw.largest <= 2 * MAX_LINE


@pytest.mark.parametrize("line", [
    "http://[::1/x",
    '{"url": ' + "[" * 30_000 + "}",
    '{"urls": [1, 2]}',
    '{"url": "http://h/a", "size": "big"}',
    "\udcff",
])
def test_each_malformed_line_is_a_bad_line_with_its_number(line):
    data = ('{"url": "http://h/ok"}\n' if line.startswith("{") else "http://h/ok\n") + line + "\n"
    items = list(parse_lines(io.BytesIO(data.encode("utf-8", "surrogateescape"))))
    assert isinstance(items[1], BadLine) and items[1].line == 2


def test_manifest_or_logs_being_a_folder_is_exit_2(tmp_path, server):
    server.add_file("/a.bin", b"x")
    jobs = tmp_path / "jobs.txt"
    jobs.write_text(server.url("/a.bin") + "\n")
    for name in ("manifest.jsonl", "logs/download.log", "manifest.metrics.json"):
        out = tmp_path / name.replace("/", "_")
        (out / name).mkdir(parents=True)
        proc = run_cli("run", str(jobs), "--out", str(out), "--no-progress")
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        _no_traceback(proc)


def test_broken_pipe_exits_quietly():
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'core'}:{REPO / 'plugins'}"}
    proc = subprocess.run(
        f"{sys.executable} -m contentdownload plugins list | head -1", shell=True, env=env,
        capture_output=True, text=True, timeout=120,
    )
    assert proc.stdout.startswith("NAME") and proc.stderr == ""


def _read_only_mount_command(folder: Path, command: list[str]) -> list[str] | None:
    """``command`` run with ``folder`` bind-mounted read-only in a private mount namespace, or ``None`` where impossible."""
    if shutil.which("unshare") is None:
        return None
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        return None
    script = 'mount --make-rprivate / && mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" && shift && exec "$@"'
    return ["unshare", "-m", "sh", "-c", script, "sh", str(folder), *command]


def test_read_only_output_folder_is_exit_2(tmp_path):
    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    (out / ".contentdownload" / "staging").mkdir(parents=True)
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("http://127.0.0.1:9/a\n")
    command = _read_only_mount_command(out, [sys.executable, "-m", "contentdownload", "run", str(jobs), "--out", str(out), "--no-progress"])
    if command is None:
        pytest.skip("cannot mount a read-only folder here (no unshare or no mount namespace)")
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'core'}:{REPO / 'plugins'}"}
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not writable (read-only)" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    _no_traceback(proc)


@pytest.mark.parametrize("name", ["logs", "manifest.jsonl", "manifest.metrics.json"])
def test_planted_symlink_is_refused_and_nothing_lands_outside(tmp_path, server, name):
    server.add_file("/a.bin", b"payload")
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    target = sentinel if name == "logs" else sentinel / name
    (out / name).symlink_to(target)
    jobs = tmp_path / "jobs.txt"
    jobs.write_text(server.url("/a.bin") + "\n")
    proc = run_cli("run", str(jobs), "--out", str(out), "--no-progress")
    assert proc.returncode == 2 and "symbolic link" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    _no_traceback(proc)
    assert list(sentinel.iterdir()) == []


def test_second_process_without_store_is_refused(tmp_path, server):
    server.add_file("/slow.bin", b"s" * 10_000)
    server.add_fault("/slow.bin", Fault.stall(60, after=10))
    jobs = tmp_path / "jobs.txt"
    jobs.write_text(server.url("/slow.bin") + "\n")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCSTOKG_", "CONTENTDOWNLOAD_"))}
    env.update(DOCSTOKG_ENABLE_STREAMING_SCHEMA="0", PYTHONPATH=f"{REPO / 'core'}:{REPO / 'plugins'}")
    first = subprocess.Popen([sys.executable, "-m", "contentdownload", "run", str(jobs), "--out", str(out), "--no-progress"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):  # until the first process is blocked inside its transfer
            if any(r.path == "/slow.bin" for r in server.requests):
                break
            time.sleep(0.05)
        else:
            pytest.fail("the first process never asked for the file")
        second = run_cli("run", str(jobs), "--out", str(out), "--no-progress", env={"DOCSTOKG_ENABLE_STREAMING_SCHEMA": "0"})
    finally:
        first.terminate()
        first.wait(timeout=60)
    assert second.returncode == 2 and f"pid {first.pid}" in second.stderr
    _no_traceback(second)


_LINES = st.one_of(
    st.binary(max_size=80).map(lambda b: b.replace(b"\n", b" ")),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                 lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(["url", "urls", "size", "sha256", "filename"]), c, max_size=3),
                 max_leaves=8).map(lambda v: json.dumps(v).encode()),
    st.builds(lambda s, h, p, q: f"{s}://{h}{p}/{q}".encode("utf-8", "surrogatepass"),
              st.sampled_from(["http", "https", "ftp", "", "HTTP"]),
              st.sampled_from(["[::1", "127.0.0.1:0", "h:99999", "a:b@", "xn--", "", "%zz"]),
              st.text(max_size=8), st.text(max_size=8)),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_LINES, min_size=1, max_size=5))
def test_fuzzed_job_lists_never_crash_the_cli(tmp_path_factory, lines):
    folder = tmp_path_factory.mktemp("fuzz")
    jobs = folder / "jobs.txt"
    jobs.write_bytes(b"\n".join(lines) + b"\n")
    proc = run_cli("run", str(jobs), "--out", str(folder / "out"), "--no-progress", "--retries", "0",
                   "--connect-timeout", "1", "--timeout", "1", env={"NO_PROXY": "*"})
    _no_traceback(proc)
    assert proc.returncode in (0, 1, 2), proc.stderr
    if proc.returncode != 2:
        rows = {r["line"] for r in _rows(folder / "out") if r["outcome"] == "failed" and "bad_input" in (r["reason"] or "")}
        bad = {i.line for i in parse_lines(io.BytesIO(jobs.read_bytes())) if isinstance(i, BadLine)}
        assert bad <= rows


def test_an_unexpected_error_is_one_line_and_exit_2(monkeypatch, capsys):
    from contentdownload.cli import parser as cli

    def explode(args):
        raise RuntimeError("http://alice:pw0rd@h/x went wrong")

    monkeypatch.setattr(cli, "cmd_status", explode)
    assert cli.main(["status"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "RuntimeError" in err and "pw0rd" not in err and "Traceback" not in err
