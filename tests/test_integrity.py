"""Integrity under any server: no spliced, stale, compressed or wrong-type file is ever promoted.

Each case runs a real download over a loopback socket, cut mid-body where a resume is the
point, and asserts the promoted file's SHA-256 and what went over the wire.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time

import pytest
from structlog.testing import capture_logs

from contentdownload import Downloader, Job
from contentdownload.testing.server import Fault

SIZE = 200_000
CUT = 50_000
OVERLAP = 64 * 1024


def version(seed: int, size: int = SIZE) -> bytes:
    return hashlib.sha256(str(seed).encode()).digest() * (size // 32) + bytes(size % 32)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def b64sha(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


@pytest.fixture
def dl():
    with Downloader(environ={}, retries=0, backoff_factor=0) as downloader:
        yield downloader


def cut_first_attempt(dl, server, path, out, **job):
    """Download ``path`` once with the body cut after CUT bytes: a part of CUT bytes stays behind."""
    server.add_fault(path, Fault.cut_after(CUT))
    first = dl.download(Job(urls=(server.url(path),), **job), out)
    assert first.outcome == "failed"
    return first


def reasons(logs) -> set[str]:
    return {e["reason"] for e in logs if e.get("reason")}


def resume_request(server, path):
    return [r for r in server.requests if r.path == path][-1]


def assert_one_whole_version(result, out_file, data):
    assert result.ok, result.reason
    assert out_file.read_bytes() == data and result.sha256 == sha(data)


def test_a_server_that_ignores_if_range_never_splices(dl, server, tmp_path):
    old, new = version(1), version(2)
    server.add_file("/paper.bin", old)
    cut_first_attempt(dl, server, "/paper.bin", tmp_path)
    server.set_content("/paper.bin", new)
    server.add_fault("/paper.bin", Fault.ignore_if_range())
    with capture_logs() as logs:
        result = dl.download(server.url("/paper.bin"), tmp_path)
    assert_one_whole_version(result, tmp_path / "paper.bin", new)
    assert result.outcome == "downloaded" and "validator_changed" in reasons(logs)


def test_a_weak_date_is_never_sent_in_if_range_and_the_overlap_guards_the_resume(dl, server, tmp_path):
    data = version(3)
    # Not a second before the response's Date (here after it, so no clock tick can make it strong): a weak date.
    server.add_file("/weakdate.bin", data, no_etag=True, last_modified=time.time() + 30)
    cut_first_attempt(dl, server, "/weakdate.bin", tmp_path)
    result = dl.download(server.url("/weakdate.bin"), tmp_path)
    assert_one_whole_version(result, tmp_path / "weakdate.bin", data)
    request = resume_request(server, "/weakdate.bin")
    assert "If-Range" not in request.headers
    assert request.range == f"bytes={CUT - min(OVERLAP, CUT)}-" and result.outcome == "resumed"


def test_a_weak_etag_is_never_sent_and_no_date_stands_in_for_it(dl, server, tmp_path):
    data = version(4)
    server.add_file("/weak.bin", data, weak_etag=True)
    cut_first_attempt(dl, server, "/weak.bin", tmp_path)
    result = dl.download(server.url("/weak.bin"), tmp_path)
    assert_one_whole_version(result, tmp_path / "weak.bin", data)
    request = resume_request(server, "/weak.bin")
    assert "If-Range" not in request.headers  # neither the weak tag nor the date (RFC 9110 13.1.5)
    assert request.range == f"bytes={CUT - min(OVERLAP, CUT)}-"


def test_a_same_size_replacement_with_the_same_validators_is_caught_by_the_overlap(dl, server, tmp_path):
    old, new = version(5), version(6)
    server.add_file("/same.bin", old)
    cut_first_attempt(dl, server, "/same.bin", tmp_path)
    server.set_content("/same.bin", new, keep_validators=True)
    with capture_logs() as logs:
        result = dl.download(server.url("/same.bin"), tmp_path)
    assert_one_whole_version(result, tmp_path / "same.bin", new)
    assert "overlap_mismatch" in reasons(logs)
    assert resume_request(server, "/same.bin").range is None  # the second try fetched it whole


def test_a_206_with_the_same_etag_and_another_last_modified_is_rejected(dl, server, tmp_path):
    data = version(7)
    server.add_file("/lm.bin", data, etag='"fixed"')
    cut_first_attempt(dl, server, "/lm.bin", tmp_path)
    server.add_file("/lm.bin", data, etag='"fixed"', last_modified=time.time() - 5)  # same ETag, new date
    with capture_logs() as logs:
        result = dl.download(server.url("/lm.bin"), tmp_path)
    assert_one_whole_version(result, tmp_path / "lm.bin", data)
    assert "validator_changed" in reasons(logs)


def test_a_repr_digest_that_does_not_match_fails_and_nothing_is_promoted(dl, server, tmp_path):
    data = version(8)
    flipped = bytearray(data)
    flipped[1234] ^= 1
    url = server.add_file("/lies.pdf", b"%PDF-1.7\n" + data, headers={"Repr-Digest": f"sha-256=:{b64sha(b'%PDF-1.7' + bytes(1) + bytes(flipped))}:"})
    result = dl.download(url, tmp_path)
    assert result.outcome == "failed" and result.reason == "digest_mismatch"
    assert not (tmp_path / "lies.pdf").exists()


def test_a_matching_repr_digest_is_recorded_as_what_verified_the_file(server, tmp_path):
    data = b"%PDF-1.7\n" + version(9)
    url = server.add_file("/good.pdf", data, repr_digest=True)
    with Downloader(environ={}) as dl:
        result = dl.download(url, tmp_path)
    assert_one_whole_version(result, tmp_path / "good.pdf", data)
    assert "repr-digest:sha256" in result.verified_by
    assert "Want-Repr-Digest" in server.requests[-1].headers


def test_a_content_digest_on_a_206_covers_the_partial_body(dl, server, tmp_path):
    data = version(10)
    server.add_file("/cd.bin", data, content_digest=True)
    cut_first_attempt(dl, server, "/cd.bin", tmp_path)
    result = dl.download(server.url("/cd.bin"), tmp_path)
    assert_one_whole_version(result, tmp_path / "cd.bin", data)
    assert result.outcome == "resumed" and "content-digest:sha256" in result.verified_by


def test_a_content_md5_on_a_206_covers_the_partial_body(dl, server, tmp_path):
    data, cut = version(14), 150_000
    server.add_file("/md5.bin", data)
    server.add_fault("/md5.bin", Fault.cut_after(cut))
    assert dl.download(server.url("/md5.bin"), tmp_path).outcome == "failed"
    partial = data[cut - OVERLAP:]  # what the resume asks for: the overlap, then the rest
    server.add_fault("/md5.bin", Fault.add_headers({"Content-MD5": base64.b64encode(hashlib.md5(partial).digest()).decode()}))
    result = dl.download(server.url("/md5.bin"), tmp_path)
    assert_one_whole_version(result, tmp_path / "md5.bin", data)
    assert result.outcome == "resumed" and "content-md5:md5" in result.verified_by


def test_a_lying_content_digest_on_a_206_is_never_appended(dl, server, tmp_path):
    data = version(11)
    server.add_file("/cdbad.bin", data)
    cut_first_attempt(dl, server, "/cdbad.bin", tmp_path)
    server.add_fault("/cdbad.bin", Fault.add_headers({"Content-Digest": f"sha-256=:{b64sha(b'other')}:"}))
    result = dl.download(server.url("/cdbad.bin"), tmp_path)
    assert result.outcome == "failed" and result.reason == "digest_mismatch"
    assert not (tmp_path / "cdbad.bin").exists()


def test_an_html_page_for_a_pdf_is_never_saved(dl, server, tmp_path):
    url = server.add_file("/paper.pdf", b"<!DOCTYPE html><html><body>Please sign in</body></html>", content_type="application/pdf")
    result = dl.download(url, tmp_path)
    assert result.outcome == "failed" and result.reason == "unexpected_content"
    assert result.detected_type == "text/html"
    assert not (tmp_path / "paper.pdf").exists()


def test_accept_any_content_turns_the_check_off(server, tmp_path):
    url = server.add_file("/paper.pdf", b"<html>landing page</html>")
    with Downloader(environ={}, accept_any_content=True) as dl:
        result = dl.download(url, tmp_path)
    assert result.outcome == "downloaded" and result.detected_type == "text/html"


def test_an_expected_type_in_the_job_wins_over_the_extension(dl, server, tmp_path):
    url = server.add_file("/download", b"<html>not a pdf</html>", content_type="application/pdf")
    result = dl.download(Job(urls=(url,), expected_type="pdf"), tmp_path)
    assert result.outcome == "failed" and result.reason == "unexpected_content"


def test_a_pdf_served_as_octet_stream_is_saved(dl, server, tmp_path):
    data = b"%PDF-1.4\n" + version(12)
    url = server.add_file("/real.pdf", data, content_type="application/octet-stream")
    result = dl.download(url, tmp_path)
    assert_one_whole_version(result, tmp_path / "real.pdf", data)
    assert result.detected_type == "application/pdf"


def test_a_server_that_gzips_when_allowed_is_asked_for_identity_and_resumes(dl, server, tmp_path):
    data = os.urandom(SIZE)
    server.add_file("/doc.pdf", b"%PDF-1.7\n" + data, gzip=True)
    cut_first_attempt(dl, server, "/doc.pdf", tmp_path)
    result = dl.download(server.url("/doc.pdf"), tmp_path)
    assert_one_whole_version(result, tmp_path / "doc.pdf", b"%PDF-1.7\n" + data)
    assert result.outcome == "resumed"
    assert all(r.headers.get("Accept-Encoding") == "identity" for r in server.requests)
    assert server.stats("/doc.pdf").body_bytes <= 1.05 * (SIZE + 9) + OVERLAP


def test_revalidating_a_file_recorded_with_a_coding_suffixed_etag_gets_its_304(server, tmp_path):
    data = b"%PDF-1.7\n" + version(13)
    url = server.add_file("/a.pdf", data, etag='"abc-gzip"')  # recorded as Apache's mod_deflate named it
    with Downloader(environ={}) as dl:
        assert dl.download(url, tmp_path).ok
    server.add_file("/a.pdf", data, etag='"abc"')  # the identity answer's tag, same bytes
    server.reset_stats()
    with Downloader(environ={}, revalidate=True) as dl:
        again = dl.download(url, tmp_path)
    assert again.outcome == "not_modified" and server.stats("/a.pdf").body_bytes == 0
