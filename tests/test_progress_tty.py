"""Live progress on a real terminal: the CLI under tmux while a 200 MB file streams from a throttled loopback server."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

from helpers import cli_env

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")

SIZE = 200 << 20
BYTES_SHOWN = re.compile(r"files, ([0-9.]+ ?[kKMGT]?B) at ")
SUMMARY_BYTES = re.compile(r"jobs, ([0-9.]+ ?[kKMGT]?B) in ")


class Tmux:
    """A private tmux server (its own socket) with one pane of a fixed size."""

    def __init__(self, tmp_path, command: str):
        self.base = ["tmux", "-S", str(tmp_path / "tmux.sock"), "-f", "/dev/null"]
        subprocess.run([*self.base, "new-session", "-d", "-s", "t", "-x", "120", "-y", "20", command],
                       check=True, env=cli_env({"TERM": "xterm-256color"}))
        subprocess.run([*self.base, "set-option", "-t", "t", "remain-on-exit", "on"], check=True)

    def capture(self) -> str:
        """The screen and the lines scrolled off it."""
        return subprocess.run([*self.base, "capture-pane", "-p", "-S", "-", "-t", "t"], capture_output=True, text=True, check=True).stdout

    def dead(self) -> bool:
        out = subprocess.run([*self.base, "display-message", "-p", "-t", "t", "#{pane_dead}"], capture_output=True, text=True)
        return out.stdout.strip() == "1"

    def kill(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True)


def _until(predicate, what: str, limit: float = 60.0):
    """Poll ``predicate`` (a server counter or the screen) until it gives a true value; a hang fails the test."""
    give_up = time.monotonic() + limit
    while time.monotonic() < give_up:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what}")


def _shown(screen: str) -> str | None:
    found = BYTES_SHOWN.findall(screen)
    return found[-1] if found and found[-1] != "0 B" else None


def test_the_bar_moves_with_the_bytes_and_ends_on_the_summarys_totals(server, tmp_path):
    server.throttle(40 << 20)  # about 5 s for the file
    url, _sha = server.add_large_file("/big.bin", SIZE, seed=3)
    out = tmp_path / "out"
    command = shlex.join([sys.executable, "-m", "contentdownload", "run", url, "-P", str(out), "--accept-any-content"])
    tmux = Tmux(tmp_path, f"cd {shlex.quote(str(tmp_path))} && {command}")
    try:
        _until(lambda: server.stats("/big.bin").body_bytes >= SIZE // 5, "a fifth of the file on the wire")
        first_screen = _until(lambda: (lambda s: s if _shown(s) else None)(tmux.capture()), "bytes on the screen")
        first = _shown(first_screen)
        assert "big.bin" in first_screen  # the active large file has a line of its own
        _until(lambda: server.stats("/big.bin").body_bytes >= SIZE * 3 // 5, "three fifths of the file on the wire")
        second = _until(lambda: (lambda v: v if v and v != first else None)(_shown(tmux.capture())), "the count to move")
        assert server.stats("/big.bin").body_bytes < SIZE, "the bar moved while the file was still streaming"
        assert first != second
        _until(tmux.dead, "the run to end")
        final = tmux.capture()
    finally:
        tmux.kill()
    assert (out / "big.bin").stat().st_size == SIZE
    summary = SUMMARY_BYTES.findall(final)
    assert summary, final
    assert _shown(final) == summary[-1], final  # the bar's final total is the summary's
    assert "1/1 files" in final
