"""File naming (hostile names stay inside the output folder) and job-list parsing."""

from __future__ import annotations

import io
import json

import pytest

from contentdownload.errors import UsageError
from contentdownload.jobs.inputs import BadLine, parse_lines, read_jobs
from contentdownload.hooks.model import Job
from contentdownload.jobs.naming import MAX_NAME_BYTES, base_name, plan_names, sanitize_name
from contentdownload.jobs.workspace import Workspace

HOSTILE = [
    "../../etc/passwd",
    "..",
    ".",
    "/etc/shadow",
    "C:\\Windows\\system32\\evil.dll",
    "a\x00b.pdf",
    "tab\there\nnewline\r.pdf",
    "\x1b[31mred.pdf",
    "CON",
    "nul.txt",
    ".contentdownload",
    "manifest.jsonl",
    "logs",
    "x" * 5000 + ".pdf",
    "\u00e9" * 3000,
    "   ",
    "name.",
]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_stay_one_safe_component(name, tmp_path):
    safe = sanitize_name(name)
    assert "/" not in safe and "\\" not in safe and "\x00" not in safe
    assert all(ord(c) >= 0x20 for c in safe)
    assert safe not in (".", "..") and not safe.startswith(".")
    assert len(safe.encode()) <= MAX_NAME_BYTES
    job = Job(urls=("http://h.example/x",), filename=name)
    final = Workspace.open(tmp_path / "out").final_path(base_name(job, "f" * 64))
    assert final.parent == (tmp_path / "out").resolve()
    assert final.name not in ("manifest.jsonl", "logs", ".contentdownload")


def test_windows_reserved_names_are_prefixed():
    assert sanitize_name("CON") == "_CON"
    assert sanitize_name("lpt1.txt") == "_lpt1.txt"


def test_name_from_url_then_key():
    assert base_name(Job(urls=("http://h/dir/paper%20one.pdf?x=1",)), "a" * 64) == "paper one.pdf"
    assert base_name(Job(urls=("http://h/",)), "b" * 64) == "download-bbbbbbbbbbbbbbbb"
    assert base_name(Job(urls=("http://h/x.pdf",), filename="../../y.pdf"), "c" * 64).endswith("y.pdf")


def test_collisions_get_deterministic_suffixes_and_same_job_same_name():
    jobs = [(Job(urls=("http://a/x.pdf",)), "1" * 64), (Job(urls=("http://b/x.pdf",)), "2" * 64), (Job(urls=("http://c/X.PDF",)), "3" * 64)]
    first = plan_names(jobs)
    assert first == ["x.pdf", "x-22222222.pdf", "X-33333333.PDF"]
    assert plan_names(jobs) == first
    assert len({n.casefold() for n in first}) == 3
    # An earlier run's name stays with its job even when a new job comes first in the list.
    recorded = {"2" * 64: "x-22222222.pdf", "1" * 64: "x.pdf"}
    again = plan_names([(Job(urls=("http://d/x.pdf",)), "4" * 64), *jobs[:2]], recorded)
    assert again[1:] == ["x.pdf", "x-22222222.pdf"] and again[0] == "x-44444444.pdf"


def test_workspace_refuses_escapes(tmp_path):
    ws = Workspace.open(tmp_path / "out")
    for bad in ("../x", "/etc/passwd", ".contentdownload/jobs.db"):
        with pytest.raises(UsageError):
            ws.final_path(bad)


def test_text_list_with_comments_and_bad_lines():
    text = "# papers\nhttp://a.example/1.pdf\n\nftp://b.example/2.pdf\n  https://c.example/3  \nnot a url\n"
    items = list(parse_lines(io.StringIO(text)))
    assert [type(i) for i in items] == [Job, BadLine, Job, BadLine]
    assert items[0].line == 2 and items[2].url == "https://c.example/3"
    assert items[1].line == 4 and "ftp" in items[1].reason
    assert items[3].line == 6


def test_jsonl_jobs_and_bad_lines():
    lines = [
        {"url": "http://a/1.pdf", "work_id": "W1", "sha256": "A" * 64, "size": 10, "filename": "one.pdf"},
        {"urls": ["http://a/2.pdf", "http://mirror/2.pdf"], "artifact_id": 7},
        {"work_id": "no url"},
        {"url": "http://a/3", "sha256": "xyz"},
        {"url": "http://a/4", "size": -1},
    ]
    text = "\n".join(json.dumps(l) for l in lines) + "\n{not json\n"
    items = list(parse_lines(io.StringIO(text)))
    assert isinstance(items[0], Job) and items[0].sha256 == "a" * 64 and items[0].size == 10
    assert items[1].urls == ("http://a/2.pdf", "http://mirror/2.pdf") and items[1].artifact_id == "7"
    assert [i.line for i in items if isinstance(i, BadLine)] == [3, 4, 5, 6]
    assert "no url" in items[2].reason and "sha256" in items[3].reason and "not JSON" in items[5].reason


def test_unreadable_inputs_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        read_jobs(str(tmp_path / "missing.txt"))
    with pytest.raises(UsageError, match="folder"):
        read_jobs(str(tmp_path))
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00garbage\nhttp://x/2\n")
    bad, job = read_jobs(str(binary))  # a line that is not UTF-8 is that line's problem, not the list's
    assert isinstance(bad, BadLine) and bad.line == 1 and "UTF-8" in bad.reason and job.url == "http://x/2"
    assert [j.url for j in read_jobs("-", io.StringIO("http://x/1\n"))] == ["http://x/1"]
