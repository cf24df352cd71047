"""Resuming a part without splicing two versions: validators by RFC 9110, and the overlap check.

A resume appends bytes from a new response to bytes of an earlier one. That is only sound when
both are the same representation, and headers alone cannot prove it: servers that derive
ETag and Last-Modified from size and mtime keep them when a file is replaced by one of the
same size within the same second, and some servers ignore ``If-Range``. So:

- ``If-Range`` carries a strong ETag, or else a Last-Modified date that is strong (RFC 9110
  section 8.8.2.2: the response's ``Date`` at least one second after it) and only when there
  is no ETag at all (section 13.1.5); never a weak ETag.
- Every ``206`` is checked before a byte is written: its ``Content-Range`` start and total,
  and each validator the part recorded equal to the response's (:func:`partial_problem`).
- Every resume asks for :data:`OVERLAP` bytes before the committed offset and compares them
  with the part's tail (:class:`Overlap`); with only weak validators, this check is what
  allows the resume at all.
"""

from __future__ import annotations

import email.utils
import functools
from typing import Mapping

import attrs

from contentdownload.transfer.headers import http_date, is_strong_etag, parse_content_range

#: Bytes re-read before the committed offset on every resume (less when the part is shorter).
OVERLAP = 64 * 1024


@attrs.frozen(kw_only=True)
class Validators:
    """What a response said about its representation: ETag, Last-Modified, and whether that date is strong."""

    etag: str | None = None
    last_modified: str | None = None
    date_is_strong: bool = False

    @classmethod
    def of(cls, headers: Mapping[str, str]) -> "Validators":
        """The validators of a response (``headers`` is a case-insensitive mapping)."""
        last_modified = http_date(headers.get("Last-Modified"))
        return cls(
            etag=(headers.get("ETag") or "").strip() or None,
            last_modified=last_modified,
            date_is_strong=is_strong_date(last_modified, headers.get("Date")),
        )

    def if_range(self) -> str | None:
        """The ``If-Range`` value these validators allow, or ``None`` when none may be sent."""
        if is_strong_etag(self.etag):
            return self.etag
        if self.etag is None and self.last_modified and self.date_is_strong:
            return self.last_modified
        return None


def is_strong_date(last_modified: str | None, date: str | None) -> bool:
    """RFC 9110 section 8.8.2.2: Last-Modified is strong when the response's Date is a second or more later."""
    lm, sent = _timestamp(last_modified), _timestamp(date)
    return lm is not None and sent is not None and sent - lm >= 1


@functools.lru_cache(maxsize=1024)  # responses of one server repeat their dates: parsed once
def _timestamp(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def resume_start(committed: int) -> int:
    """Where a resume's ``Range`` starts: :data:`OVERLAP` bytes (or all of them) before ``committed``."""
    return committed - min(OVERLAP, committed)


def partial_problem(headers: Mapping[str, str], start: int, recorded: Validators, expected_total: int | None) -> str | None:
    """Why a ``206`` cannot continue the part (``None`` when it can).

    ``start`` is where the request's range began; ``recorded`` the validators of the
    response the part's bytes came from. ``bad_content_range``: the range does not start
    there, or announces another total. ``validator_changed``: an ETag or Last-Modified the
    part recorded differs from (or is missing in) the response.
    """
    announced = parse_content_range(headers.get("Content-Range"))
    if announced is None or announced.start != start:
        return "bad_content_range"
    if expected_total is not None and announced.total not in (None, expected_total):
        return "bad_content_range"
    now = Validators.of(headers)
    if recorded.etag is not None and now.etag != recorded.etag:
        return "validator_changed"
    if recorded.last_modified is not None and now.last_modified != recorded.last_modified:
        return "validator_changed"
    return None


class OverlapMismatch(ValueError):
    """The bytes a resume re-read differ from the part's tail: the origin changed."""


class Overlap:
    """Compares the first bytes of a resumed body with the part's tail, then lets the rest through.

    ``tail`` is the part's last bytes (``committed - resume_start(committed)`` of them).
    :meth:`feed` returns what of a block lies past the overlap (to append), or raises
    :class:`OverlapMismatch` at the first block that differs.
    """

    def __init__(self, tail: bytes):
        self._tail = memoryview(tail)
        self._seen = 0

    @property
    def pending(self) -> int:
        """Overlap bytes not yet compared."""
        return len(self._tail) - self._seen

    def feed(self, block: bytes | memoryview) -> memoryview:
        view = memoryview(block)
        n = min(self.pending, len(view))
        if n:
            if view[:n] != self._tail[self._seen : self._seen + n]:
                raise OverlapMismatch("the bytes before the committed offset changed")
            self._seen += n
        return view[n:]
