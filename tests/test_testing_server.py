"""The loopback HTTP/1.1 server shipped in ``contentdownload.testing.server``, over real sockets."""

from __future__ import annotations

import email.utils
import gzip
import hashlib
import http.client
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contentdownload.testing.server import DEFAULT_LAST_MODIFIED, Fault, LoopbackServer, PathStats

REPO = Path(__file__).resolve().parents[1]
DATA = random.Random(7).randbytes(100_000)


@pytest.fixture
def server(tmp_path):
    with LoopbackServer(root=tmp_path / "served") as srv:
        yield srv
        assert srv.errors == []


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory):
    with LoopbackServer(root=tmp_path_factory.mktemp("shared")) as srv:
        yield srv


def conn(server: LoopbackServer, timeout: float = 10.0) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)


def fetch(server, path, method="GET", headers=None, connection=None):
    """One request with http.client; returns (response, body)."""
    c = connection or conn(server)
    c.request(method, path, headers=headers or {})
    resp = c.getresponse()
    return resp, resp.read()


def raw_exchange(server, request: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes; returns everything received."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as s:
        s.sendall(request)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


# -- plain GET / HEAD ----------------------------------------------------------------------


def test_full_get_body_headers_and_counters(server):
    url = server.add_file("/docs/a.pdf", DATA, content_type="application/pdf")
    assert url == server.base_url + "/docs/a.pdf"
    r = requests.get(url)
    assert r.status_code == 200
    assert hashlib.sha256(r.content).hexdigest() == hashlib.sha256(DATA).hexdigest()
    assert r.headers["Content-Length"] == str(len(DATA))
    assert r.headers["Content-Type"] == "application/pdf"
    assert r.headers["Accept-Ranges"] == "bytes"
    assert r.headers["ETag"] == '"%s"' % hashlib.sha256(DATA).hexdigest()[:16]
    assert r.headers["Last-Modified"] == email.utils.formatdate(DEFAULT_LAST_MODIFIED, usegmt=True)
    assert server.etag("/docs/a.pdf") == r.headers["ETag"]
    stats = server.stats("/docs/a.pdf")
    assert stats == PathStats(requests=1, body_bytes=len(DATA), full_bodies=1, statuses=[200], ranges=[None], conditional=0)
    (record,) = server.requests
    assert (record.method, record.path, record.status, record.body_bytes, record.complete) == ("GET", "/docs/a.pdf", 200, len(DATA), True)
    assert record.headers.get("user-agent", "").startswith("python-requests")
    assert record.headers.get("USER-AGENT") == record.headers["User-Agent"]


def test_head_sends_headers_only_and_keeps_the_connection(server):
    server.add_file("/h.bin", DATA)
    c = conn(server)
    resp, body = fetch(server, "/h.bin", "HEAD", connection=c)
    assert resp.status == 200 and body == b""
    assert resp.getheader("Content-Length") == str(len(DATA))
    resp, body = fetch(server, "/h.bin", connection=c)  # same connection still usable
    assert body == DATA
    assert server.stats("/h.bin").statuses == [200, 200]
    assert server.stats("/h.bin").full_bodies == 1  # HEAD sends no body
    c.close()


def test_keep_alive_across_statuses(server):
    server.add_file("/k.bin", DATA)
    server.add_status("/gone", 410)
    c = conn(server)
    etag = None
    for _ in range(3):
        resp, body = fetch(server, "/k.bin", connection=c)
        assert body == DATA
        etag = resp.getheader("ETag")
        resp, body = fetch(server, "/gone", connection=c)
        assert resp.status == 410 and body == b"<html>error page</html>"
        resp, body = fetch(server, "/k.bin", headers={"If-None-Match": etag}, connection=c)
        assert resp.status == 304 and body == b""
        resp, body = fetch(server, "/k.bin", headers={"Range": "bytes=10-19"}, connection=c)
        assert resp.status == 206 and body == DATA[10:20]
    c.close()
    assert len(server.requests) == 12


def test_url_quotes_and_request_paths_are_decoded(server):
    url = server.add_file("/dir with space/é%.bin", b"x" * 10)
    assert " " not in url and "%25" in url
    r = requests.get(url)
    assert r.status_code == 200 and r.content == b"x" * 10
    assert server.stats("/dir with space/é%.bin").requests == 1
    assert requests.get(url + "?q=1").status_code == 200  # the query string is not part of the path


def test_unknown_path_is_404_html(server):
    r = requests.get(server.url("/nothing/here.pdf"))
    assert r.status_code == 404
    assert r.headers["Content-Type"].startswith("text/html")
    assert int(r.headers["Content-Length"]) == len(r.content) > 0
    assert server.stats("/nothing/here.pdf").statuses == [404]


def test_other_methods_are_refused(server):
    server.add_file("/p.bin", DATA)
    with requests.Session() as session:
        r = session.post(server.url("/p.bin"), data=b"abc")
        assert r.status_code == 405 and "GET" in r.headers["Allow"]
        assert session.get(server.url("/p.bin")).content == DATA
    assert [r.method for r in server.requests] == ["POST", "GET"]


def test_a_server_side_failure_answers_500_and_is_recorded(tmp_path):
    src = tmp_path / "vanishing.bin"
    src.write_bytes(DATA)
    with LoopbackServer() as srv:
        srv.add_file("/v.bin", source=src)
        src.unlink()  # the body can no longer be opened
        r = requests.get(srv.url("/v.bin"))
        assert r.status_code == 500
        assert len(srv.errors) == 1 and isinstance(srv.errors[0], FileNotFoundError)


# -- ranges --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        ("bytes=1000-", 1000, len(DATA) - 1),
        ("bytes=0-0", 0, 0),
        ("bytes=10-99", 10, 99),
        ("bytes=99990-200000", 99990, len(DATA) - 1),  # last-pos past the end is clamped
        ("bytes=-500", len(DATA) - 500, len(DATA) - 1),
        ("bytes=-200000", 0, len(DATA) - 1),  # suffix longer than the file
    ],
)
def test_single_ranges(server, header, start, end):
    server.add_file("/r.bin", DATA)
    resp, body = fetch(server, "/r.bin", headers={"Range": header})
    assert resp.status == 206
    assert resp.getheader("Content-Range") == f"bytes {start}-{end}/{len(DATA)}"
    assert resp.getheader("Content-Length") == str(end - start + 1)
    assert body == DATA[start:end + 1]
    stats = server.stats("/r.bin")
    assert stats.ranges == [header] and stats.body_bytes == end - start + 1 and stats.full_bodies == 0


@pytest.mark.parametrize("header", ["bytes=100000-", "bytes=200000-200010", "bytes=-0"])
def test_unsatisfiable_range_is_416(server, header):
    server.add_file("/r.bin", DATA)
    resp, body = fetch(server, "/r.bin", headers={"Range": header})
    assert resp.status == 416
    assert resp.getheader("Content-Range") == f"bytes */{len(DATA)}"
    assert len(body) == int(resp.getheader("Content-Length")) and DATA[:20] not in body


def test_range_on_empty_file_is_416(server):
    server.add_file("/empty", b"")
    resp, _ = fetch(server, "/empty", headers={"Range": "bytes=0-"})
    assert resp.status == 416 and resp.getheader("Content-Range") == "bytes */0"
    resp, body = fetch(server, "/empty")
    assert resp.status == 200 and body == b"" and resp.getheader("Content-Length") == "0"


@pytest.mark.parametrize("header", ["bytes=0-10,20-30", "bytes=abc", "items=0-10", "bytes=50-10"])
def test_multi_or_malformed_ranges_get_the_full_body(server, header):
    server.add_file("/r.bin", DATA)
    resp, body = fetch(server, "/r.bin", headers={"Range": header})
    assert resp.status == 200 and body == DATA


def test_range_is_ignored_for_head(server):
    server.add_file("/r.bin", DATA)
    resp, body = fetch(server, "/r.bin", "HEAD", headers={"Range": "bytes=5-"})
    assert resp.status == 200 and body == b"" and resp.getheader("Content-Length") == str(len(DATA))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.integers(0, 3000), first=st.integers(0, 3500), length=st.one_of(st.none(), st.integers(0, 3500)),
       suffix=st.booleans())
def test_ranges_agree_with_slicing(shared_server, size, first, length, suffix):
    data = random.Random(size).randbytes(size)
    path = f"/prop/{size}.bin"
    shared_server.add_file(path, data)
    if suffix:
        header = f"bytes=-{first}"
        expected = data[max(0, size - first):] if first and size else None
        expected_start = max(0, size - first)
    else:
        header = f"bytes={first}-" + ("" if length is None else str(first + length))
        expected = data[first:] if length is None else data[first:first + length + 1]
        expected = expected if first < size else None
        expected_start = first
    resp, body = fetch(shared_server, path, headers={"Range": header})
    if expected is None:
        assert resp.status == 416 and resp.getheader("Content-Range") == f"bytes */{size}"
    else:
        assert resp.status == 206 and body == expected
        assert resp.getheader("Content-Range") == f"bytes {expected_start}-{expected_start + len(expected) - 1}/{size}"


# -- validators ----------------------------------------------------------------------------


def test_if_range_with_matching_strong_etag_gives_206(server):
    server.add_file("/v.bin", DATA)
    etag = server.etag("/v.bin")
    resp, body = fetch(server, "/v.bin", headers={"Range": "bytes=500-", "If-Range": etag})
    assert resp.status == 206 and body == DATA[500:]


def test_if_range_after_etag_change_gives_full_200(server):
    server.add_file("/v.bin", DATA)
    old = server.etag("/v.bin")
    old_lm = server.last_modified("/v.bin")
    server.add_fault("/v.bin", Fault.change_etag())
    resp, body = fetch(server, "/v.bin", headers={"Range": "bytes=500-", "If-Range": old})
    assert resp.status == 200 and body == DATA
    assert resp.getheader("ETag") not in (None, old)
    assert resp.getheader("Last-Modified") != old_lm
    assert server.etag("/v.bin") == resp.getheader("ETag")  # the change is permanent
    resp, body = fetch(server, "/v.bin", headers={"Range": "bytes=500-", "If-Range": resp.getheader("ETag")})
    assert resp.status == 206 and body == DATA[500:]


def test_if_range_with_weak_etag_never_matches(server):
    server.add_file("/w.bin", DATA, weak_etag=True)
    etag = server.etag("/w.bin")
    assert etag.startswith('W/"')
    resp, body = fetch(server, "/w.bin", headers={"Range": "bytes=500-", "If-Range": etag})
    assert resp.status == 200 and body == DATA
    resp, _ = fetch(server, "/w.bin", headers={"If-None-Match": etag})
    assert resp.status == 304  # weak comparison is fine for If-None-Match


def test_if_range_with_date(server):
    server.add_file("/d.bin", DATA, last_modified=1_650_000_000)
    lm = server.last_modified("/d.bin")
    resp, body = fetch(server, "/d.bin", headers={"Range": "bytes=7-", "If-Range": lm})
    assert resp.status == 206 and body == DATA[7:]
    other = email.utils.formatdate(1_650_000_001, usegmt=True)
    resp, body = fetch(server, "/d.bin", headers={"Range": "bytes=7-", "If-Range": other})
    assert resp.status == 200 and body == DATA


def test_if_range_date_without_last_modified_gives_200(server):
    server.add_file("/d.bin", DATA, no_last_modified=True)
    resp, body = fetch(server, "/d.bin", headers={"Range": "bytes=7-",
                                                  "If-Range": email.utils.formatdate(DEFAULT_LAST_MODIFIED, usegmt=True)})
    assert resp.status == 200 and body == DATA and resp.getheader("Last-Modified") is None


@pytest.mark.parametrize("inm", ["{etag}", "*", 'W/{etag}', '"other", {etag}'])
def test_if_none_match_gives_304_without_body(server, inm):
    server.add_file("/c.bin", DATA)
    etag = server.etag("/c.bin")
    raw = raw_exchange(server, f"GET /c.bin HTTP/1.1\r\nHost: x\r\nIf-None-Match: {inm.format(etag=etag)}\r\n"
                               "Connection: close\r\n\r\n".encode())
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 304")
    assert body == b""
    assert f"ETag: {etag}".encode() in head and b"Last-Modified: " in head
    stats = server.stats("/c.bin")
    assert stats.statuses == [304] and stats.body_bytes == 0 and stats.conditional == 1


def test_if_none_match_mismatch_gives_200(server):
    server.add_file("/c.bin", DATA)
    resp, body = fetch(server, "/c.bin", headers={"If-None-Match": '"nope"'})
    assert resp.status == 200 and body == DATA
    assert server.stats("/c.bin").conditional == 1


def test_if_modified_since(server):
    server.add_file("/m.bin", DATA, last_modified=1_600_000_000)
    same = email.utils.formatdate(1_600_000_000, usegmt=True)
    later = email.utils.formatdate(1_600_000_500, usegmt=True)
    earlier = email.utils.formatdate(1_500_000_000, usegmt=True)
    assert fetch(server, "/m.bin", headers={"If-Modified-Since": same})[0].status == 304
    assert fetch(server, "/m.bin", headers={"If-Modified-Since": later})[0].status == 304
    resp, body = fetch(server, "/m.bin", headers={"If-Modified-Since": earlier})
    assert resp.status == 200 and body == DATA
    # If-None-Match takes precedence over If-Modified-Since
    resp, body = fetch(server, "/m.bin", headers={"If-Modified-Since": same, "If-None-Match": '"other"'})
    assert resp.status == 200 and body == DATA
    stats = server.stats("/m.bin")
    assert stats.conditional == 4 and stats.body_bytes == 2 * len(DATA)


def test_if_match_failure_is_412(server):
    server.add_file("/im.bin", DATA)
    assert fetch(server, "/im.bin", headers={"If-Match": '"nope"'})[0].status == 412
    resp, body = fetch(server, "/im.bin", headers={"If-Match": server.etag("/im.bin")})
    assert resp.status == 200 and body == DATA


def test_explicit_and_missing_validators(server):
    server.add_file("/e.bin", DATA, etag="abc")
    server.add_file("/n.bin", DATA, no_etag=True)
    assert requests.get(server.url("/e.bin")).headers["ETag"] == '"abc"'
    r = requests.get(server.url("/n.bin"))
    assert "ETag" not in r.headers and "Last-Modified" in r.headers
    assert fetch(server, "/n.bin", headers={"If-None-Match": '"abc"'})[0].status == 200


def test_set_content_changes_bytes_and_validators(server):
    server.add_file("/s.bin", DATA)
    etag, lm = server.etag("/s.bin"), server.last_modified("/s.bin")
    server.set_content("/s.bin", b"new content")
    resp, body = fetch(server, "/s.bin", headers={"If-None-Match": etag})
    assert resp.status == 200 and body == b"new content"
    assert resp.getheader("ETag") != etag and resp.getheader("Last-Modified") != lm
    assert fetch(server, "/s.bin", headers={"If-Modified-Since": lm})[0].status == 200


def test_response_in_flight_keeps_the_old_bytes_after_set_content(server):
    server.add_file("/f.bin", DATA)
    server.add_fault("/f.bin", Fault.stall(1.0, after=1000))
    c = conn(server)
    c.request("GET", "/f.bin")
    resp = c.getresponse()
    assert resp.read(1000) == DATA[:1000]
    server.set_content("/f.bin", b"Z" * len(DATA))
    assert resp.read() == DATA[1000:]  # after the stall the rest comes from the old body
    assert fetch(server, "/f.bin")[1] == b"Z" * len(DATA)


# -- gzip ----------------------------------------------------------------------------------


def test_gzip_negotiation(server):
    text = b"compressible text " * 5000
    server.add_file("/t.txt", text, gzip=True, content_type="text/plain")
    resp, body = fetch(server, "/t.txt", headers={"Accept-Encoding": "gzip, deflate", "Range": "bytes=10-"})
    assert resp.status == 200  # Range is ignored for the compressed coding
    assert resp.getheader("Content-Encoding") == "gzip" and resp.getheader("Accept-Ranges") is None
    assert len(body) == int(resp.getheader("Content-Length")) < len(text)
    assert gzip.decompress(body) == text
    gz_etag = resp.getheader("ETag")

    resp, body = fetch(server, "/t.txt", headers={"Accept-Encoding": "identity", "Range": "bytes=10-"})
    assert resp.status == 206 and body == text[10:] and resp.getheader("Content-Encoding") is None
    assert resp.getheader("ETag") != gz_etag and resp.getheader("Vary") == "Accept-Encoding"

    for header in ({}, {"Accept-Encoding": "gzip;q=0, identity"}, {"Accept-Encoding": "br"}):
        resp, body = fetch(server, "/t.txt", headers=header)
        assert resp.getheader("Content-Encoding") is None and body == text, header
    resp, _ = fetch(server, "/t.txt", headers={"Accept-Encoding": "*"})
    assert resp.getheader("Content-Encoding") == "gzip"

    # requests decodes it transparently
    r = requests.get(server.url("/t.txt"))
    assert r.headers["Content-Encoding"] == "gzip" and r.content == text
    # validators belong to the coding that was selected
    assert fetch(server, "/t.txt", headers={"Accept-Encoding": "gzip", "If-None-Match": gz_etag})[0].status == 304
    assert fetch(server, "/t.txt", headers={"Accept-Encoding": "identity", "If-None-Match": gz_etag})[0].status == 200


# -- faults --------------------------------------------------------------------------------


def test_cut_after_sends_n_bytes_then_closes(server):
    server.add_file("/cut.bin", DATA)
    server.add_fault("/cut.bin", Fault.cut_after(1234))
    c = conn(server)
    c.request("GET", "/cut.bin")
    resp = c.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Length") == str(len(DATA))
    with pytest.raises(http.client.IncompleteRead) as info:
        resp.read()
    assert info.value.partial == DATA[:1234]
    stats = server.stats("/cut.bin")
    assert stats.body_bytes == 1234 and stats.full_bodies == 0
    assert server.requests[-1].fault == "cut_after" and not server.requests[-1].complete
    assert requests.get(server.url("/cut.bin")).content == DATA  # the fault was consumed
    assert server.stats("/cut.bin").full_bodies == 1


def test_cut_after_with_requests_raises_and_applies_to_ranges(server):
    server.add_file("/cut.bin", DATA)
    server.add_fault("/cut.bin", Fault.cut_after(100), times=2)
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        requests.get(server.url("/cut.bin"))
    resp = conn(server)
    resp.request("GET", "/cut.bin", headers={"Range": "bytes=5000-"})
    r = resp.getresponse()
    assert r.status == 206
    with pytest.raises(http.client.IncompleteRead) as info:
        r.read()
    assert info.value.partial == DATA[5000:5100]
    assert requests.get(server.url("/cut.bin")).status_code == 200
    assert server.stats("/cut.bin").body_bytes == 100 + 100 + len(DATA)


def test_cut_after_with_reset(server):
    server.add_file("/rst.bin", DATA)
    server.add_fault("/rst.bin", Fault.cut_after(10, reset=True))
    with pytest.raises(requests.exceptions.RequestException):
        requests.get(server.url("/rst.bin"))
    assert server.stats("/rst.bin").body_bytes == 10


def test_short_body(server):
    server.add_file("/short.bin", DATA)
    server.add_fault("/short.bin", Fault.short_body(100))
    c = conn(server)
    c.request("GET", "/short.bin")
    resp = c.getresponse()
    assert resp.getheader("Content-Length") == str(len(DATA))
    with pytest.raises(http.client.IncompleteRead) as info:
        resp.read()
    assert info.value.partial == DATA[:-100]
    assert server.stats("/short.bin").body_bytes == len(DATA) - 100


def test_ignore_range(server):
    server.add_file("/ir.bin", DATA)
    server.add_fault("/ir.bin", Fault.ignore_range())
    resp, body = fetch(server, "/ir.bin", headers={"Range": "bytes=100-", "If-Range": server.etag("/ir.bin")})
    assert resp.status == 200 and body == DATA and resp.getheader("Content-Range") is None
    resp, body = fetch(server, "/ir.bin", headers={"Range": "bytes=100-"})
    assert resp.status == 206 and body == DATA[100:]
    assert server.stats("/ir.bin").ranges == ["bytes=100-", "bytes=100-"]


@pytest.mark.parametrize("delta", [10, -10])
def test_wrong_content_range(server, delta):
    server.add_file("/wcr.bin", DATA)
    server.add_fault("/wcr.bin", Fault.wrong_content_range(delta))
    resp, body = fetch(server, "/wcr.bin", headers={"Range": "bytes=1000-"})
    assert resp.status == 206
    assert resp.getheader("Content-Range") == f"bytes {1000 + delta}-{len(DATA) - 1 + delta}/{len(DATA)}"
    assert body == DATA[1000:]


def test_status_fault_with_retry_after(server):
    server.add_file("/busy.bin", DATA)
    server.add_fault("/busy.bin", Fault.status(503, retry_after=7))
    server.add_fault("/busy.bin", Fault.status(500, body=b"boom"))
    r = requests.get(server.url("/busy.bin"))
    assert r.status_code == 503 and r.headers["Retry-After"] == "7"
    assert int(r.headers["Content-Length"]) == len(r.content) > 0
    r = requests.get(server.url("/busy.bin"))
    assert r.status_code == 500 and r.content == b"boom" and "Retry-After" not in r.headers
    assert requests.get(server.url("/busy.bin")).content == DATA
    assert server.stats("/busy.bin").statuses == [503, 500, 200]


def test_status_fault_429_keeps_the_connection(server):
    server.add_file("/rl.bin", DATA)
    server.add_fault("/rl.bin", Fault.status(429, retry_after=1, headers={"X-Limit": "0"}))
    c = conn(server)
    resp, body = fetch(server, "/rl.bin", connection=c)
    assert resp.status == 429 and resp.getheader("X-Limit") == "0" and resp.getheader("Retry-After") == "1"
    resp, body = fetch(server, "/rl.bin", connection=c)
    assert resp.status == 200 and body == DATA


def test_stall_triggers_a_client_read_timeout(server):
    server.add_file("/slow.bin", DATA)
    server.add_fault("/slow.bin", Fault.stall(30.0, after=1000))
    c = conn(server, timeout=0.3)
    c.request("GET", "/slow.bin")
    resp = c.getresponse()
    assert resp.status == 200
    assert resp.read(1000) == DATA[:1000]
    with pytest.raises(TimeoutError):
        resp.read(1)
    c.close()
    server.add_fault("/slow.bin", Fault.stall(30.0, after=10))
    with pytest.raises((requests.exceptions.ConnectionError, requests.exceptions.Timeout), match="(?i)timed out"):
        requests.get(server.url("/slow.bin"), timeout=(5, 0.3))


def test_stall_then_continue_or_close(server):
    server.add_file("/pause.bin", DATA)
    server.add_fault("/pause.bin", Fault.stall(0.2, after=50_000))
    assert requests.get(server.url("/pause.bin"), timeout=10).content == DATA
    server.add_fault("/pause.bin", Fault.stall(0.2, after=50_000, close=True))
    c = conn(server)
    c.request("GET", "/pause.bin")
    with pytest.raises(http.client.IncompleteRead) as info:
        c.getresponse().read()
    assert info.value.partial == DATA[:50_000]


def test_close_before_headers(server):
    server.add_file("/cbh.bin", DATA)
    server.add_fault("/cbh.bin", Fault.close_before_headers())
    c = conn(server)
    c.request("GET", "/cbh.bin")
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
        c.getresponse()
    with pytest.raises(requests.exceptions.ConnectionError):
        server.add_fault("/cbh.bin", Fault.close_before_headers())
        requests.get(server.url("/cbh.bin"))
    assert server.stats("/cbh.bin").statuses == [0, 0]
    assert requests.get(server.url("/cbh.bin")).status_code == 200


def test_change_content_fault(server):
    server.add_file("/cc.bin", DATA)
    etag = server.etag("/cc.bin")
    server.add_fault("/cc.bin", Fault.change_content(b"changed"))
    resp, body = fetch(server, "/cc.bin", headers={"Range": "bytes=10-", "If-Range": etag})
    assert resp.status == 200 and body == b"changed"


def test_delay_fault(server):
    server.add_file("/late.bin", DATA)
    server.add_fault("/late.bin", Fault.delay(30.0))
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.get(server.url("/late.bin"), timeout=(5, 0.3))


def test_fault_queue_times_forever_and_clear(server):
    server.add_file("/q.bin", DATA)
    server.add_fault("/q.bin", Fault.status(503), times=2)
    server.add_fault("/q.bin", Fault.status(502))
    assert [requests.get(server.url("/q.bin")).status_code for _ in range(4)] == [503, 503, 502, 200]
    server.add_fault("/q.bin", Fault.status(500), times=-1)
    assert [requests.get(server.url("/q.bin")).status_code for _ in range(3)] == [500, 500, 500]
    assert server.pending_faults("/q.bin") == [(Fault.status(500), -1)]
    server.clear_faults("/q.bin")
    assert requests.get(server.url("/q.bin")).status_code == 200
    server.add_fault("/q.bin", Fault.status(500), times=-1)
    server.clear_faults()
    assert requests.get(server.url("/q.bin")).status_code == 200
    with pytest.raises(ValueError):
        server.add_fault("/q.bin", Fault.status(500), times=0)


# -- redirects, statuses, records ----------------------------------------------------------


def test_redirects(server):
    server.add_file("/target.bin", DATA)
    server.add_redirect("/old.bin", "/target.bin")
    server.add_redirect("/moved.bin", server.url("/old.bin"), status=301)
    r = requests.get(server.url("/moved.bin"))
    assert r.content == DATA and [h.status_code for h in r.history] == [301, 302]
    r = requests.get(server.url("/old.bin"), allow_redirects=False)
    assert r.status_code == 302 and r.headers["Location"] == "/target.bin"
    assert server.stats("/moved.bin").statuses == [301]


def test_add_status_is_permanent(server):
    server.add_status("/missing.pdf", 404)
    server.add_status("/forbidden.pdf", 403, body=b"no", headers={"X-Reason": "policy"})
    for _ in range(2):
        r = requests.get(server.url("/missing.pdf"))
        assert r.status_code == 404 and r.content == b"<html>error page</html>"
    r = requests.get(server.url("/forbidden.pdf"))
    assert r.status_code == 403 and r.content == b"no" and r.headers["X-Reason"] == "policy"
    assert server.stats("/missing.pdf").body_bytes == 2 * len(b"<html>error page</html>")


def test_reset_stats_clears_records(server):
    server.add_file("/x.bin", DATA)
    requests.get(server.url("/x.bin"), headers={"If-Modified-Since": "garbage"})
    assert server.stats("/x.bin").conditional == 1
    server.reset_stats()
    assert server.requests == [] and server.stats("/x.bin") == PathStats()
    before = time.time()
    requests.get(server.url("/x.bin"))
    (record,) = server.requests
    assert record.time >= before - 1 and record.range is None


def test_concurrent_clients(server):
    files = {f"/c/{i}.bin": random.Random(i).randbytes(200_000) for i in range(8)}
    for path, data in files.items():
        server.add_file(path, data)
    results: dict[str, bytes] = {}

    def worker(path):
        with requests.Session() as s:
            for _ in range(3):
                results[path] = s.get(server.url(path)).content

    threads = [threading.Thread(target=worker, args=(p,)) for p in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == files
    for path, data in files.items():
        assert server.stats(path).full_bodies == 3 and server.stats(path).body_bytes == 3 * len(data)


def test_client_disconnect_is_quiet(server, capfd):
    url, _ = server.add_large_file("/big.bin", 32 << 20)
    for _ in range(3):
        with requests.get(url, stream=True) as r:
            next(r.iter_content(65536))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and server.open_connections:
        time.sleep(0.02)
    assert server.open_connections == 0  # the server noticed every disconnect and let go
    records = server.requests
    assert len(records) == 3 and not any(r.complete for r in records)
    assert all(0 < r.body_bytes < (32 << 20) for r in records)
    assert requests.get(url, headers={"Range": "bytes=-10"}).status_code == 206
    _, err = capfd.readouterr()
    assert err == ""
    assert server.errors == []


# -- large files ---------------------------------------------------------------------------


def test_large_file_64_mib(server):
    size = 64 << 20
    url, sha = server.add_large_file("/big/64.bin", size, seed=3)
    h = hashlib.sha256()
    received = 0
    with requests.get(url, stream=True) as r:
        assert r.headers["Content-Length"] == str(size)
        for chunk in r.iter_content(1 << 20):
            h.update(chunk)
            received += len(chunk)
    assert received == size and h.hexdigest() == sha
    assert r.headers["ETag"] == f'"{sha[:16]}"'
    stats = server.stats("/big/64.bin")
    assert stats.full_bodies == 1 and stats.body_bytes == size
    resp, body = fetch(server, "/big/64.bin", headers={"Range": f"bytes={size - (3 << 20) - 5}-"})
    assert resp.status == 206 and len(body) == (3 << 20) + 5


def test_large_file_content_is_deterministic_and_not_periodic(server, tmp_path):
    _, sha_a = server.add_large_file("/a", (3 << 20) + 17, seed=1)
    _, sha_b = server.add_large_file("/b", (3 << 20) + 17, seed=1)
    _, sha_c = server.add_large_file("/c", (3 << 20) + 17, seed=2)
    assert sha_a == sha_b != sha_c
    body = requests.get(server.url("/a")).content
    assert len(body) == (3 << 20) + 17 and hashlib.sha256(body).hexdigest() == sha_a
    blocks = [body[i:i + (1 << 20)] for i in range(0, 3 << 20, 1 << 20)]
    assert len(set(blocks)) == 3
    assert blocks[0][16:4096] not in blocks[1] and blocks[1][16:4096] not in blocks[2]


def test_add_file_from_source_and_lifecycle(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(DATA)
    srv = LoopbackServer()
    url = srv.add_file("/from-disk.bin", source=src)  # URL known before start
    assert url.startswith("http://127.0.0.1:")
    temp_root = srv.root
    with srv:
        assert requests.get(url).content == DATA
    assert not temp_root.exists()
    assert src.read_bytes() == DATA
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(url, timeout=2)
    with pytest.raises(ValueError):
        LoopbackServer().add_file("/x", b"1", source=src)


def test_bodies_are_stored_under_root(tmp_path):
    root = tmp_path / "served"
    with LoopbackServer(root=root) as srv:
        srv.add_file("/one.bin", b"1" * 100)
        stored = [p for p in root.rglob("*") if p.is_file()]
        assert len(stored) == 1 and stored[0].read_bytes() == b"1" * 100
        srv.set_content("/one.bin", b"2" * 100)
        stored = [p for p in root.rglob("*") if p.is_file()]
        assert len(stored) == 1 and stored[0].read_bytes() == b"2" * 100
    assert root.exists()  # a root the caller chose is left in place


# -- serving a folder ----------------------------------------------------------------------


def test_mount_serves_a_folder_safely(server, tmp_path):
    folder = tmp_path / "site"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "f.bin").write_bytes(DATA)
    (tmp_path / "secret.txt").write_text("secret")
    server.mount("/", folder)
    resp, body = fetch(server, "/sub/f.bin", headers={"Range": "bytes=-10"})
    assert resp.status == 206 and body == DATA[-10:]
    etag = resp.getheader("ETag")
    assert fetch(server, "/sub/f.bin", headers={"If-None-Match": etag})[0].status == 304
    for bad in ("/../secret.txt", "/sub/../../secret.txt", "/sub", "/%2e%2e/secret.txt"):
        raw = raw_exchange(server, f"GET {bad} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        assert raw.startswith(b"HTTP/1.1 404"), bad
        assert b"secret" not in raw


def test_command_line_serves_a_folder(tmp_path):
    folder = tmp_path / "site"
    (folder / "d").mkdir(parents=True)
    (folder / "d" / "x.bin").write_bytes(DATA)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "core"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "contentdownload.testing.server", "--root", str(folder), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        base = proc.stdout.readline().strip()
        parts = urlsplit(base)
        assert parts.scheme == "http" and parts.hostname == "127.0.0.1" and parts.port
        r = requests.get(base + "/d/x.bin", timeout=10)
        assert r.status_code == 200 and r.content == DATA and r.headers["Accept-Ranges"] == "bytes"
        r2 = requests.get(base + "/d/x.bin", headers={"Range": "bytes=10-", "If-Range": r.headers["ETag"]}, timeout=10)
        assert r2.status_code == 206 and r2.content == DATA[10:]
        assert requests.get(base + "/d/missing.bin", timeout=10).status_code == 404
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
