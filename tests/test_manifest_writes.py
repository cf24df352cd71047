"""Manifest rows are appended whole or not at all; metrics are 0644."""

from __future__ import annotations

import json
import os
import stat

import pytest

from contentdownload.records import manifest as manifest_mod
from contentdownload.records.manifest import ManifestWriter, iter_rows
from contentdownload.records.metrics import write_metrics


def test_short_writes_are_continued(tmp_path, monkeypatch):
    real = os.write
    monkeypatch.setattr(manifest_mod.os, "write", lambda fd, data: real(fd, data[:7]))
    writer = ManifestWriter(tmp_path / "manifest.jsonl")
    writer.write({"a": "x" * 100})
    writer.write({"b": 2})
    writer.close()
    assert list(iter_rows(tmp_path / "manifest.jsonl")) == [{"a": "x" * 100}, {"b": 2}]


def test_a_failed_write_leaves_no_torn_row(tmp_path, monkeypatch):
    real = os.write
    calls = []

    def failing(fd, data):
        calls.append(len(data))
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return real(fd, data[:5])

    writer = ManifestWriter(tmp_path / "manifest.jsonl")
    writer.write({"first": 1})
    monkeypatch.setattr(manifest_mod.os, "write", failing)
    with pytest.raises(OSError):
        writer.write({"second": 2})
    monkeypatch.undo()
    writer.write({"third": 3})
    writer.close()
    lines = (tmp_path / "manifest.jsonl").read_text().splitlines()
    assert [json.loads(l) for l in lines] == [{"first": 1}, {"third": 3}]


def test_metrics_file_is_world_readable(tmp_path):
    old = os.umask(0o022)
    try:
        write_metrics(tmp_path / "manifest.metrics.json", {"jobs": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "manifest.metrics.json").stat().st_mode) == 0o644


def test_a_row_with_unicode_line_breaks_stays_one_line(tmp_path):
    path = tmp_path / "manifest.jsonl"
    writer = ManifestWriter(path)
    writer.write({"url": "http://h/a\x85b\u2028c\u2029d", "name": "é"})
    writer.close()
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) == 1  # what str.splitlines-based JSONL readers see
    assert json.loads(text)["url"] == "http://h/a\x85b\u2028c\u2029d" and "é" in text
