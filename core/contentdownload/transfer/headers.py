"""Header fields, and the small pieces of RFC 9110 every transport shares (the standard library alone).

:class:`HeaderFields` looks fields up case-insensitively (the test server uses it too); the
functions read ``Retry-After``, ``Content-Range``, ``Content-Length``, ``Content-Encoding``,
entity tags and HTTP dates from a ``requests`` response or an engine's exchange alike, and
build the conditional headers of a revalidation. Nothing here imports a transport, so the
event-loop engine's run never pays for ``requests``.
"""

from __future__ import annotations

import email.utils
import functools
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import attrs

#: Statuses the client retries before the body (and that a stage reports as ``retry``).
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
#: Statuses whose ``Retry-After`` pauses every request to the host.
PAUSE_STATUSES = frozenset({429, 503})
#: ``Accept-Encoding`` of every request. Documents are already compressed, and a content coding
#: breaks ranges, byte counts and revalidation (Apache's ``-gzip`` ETags), so none is asked for;
#: a server that compresses anyway is still decoded (:func:`decodable`).
ACCEPT_ENCODING = "identity"
#: Default cap on a server's ``Retry-After``, in seconds.
DEFAULT_MAX_RETRY_AFTER = 120.0
#: The most :func:`parse_retry_after` gives (urllib3's ``Retry.DEFAULT_RETRY_AFTER_MAX``: six hours).
RETRY_AFTER_MAX = 21600


class HeaderFields(Mapping[str, str]):
    """Read-only header fields, case-insensitive; a field sent more than once has its values joined with
    ``", "`` (as requests does). Iteration yields the names as they were sent (the first spelling of each)."""

    __slots__ = ("_fields",)

    def __init__(self, fields: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> None:
        joined: dict[str, tuple[str, str]] = {}
        for name, value in fields.items() if isinstance(fields, Mapping) else fields:
            key = name.lower()
            seen = joined.get(key)
            joined[key] = (name, value) if seen is None else (seen[0], f"{seen[1]}, {value}")
        self._fields = joined

    def __getitem__(self, name: str) -> str:
        return self._fields[name.lower()][1]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._fields

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._fields.values())

    def __len__(self) -> int:
        return len(self._fields)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict(self.items())!r})"


_DELAY_SECONDS = re.compile(r"^\s*[0-9]+\s*$")


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delay-seconds or an HTTP date); ``None`` if absent or malformed.

    As urllib3's ``Retry.parse_retry_after`` reads it (the synchronous client's retries use
    that one): a date in the past gives ``0.0``, and nothing gives more than :data:`RETRY_AFTER_MAX`.
    """
    if value is None:
        return None
    if _DELAY_SECONDS.match(value):
        seconds: float = int(value)
    else:
        date = email.utils.parsedate_tz(value)
        if date is None:
            return None
        seconds = email.utils.mktime_tz(date) - time.time()
    return float(min(max(seconds, 0), RETRY_AFTER_MAX))


@attrs.frozen
class ContentRange:
    """A parsed ``Content-Range: bytes START-END/TOTAL`` (or ``bytes */TOTAL`` for a 416).

    ``start`` and ``end`` are ``None`` for the unsatisfied form; ``total`` is ``None``
    when the server sent ``*`` (length unknown).
    """

    start: int | None
    end: int | None
    total: int | None

    @property
    def length(self) -> int | None:
        """Bytes in the range (``end - start + 1``), or ``None`` for the unsatisfied form."""
        if self.start is None or self.end is None:
            return None
        return self.end - self.start + 1


_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*$", re.IGNORECASE)


def parse_content_range(value: str | None) -> ContentRange | None:
    """Parse a ``Content-Range`` header; ``None`` when absent or malformed (including ``end < start``)."""
    if not value:
        return None
    match = _CONTENT_RANGE.match(value)
    if match is None:
        return None
    first, last, total = match.groups()
    total_n = None if total == "*" else int(total)
    if first is None:
        return None if total_n is None else ContentRange(None, None, total_n)
    start, end = int(first), int(last)
    if end < start or (total_n is not None and end >= total_n):
        return None
    return ContentRange(start, end, total_n)


def is_strong_etag(tag: str | None) -> bool:
    """Whether ``tag`` is a strong entity tag (``"..."``, not ``W/"..."``): only those may go in ``If-Range``."""
    if not tag:
        return False
    tag = tag.strip()
    return not tag.startswith("W/") and len(tag) >= 2 and tag[0] == '"' and tag[-1] == '"'


#: Suffixes servers append to an ETag for a compressed variant (Apache mod_deflate, mod_brotli).
_CODING_SUFFIXES = ("-gzip", "-br", "-zstd", "-deflate")


def revalidation_etags(tag: str) -> str:
    """An ``If-None-Match`` value for a recorded ``tag``: the tag and its identity form.

    A file recorded from a compressed answer carries the coding's ETag (Apache's
    ``"abc-gzip"``) that the server's identity answer never matches; naming both forms
    lets an unchanged file get its ``304`` (the comparison is weak, RFC 9110 section 13.1.2).
    """
    tags = [tag.strip()]
    for suffix in _CODING_SUFFIXES:
        if tags[0].endswith(f'{suffix}"'):
            tags.append(tags[0][: -len(suffix) - 1] + '"')
    return ", ".join(tags)


def conditional_headers(etag: str | None, last_modified: str | None) -> tuple[tuple[str, str], ...]:
    """The headers that ask whether a finished file changed: ``If-None-Match``, ``If-Modified-Since``."""
    headers = []
    if etag and etag.strip():
        headers.append(("If-None-Match", revalidation_etags(etag)))
    if http_date(last_modified):
        headers.append(("If-Modified-Since", http_date(last_modified)))
    return tuple(headers)


@functools.lru_cache(maxsize=1024)  # responses of one server repeat their dates: parsed once
def http_date(value: str | None) -> str | None:
    """``value`` when it is a valid HTTP date (as ``Last-Modified`` must be), else ``None``."""
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return value.strip() if parsed is not None and parsed.tzinfo is not None else None


def content_length(response: Any) -> int | None:
    """The response's ``Content-Length`` as an int, ``None`` when absent or not a single non-negative number."""
    value = response.headers.get("Content-Length")
    if value is None:
        return None
    value = value.strip()
    return int(value) if value.isdigit() else None


def content_encoding(response: Any) -> str | None:
    """The response's content coding, lower-cased, ``None`` for ``identity`` or none."""
    value = (response.headers.get("Content-Encoding") or "").strip().lower()
    return None if value in ("", "identity") else value


@functools.cache
def _decodable_encodings() -> frozenset[str]:
    """Content codings urllib3 can decode here (brotli and zstd only when their libraries are installed)."""
    import urllib3.response  # only a body sent with a content coding asks; the synchronous path decodes it

    return frozenset(c.lower() for c in urllib3.response.BaseHTTPResponse.CONTENT_DECODERS)


def decodable(encoding: str | None) -> bool:
    """Whether a ``Content-Encoding`` value (possibly a list such as ``gzip, deflate``) can be decoded here."""
    if not encoding:
        return True
    return all(part.strip().lower() in _decodable_encodings() for part in encoding.split(",") if part.strip())
