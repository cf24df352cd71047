"""`contentdownload demo`: the main job, offline, as the README shows it."""

from __future__ import annotations

import json

import pytest

from helpers import run_cli

pytestmark = pytest.mark.slow


def test_demo_runs_offline_and_reports(tmp_path):
    proc = run_cli("demo", "--out", str(tmp_path / "demo-out"), "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["passed"] is True
    assert report["first_run"]["resumed_files"] and report["first_run"]["resumed_files"][0]["resumed_from"] > 0
    assert report["revalidation_run"]["status_codes"] == [304]
    assert report["revalidation_run"]["body_bytes_sent"] == 0
    assert report["first_run"]["plugins"]["stream_io"] == ["streaming"]
    assert (tmp_path / "demo-out" / "manifest.jsonl").is_file()
    assert (tmp_path / "demo-out" / ".contentdownload" / "jobs.db").is_file()
    # Running it again starts from a clean demo folder and passes again.
    assert run_cli("demo", "--out", str(tmp_path / "demo-out"), cwd=tmp_path).returncode == 0


def test_demo_refuses_a_folder_that_is_not_its_own(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.pdf").write_text("precious")
    proc = run_cli("demo", "--out", str(tmp_path / "mine"), cwd=tmp_path)
    assert proc.returncode == 2 and "not a demo folder" in proc.stderr
    assert (tmp_path / "mine" / "thesis.pdf").read_text() == "precious"
