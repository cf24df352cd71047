"""Records that stay true: the manifest's last row of a job describes the file on disk,
a finished file is found whichever plugin keys its job, and a job's name does not
depend on which mirror answered. The real CLI in subprocesses, the loopback server."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from helpers import run_cli

pytestmark = pytest.mark.slow


def _rows(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "manifest.jsonl").read_text().splitlines() if l.strip()]


def _last_row(out: Path, name: str) -> dict:
    return [r for r in _rows(out) if r.get("path") and Path(r["path"]).name == name][-1]


def _jobs(path: Path, urls: list) -> Path:
    path.write_text("".join(json.dumps({"url": u} if isinstance(u, str) else {"urls": u}) + "\n" for u in urls))
    return path


def _run(jobs: Path, out: Path, *args: str, env: dict | None = None) -> None:
    proc = run_cli("run", str(jobs), "--out", str(out), "--no-progress", *args, env=env, cwd=jobs.parent)
    assert proc.returncode == 0, proc.stderr


def test_revalidate_that_gets_new_content_writes_a_row_with_the_new_sha(server, tmp_path):
    server.add_file("/r/a.bin", b"first version " * 500)
    jobs, out = _jobs(tmp_path / "jobs.jsonl", [server.url("/r/a.bin")]), tmp_path / "out"
    _run(jobs, out)
    new = b"second version, longer " * 700
    server.set_content("/r/a.bin", new)
    _run(jobs, out, "--revalidate")
    assert (out / "a.bin").read_bytes() == new
    assert _last_row(out, "a.bin")["sha256"] == hashlib.sha256(new).hexdigest()
    _run(jobs, out)  # a plain rerun adds nothing
    assert [r["outcome"] for r in _rows(out)] == ["downloaded", "downloaded"]


def test_a_deleted_file_fetched_again_gets_its_row(server, tmp_path):
    server.add_file("/d/b.bin", b"old bytes " * 300)
    jobs, out = _jobs(tmp_path / "jobs.jsonl", [server.url("/d/b.bin")]), tmp_path / "out"
    _run(jobs, out)
    (out / "b.bin").unlink()
    new = b"new bytes " * 400
    server.set_content("/d/b.bin", new)
    _run(jobs, out)
    assert _last_row(out, "b.bin")["sha256"] == hashlib.sha256(new).hexdigest()
    assert len(_rows(out)) == 2


ROLLOUT = [
    (("--streaming-ratio", "0.5"), None),
    (("--streaming-ratio", "1.0"), None),
    (("--disable-streaming-integration",), None),
    ((), {"DOCSTOKG_ENABLE_IDEMPOTENCY": "0"}),
    (("--streaming-ratio", "0"), None),
]


def test_a_canary_ramp_and_rollbacks_fetch_nothing_twice(server, tmp_path):
    paths = [f"/c/c{i:02d}.bin" for i in range(20)]
    for i, p in enumerate(paths):
        server.add_file(p, bytes([i]) * (2_000 + i))
    jobs, out = _jobs(tmp_path / "jobs.jsonl", [server.url(p) for p in paths]), tmp_path / "out"
    _run(jobs, out, "--streaming-ratio", "0")
    assert len(_rows(out)) == 20
    for args, env in ROLLOUT:
        server.reset_stats()
        _run(jobs, out, *args, env=env)
        assert sum(server.stats(p).body_bytes for p in paths) == 0, args or env
        successes = [r for r in _rows(out) if r["outcome"] != "skipped"]
        assert len(successes) == 20, (args or env, len(successes))
    assert sorted(p.name for p in out.iterdir() if p.is_file() and p.suffix == ".bin") == sorted(Path(p).name for p in paths)


@pytest.mark.parametrize("flags", [(), ("--disable-streaming-integration",)], ids=["streaming", "legacy"])
def test_a_job_served_by_its_mirror_is_named_after_its_first_url(server, tmp_path, flags):
    server.add_status("/m/wanted-name.pdf", 404)
    server.add_file("/mirror/other-name.pdf", b"%PDF-1.4 mirrored " * 100)
    jobs = _jobs(tmp_path / "jobs.jsonl", [[server.url("/m/wanted-name.pdf"), server.url("/mirror/other-name.pdf")]])
    out = tmp_path / "out"
    _run(jobs, out, *flags)
    assert server.stats("/m/wanted-name.pdf").statuses == [404]
    assert (out / "wanted-name.pdf").read_bytes() == b"%PDF-1.4 mirrored " * 100
    assert not (out / "other-name.pdf").exists()
    assert Path(_last_row(out, "wanted-name.pdf")["path"]).name == "wanted-name.pdf"


def _metrics(out: Path) -> dict:
    return json.loads((out / "manifest.metrics.json").read_text())


def _small_folder(server, tmp_path, name: str = "m") -> tuple[Path, Path]:
    for i in range(4):
        server.add_file(f"/{name}/{i}.bin", bytes([i]) * 3000)
    return _jobs(tmp_path / f"{name}.jsonl", [server.url(f"/{name}/{i}.bin") for i in range(4)]), tmp_path / name


def test_compare_of_a_revalidate_only_run_reports_what_was_not_measured(server, tmp_path):
    jobs, full = _small_folder(server, tmp_path, "full")
    _run(jobs, full)
    reval = tmp_path / "reval"
    _run(jobs, reval)
    _run(jobs, reval, "--revalidate")
    proc = run_cli("compare", str(full), str(reval), cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout
    assert "not measured" in proc.stdout
    assert run_cli("compare", str(full), str(reval), "--allow-unmeasured", cwd=tmp_path).returncode == 0


def test_metrics_hold_the_last_run_and_the_folder_totals(server, tmp_path):
    jobs, out = _small_folder(server, tmp_path)
    _run(jobs, out)
    _run(jobs, out, "--revalidate")
    metrics = _metrics(out)
    assert metrics["scope"] == "last run" and metrics["outcomes"]["not_modified"] == 4
    folder = metrics["folder_totals"]
    assert folder["scope"] == "all runs in this folder" and folder["runs"] == 2
    assert folder["outcomes"]["downloaded"] == 4 and folder["outcomes"]["not_modified"] == 4
    assert folder["bytes_downloaded"] == 4 * 3000


def test_counters_are_named_after_the_plugin_and_ignore_the_log_level(server, tmp_path):
    jobs, out = _small_folder(server, tmp_path, "lg")
    _run(jobs, out, "--disable-streaming-integration")
    legacy = _metrics(out)
    assert "streaming.resume_decisions_made" not in legacy
    assert legacy["legacy.resume_decisions_made"] == 4
    streaming = tmp_path / "st"
    _run(jobs, streaming)
    _run(jobs, streaming, "--revalidate", "--log-level", "WARNING")
    metrics = _metrics(streaming)
    assert metrics["streaming.resume_decisions_made"] == 4
    assert metrics["decision_log_share"] == 1.0
