"""Validators by RFC 9110 and the overlap check, on the headers real servers send."""

from __future__ import annotations

import pytest
import requests.structures

from contentdownload.transfer.validators import OVERLAP, Overlap, OverlapMismatch, Validators, is_strong_date, partial_problem, resume_start

LM = "Tue, 14 Nov 2023 22:13:20 GMT"


def headers(**items: str):
    return requests.structures.CaseInsensitiveDict({k.replace("_", "-"): v for k, v in items.items()})


@pytest.mark.parametrize(
    "response,if_range",
    [
        (dict(ETag='"abc"', Last_Modified=LM, Date="Tue, 01 Dec 2026 10:00:00 GMT"), '"abc"'),
        (dict(ETag='W/"abc"', Last_Modified=LM, Date="Tue, 01 Dec 2026 10:00:00 GMT"), None),  # never the date beside a weak tag
        (dict(Last_Modified=LM, Date="Tue, 01 Dec 2026 10:00:00 GMT"), LM),
        (dict(Last_Modified=LM, Date=LM), None),  # the same second as Date: a weak date
        (dict(Last_Modified=LM), None),  # no Date: strength unknown
        (dict(), None),
    ],
)
def test_if_range_carries_only_a_strong_validator(response, if_range):
    assert Validators.of(headers(**response)).if_range() == if_range


def test_a_date_one_second_later_makes_last_modified_strong():
    assert is_strong_date(LM, "Tue, 14 Nov 2023 22:13:21 GMT")
    assert not is_strong_date(LM, "Tue, 14 Nov 2023 22:13:20 GMT")
    assert not is_strong_date("not a date", "Tue, 14 Nov 2023 22:13:21 GMT")


def test_a_resume_reads_an_overlap_before_the_committed_offset():
    assert resume_start(1_000_000) == 1_000_000 - OVERLAP
    assert resume_start(1000) == 0


@pytest.mark.parametrize(
    "response,problem",
    [
        (dict(Content_Range="bytes 100-199/200", ETag='"a"', Last_Modified=LM), None),
        (dict(Content_Range="bytes 101-199/200", ETag='"a"', Last_Modified=LM), "bad_content_range"),
        (dict(Content_Range="bytes 100-299/300", ETag='"a"', Last_Modified=LM), "bad_content_range"),
        (dict(ETag='"a"', Last_Modified=LM), "bad_content_range"),
        (dict(Content_Range="bytes 100-199/200", ETag='"b"', Last_Modified=LM), "validator_changed"),
        (dict(Content_Range="bytes 100-199/200", ETag='"a"', Last_Modified="Wed, 15 Nov 2023 00:00:00 GMT"), "validator_changed"),
        (dict(Content_Range="bytes 100-199/200", Last_Modified=LM), "validator_changed"),  # the ETag went missing
    ],
)
def test_a_206_must_continue_the_part_it_is_appended_to(response, problem):
    recorded = Validators(etag='"a"', last_modified=LM)
    assert partial_problem(headers(**response), 100, recorded, 200) == problem


def test_the_overlap_lets_through_only_what_lies_past_it():
    tail = bytes(range(256)) * 4
    overlap = Overlap(tail)
    assert bytes(overlap.feed(tail[:100])) == b""
    assert bytes(overlap.feed(tail[100:] + b"new")) == b"new"
    assert overlap.pending == 0 and bytes(overlap.feed(b"more")) == b"more"


def test_an_overlap_that_differs_is_refused():
    overlap = Overlap(b"a" * 1000)
    overlap.feed(b"a" * 500)
    with pytest.raises(OverlapMismatch):
        overlap.feed(b"a" * 499 + b"b" + b"rest")
