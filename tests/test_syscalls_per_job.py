"""The file-system calls a small job costs: the waste is gone, every safety check stays.

Counted in-process: every ``os`` call by path (``stat``, ``lstat``, ``mkdir``, ``unlink``,
``scandir``, ``open``) whose path is inside the output folder, over a run of small files
with one worker. What is left per job, and why each is needed:

- ``lstat`` (about 14): the part and sidecar paths refused as symlinks (2), the resume
  decision's look at the part and its sidecar (2), the staging folder's check when the
  part is opened (2), the old sidecar's (1), the lock file's check that it is the file
  locked (1), the final path's check before the rename (1), the promoted part's sidecar
  (1), the planner's look at the new name (1), the manifest row's path (3);
- ``stat`` (about 3): the resume decision's look at the final path, the manifest row's
  path (2); the store record's size and mtime come from the promotion's ``fstat``;
- ``unlink``: none (the epoch's lock is a byte of one shared lock file, not a file per job);
- one file created: the part (a file's creation is among the dearest calls of a file system);
- no listing of the staging folder, no ``mkdir`` of a folder that exists.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path

import pytest

from contentdownload.jobs.inputs import read_jobs
from contentdownload.jobs.runner import Run, open_job_store
from contentdownload.machinery.flags import FlagLayer
from contentdownload.machinery.runtime import Runtime

JOBS = 30
#: Upper bounds per job (``created``: the part, plus the run's own few files over the 30 jobs); the code before them made 17.2 lstat, 8.4 stat, 3 unlink (2 failing), 1.1 failing mkdir, 1 scandir.
BOUNDS = {"lstat": 14.5, "stat": 3.5, "unlink": 0.0, "unlink_failed": 0.0, "scandir": 0.0, "mkdir_failed": 0.2, "created": 1.15}


def _count(monkeypatch, out: Path) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    inside = str(out)

    def wrap(name: str):
        original = getattr(os, name)

        def counted(path=".", *args, **kwargs):
            mine = isinstance(path, (str, os.PathLike)) and os.fspath(path).startswith(inside)
            counts[name] += mine
            if name == "open" and mine and args and args[0] & os.O_CREAT and not os.path.lexists(path):
                counts["created"] += 1
            try:
                return original(path, *args, **kwargs)
            except OSError:
                counts[name + "_failed"] += mine
                raise

        monkeypatch.setattr(os, name, counted)

    for name in ("stat", "lstat", "mkdir", "unlink", "scandir", "open"):
        wrap(name)
    return counts


def test_a_small_job_makes_no_needless_file_system_call(server, tmp_path, monkeypatch):
    urls = [server.add_file(f"/s/{i:03d}.bin", os.urandom(2000 + i)) for i in range(JOBS)]
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("".join(u + "\n" for u in urls))
    out = tmp_path / "out"
    runtime = Runtime.from_options(config_path=None, cli=FlagLayer(source="cli"), environ={},
                                   run_overrides={"workers": 1, "processes": 1, "progress": False})
    entries = read_jobs(str(jobs))
    counts = _count(monkeypatch, out)
    report = Run(runtime, out, entries, store_factory=open_job_store).execute()
    monkeypatch.undo()
    assert report.exit_code == 0 and report.metrics["outcomes"]["downloaded"] == JOBS
    per_job = {name: round(counts[name] / JOBS, 2) for name in sorted(counts)}
    print(per_job)
    for name, bound in BOUNDS.items():
        assert per_job.get(name, 0) <= bound, (name, per_job)
