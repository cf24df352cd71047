"""Job lists: a text file of URLs, a JSONL file of jobs, or ``-`` for stdin.

A text list has one URL a line; blank lines and ``#`` comments are skipped. A JSONL
list has one object a line with ``url`` or ``urls`` (ordered candidates), and optional
``work_id``, ``artifact_id``, ``filename``, ``sha256``, ``size``, ``expected_type``. The format is JSONL
when the first entry starts with ``{``.

A bad line (not JSON, no URL, an unsupported scheme, a malformed field) becomes a
:class:`BadLine` that the runner records as a ``failed`` job; the other lines go on.
An input that cannot be read at all is a :class:`UsageError`.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Iterator, TextIO

import attrs

from contentdownload.errors import UsageError
from contentdownload.hooks.model import Job
from contentdownload.transfer.urls import canonical_url

_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")


@attrs.frozen
class BadLine:
    """An input line that is not a usable job: ``line`` number, ``reason`` and the ``text`` (shortened)."""

    line: int
    reason: str
    text: str


def _job_from_object(obj: object, line: int) -> Job:
    if not isinstance(obj, dict):
        raise ValueError("a JSONL line must be an object")
    urls = obj.get("urls", obj.get("url"))
    if isinstance(urls, str):
        urls = [urls]
    if not urls or not isinstance(urls, list) or not all(isinstance(u, str) and u.strip() for u in urls):
        raise ValueError("no url: give 'url' (a string) or 'urls' (a list of strings)")
    for name in ("work_id", "artifact_id", "filename", "expected_type"):
        value = obj.get(name)
        if value is not None and not isinstance(value, (str, int)):
            raise ValueError(f"{name} must be a string")
    sha256 = obj.get("sha256")
    if sha256 is not None and (not isinstance(sha256, str) or not _SHA256.match(sha256)):
        raise ValueError("sha256 must be 64 hexadecimal characters")
    size = obj.get("size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise ValueError("size must be a whole number of bytes")
    return Job(
        urls=tuple(u.strip() for u in urls),
        work_id=None if obj.get("work_id") is None else str(obj["work_id"]),
        artifact_id=None if obj.get("artifact_id") is None else str(obj["artifact_id"]),
        filename=obj.get("filename") and str(obj["filename"]),
        sha256=sha256,
        size=size,
        expected_type=obj.get("expected_type") and str(obj["expected_type"]),
        line=line,
    )


def _check_urls(job: Job) -> None:
    for url in job.urls:
        canonical_url(url)  # raises UsageError with the reason


def parse_lines(stream: TextIO) -> Iterator[Job | BadLine]:
    """Jobs and bad lines, in input order."""
    jsonl: bool | None = None
    for number, raw in enumerate(stream, start=1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        if jsonl is None:
            jsonl = text.startswith("{")
        try:
            if jsonl:
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"not JSON: {exc.msg} at column {exc.colno}") from None
                job = _job_from_object(obj, number)
            else:
                job = Job(urls=(text,), line=number)
            _check_urls(job)
        except (ValueError, UsageError) as exc:
            yield BadLine(number, str(exc), text[:200])
            continue
        yield job


def read_jobs(source: str, stdin: TextIO | None = None) -> list[Job | BadLine]:
    """Read a whole job list from a path or ``-``; raise :class:`UsageError` when it cannot be read."""
    if source == "-":
        return list(parse_lines(stdin or sys.stdin))
    path = Path(source)
    try:
        with path.open("r", encoding="utf-8") as fh:
            return list(parse_lines(fh))
    except FileNotFoundError:
        raise UsageError(f"input file not found: {source}") from None
    except IsADirectoryError:
        raise UsageError(f"input is a folder, not a job list: {source}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"input is not UTF-8 text: {source} (byte {exc.start})") from None
    except OSError as exc:
        raise UsageError(f"cannot read input {source}: {exc.strerror}") from None
