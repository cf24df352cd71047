"""Progress without a terminal: plain periodic lines whose byte count is the summary's."""

from __future__ import annotations

import io
import re

from contentdownload.cli import progress as progress_module
from contentdownload.hooks.model import Job
from contentdownload.jobs.runner import Run
from contentdownload.machinery.flags import FlagLayer
from contentdownload.machinery.runtime import Runtime
from contentdownload.testing.server import Fault


def test_plain_lines_follow_the_bytes_and_end_on_the_summarys_count(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(progress_module, "PLAIN_INTERVAL_S", 0.5)
    server.throttle(2 << 20)  # files stream for over a second: several lines while the bytes move
    urls = [server.add_large_file(f"/f{i}.bin", 3 << 20, seed=i)[0] for i in range(2)]
    server.add_fault("/f0.bin", Fault.cut_after(1 << 20))  # the bytes of a cut attempt count in both
    runtime = Runtime.from_options(config_path=None, cli=FlagLayer(source="cli"), environ={},
                                   run_overrides={"accept_any_content": True, "workers": 2})
    run = Run(runtime, tmp_path / "out", [Job(urls=(u,)) for u in urls], show_progress=True)
    report = run.execute()
    assert report.exit_code == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("progress: ")]
    assert len(lines) >= 2, lines
    shown = [_bytes(re.search(r"files, ([0-9.]+) ?([kMG]?)B at", line)) for line in lines]
    assert shown == sorted(shown) and len(set(shown)) >= 2, "the lines follow the bytes while files stream"
    assert run._progress.nbytes == report.metrics["bytes_downloaded"] >= 6 << 20
    assert run._progress.files == 2 and run._progress.failed == 0


def _bytes(match: re.Match) -> float:
    """The byte count of a ``1.50MB``-style match (powers of 1000, as the progress writes them)."""
    return float(match.group(1)) * 1000 ** " kMG".index(match.group(2) or " ")


def test_eta_counts_the_active_remainders_and_the_files_not_started():
    progress = progress_module.Progress(total=3, enabled=False, stream=io.StringIO())
    sink = progress.job("k1", "a.bin")
    sink.expect(1000, 0)
    sink(400)
    assert progress._eta(100.0) == (600 + 2 * 1000) / 100.0  # two files to go, at the mean known size
    progress.close()


def test_byte_counts_are_written_as_tqdm_writes_them():
    from tqdm import tqdm

    values = [0, 1, 9.994, 9.995, 99.94, 99.95, 999, 999.4, 999.5, 1000, 12_345, 999_499, 999_500,
              1 << 20, 5 * 10**9, 10**15, 10**18, 10**21, 10**24, 10**27]
    assert [progress_module.human_bytes(v) for v in values] == [tqdm.format_sizeof(v, "B", 1000) for v in values]
