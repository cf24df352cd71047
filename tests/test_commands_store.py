"""`jobs`, `jobs requeue --failed`, `gc` and `compare` on real output folders."""

from __future__ import annotations

import json

import pytest

from helpers import run_cli

pytestmark = pytest.mark.slow


def test_jobs_requeue_and_gc(server, tmp_path):
    server.add_file("/ok.bin", b"ok" * 500)
    server.add_status("/gone.bin", 404)
    jobs = tmp_path / "urls.txt"
    jobs.write_text(server.url("/ok.bin") + "\n" + server.url("/gone.bin") + "\n")
    out = tmp_path / "out"
    assert run_cli("run", str(jobs), "--out", str(out), "--no-progress", cwd=tmp_path).returncode == 1

    stats = json.loads(run_cli("jobs", "--out", str(out), "--json", cwd=tmp_path).stdout)
    assert stats["by_state"]["finalized"] == 1 and stats["by_state"]["failed"] == 1
    assert stats["failures_by_reason"] == {"http_404": 1}

    # A permanent failure is not retried by a plain rerun, and is after requeue.
    server.reset_stats()
    assert run_cli("run", str(jobs), "--out", str(out), "--no-progress", cwd=tmp_path).returncode == 1
    assert server.stats("/gone.bin").requests == 0
    proc = run_cli("jobs", "requeue", "--failed", "--out", str(out), "--json", cwd=tmp_path)
    assert json.loads(proc.stdout) == {"requeued": 1}
    server.add_file("/gone.bin", b"back again")
    assert run_cli("run", str(jobs), "--out", str(out), "--no-progress", cwd=tmp_path).returncode == 0
    assert (out / "gone.bin").read_bytes() == b"back again"

    # gc removes staging files no live job owns, and keeps the rest of the folder.
    staging = out / ".contentdownload" / "staging"
    orphan = staging / ("f" * 64 + ".3.part")
    orphan.write_bytes(b"x" * 1000)
    old = orphan.stat().st_mtime - 3600
    import os

    os.utime(orphan, (old, old))
    dry = json.loads(run_cli("gc", "--out", str(out), "--dry-run", "--json", cwd=tmp_path).stdout)
    assert dry["removed"] == [str(orphan)] and orphan.exists()
    done = json.loads(run_cli("gc", "--out", str(out), "--json", cwd=tmp_path).stdout)
    assert done["bytes"] == 1000 and not orphan.exists()
    assert (out / "ok.bin").exists() and (out / "gone.bin").exists()


def test_jobs_without_a_store_is_a_usage_error(tmp_path):
    proc = run_cli("jobs", "--out", str(tmp_path / "nothing"), cwd=tmp_path)
    assert proc.returncode == 2 and "no job store" in proc.stderr


def test_compare_gates_a_rollout(server, tmp_path):
    for i in range(5):
        server.add_file(f"/c/{i}.bin", bytes([i]) * 5000)
    jobs = tmp_path / "urls.txt"
    jobs.write_text("".join(server.url(f"/c/{i}.bin") + "\n" for i in range(5)))
    legacy, streaming = tmp_path / "legacy", tmp_path / "streaming"
    for out, env in ((legacy, {"DOCSTOKG_ENABLE_STREAMING": "0"}), (streaming, {})):
        assert run_cli("run", str(jobs), "--out", str(out), "--no-progress", env=env, cwd=tmp_path).returncode == 0
        assert run_cli("run", str(jobs), "--out", str(out), "--no-progress", "--revalidate", env=env, cwd=tmp_path).returncode == 0
    proc = run_cli("compare", str(legacy), str(streaming), "--json", cwd=tmp_path)
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["passed"], report["criteria"]
    assert report["metrics"]["cache_hit_rate"]["b"] == 1.0
    # A candidate with a checksum mismatch fails the gate.
    metrics = json.loads((streaming / "manifest.metrics.json").read_text())
    metrics["sha256_mismatches"] = 1
    (streaming / "manifest.metrics.json").write_text(json.dumps(metrics))
    assert run_cli("compare", str(legacy), str(streaming), cwd=tmp_path).returncode == 1
