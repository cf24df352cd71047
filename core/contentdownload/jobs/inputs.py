"""Job lists: a text file of URLs, a JSONL file of jobs, or ``-`` for stdin.

A text list has one URL a line; blank lines and ``#`` comments are skipped. A JSONL
list has one object a line with ``url`` or ``urls`` (ordered candidates), and optional
``work_id``, ``artifact_id``, ``filename``, ``sha256``, ``size``, ``expected_type``. The format is JSONL
when the first entry starts with ``{``.

A leading UTF-8 BOM and CRLF line ends are accepted. A bad line (not JSON, nested too
deeply, no URL, an unsupported scheme, a malformed field, not UTF-8, longer than 64 KiB)
becomes a :class:`BadLine` that the runner records as a ``failed`` job with its line
number; the other lines go on. A long line is read past in bounded chunks, so memory
never grows with the length of a line. URLs in a bad line's text and reason are redacted.
An input that cannot be read at all is a :class:`UsageError`.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import IO, Iterator

import attrs

from contentdownload.errors import UsageError
from contentdownload.hooks.model import Job
from contentdownload.transfer.urls import canonical_url, redact_text, redact_url

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


#: The longest line read whole; a longer one is a bad line, read past in chunks of this size.
MAX_LINE = 64 * 1024
_BOM = "\ufeff"


def _bounded_lines(stream: IO) -> Iterator[tuple[int, str | None, str]]:
    """``(number, text, problem)`` per line, never holding more than :data:`MAX_LINE` of one line.

    ``stream`` is binary or text; ``text`` is ``None`` when the line is too long or not
    UTF-8 (``problem`` says which). A leading BOM and CR before the newline are dropped.
    """
    number = 0
    while True:
        chunk = stream.readline(MAX_LINE + 1)
        if not chunk:
            return
        number += 1
        newline = b"\n" if isinstance(chunk, bytes) else "\n"
        if len(chunk) > MAX_LINE and not chunk.endswith(newline):
            while chunk and not chunk.endswith(newline):
                chunk = stream.readline(MAX_LINE)
            yield number, None, f"line longer than {MAX_LINE // 1024} KiB"
            continue
        if isinstance(chunk, bytes):
            try:
                chunk = chunk.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield number, None, f"not UTF-8 text (byte {exc.start})"
                continue
        if number == 1:
            chunk = chunk.removeprefix(_BOM)
        yield number, chunk.rstrip("\r\n"), ""


def _parse_entry(text: str, number: int, jsonl: bool) -> Job:
    if jsonl:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc.msg} at column {exc.colno}") from None
        except RecursionError:
            raise ValueError("not JSON: nested too deeply") from None
        job = _job_from_object(obj, number)
    else:
        job = Job(urls=(text,), line=number)
    _check_urls(job)
    return job


def parse_lines(stream: IO) -> Iterator[Job | BadLine]:
    """Jobs and bad lines, in input order; whatever is wrong with a line makes it a :class:`BadLine`."""
    jsonl: bool | None = None
    for number, raw, problem in _bounded_lines(stream):
        if raw is None:
            yield BadLine(number, problem, "")
            continue
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        if jsonl is None:
            jsonl = text.startswith("{")
        try:
            job = _parse_entry(text, number, jsonl)
        except Exception as exc:  # any parser failure is this line's fault, never the run's
            reason = str(exc) if isinstance(exc, (ValueError, UsageError)) else f"malformed line ({type(exc).__name__})"
            yield BadLine(number, redact_text(reason)[:300], redact_url(text[:200]))
            continue
        yield job


def read_jobs(source: str, stdin: IO | None = None) -> list[Job | BadLine]:
    """Read a whole job list from a path or ``-``; raise :class:`UsageError` when it cannot be read."""
    if source == "-":
        return list(parse_lines(stdin or sys.stdin.buffer))
    path = Path(source)
    try:
        with path.open("rb") as fh:
            return list(parse_lines(fh))
    except FileNotFoundError:
        raise UsageError(f"input file not found: {source}") from None
    except IsADirectoryError:
        raise UsageError(f"input is a folder, not a job list: {source}") from None
    except OSError as exc:
        raise UsageError(f"cannot read input {source}: {exc.strerror}") from None
