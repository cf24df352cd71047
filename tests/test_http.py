"""HttpClient against the loopback server: redirects, credentials, retries, Retry-After; the RFC 9110 helpers."""

from __future__ import annotations

import email.utils
import socket
import threading
import time

import pytest
import requests

from contentdownload import __version__
from contentdownload.errors import Cancelled, ContentDownloadError, UnsafeRedirectError
from contentdownload.transfer.headers import ContentRange, decodable, is_strong_etag, parse_content_range, parse_retry_after
from contentdownload.transfer.http import HttpClient, failure_detail, request_failure
from contentdownload.transfer.sessions import PatientRetry
from contentdownload.testing.server import Fault, LoopbackServer


@pytest.fixture
def client():
    with HttpClient(timeout=(5.0, 10.0), retries=2, backoff_factor=0.0) as http:
        yield http


def _other_host(server: LoopbackServer, path: str) -> str:
    """The same server under another host name (``localhost`` instead of ``127.0.0.1``)."""
    return f"http://localhost:{server.port}{path}"


def test_user_agent_names_the_product_and_version(server, client):
    url = server.add_file("/ua.txt", b"hello")
    with client.get(url) as response:
        assert response.status_code == 200
    assert server.requests[-1].headers["User-Agent"] == f"contentdownload/{__version__}"


def test_tls_verification_is_on_by_default():
    http = HttpClient()
    assert http.session().verify is True
    assert HttpClient(verify=False).session().verify is False


def test_http_redirects_are_followed_and_the_final_url_exposed(server, client):
    url = server.add_file("/target.bin", b"payload")
    start = server.add_redirect("/start", "/middle")
    server.add_redirect("/middle", url, status=301)
    with client.get(start) as response:
        assert response.status_code == 200
        assert response.content == b"payload"
        assert response.url == url
    assert [r.path for r in server.requests] == ["/start", "/middle", "/target.bin"]


@pytest.mark.parametrize("location", ["file:///etc/passwd", "ftp://127.0.0.1/x", "gopher://h/1", "javascript:alert(1)"])
def test_redirect_to_a_non_http_scheme_is_refused(server, client, location):
    start = server.add_redirect("/go", location)
    with pytest.raises(UnsafeRedirectError) as info:
        client.get(start)
    assert isinstance(info.value, ContentDownloadError)
    assert request_failure(info.value) == ("failed", "unsafe_redirect")
    assert [r.path for r in server.requests] == ["/go"]


def test_authorization_is_not_forwarded_to_another_host(server, client):
    target = _other_host(server, "/elsewhere.bin")
    server.add_file("/elsewhere.bin", b"x")
    start = server.add_redirect("/auth-start", target)
    with client.get(start, {"Authorization": "Bearer s3cret"}) as response:
        assert response.status_code == 200
    first, second = server.requests
    assert first.headers["Authorization"] == "Bearer s3cret"
    assert "Authorization" not in second.headers
    assert second.headers["Host"].startswith("localhost")


def test_authorization_is_kept_on_the_same_host(server, client):
    server.add_file("/same.bin", b"x")
    start = server.add_redirect("/same-start", "/same.bin")
    with client.get(start, {"Authorization": "Bearer s3cret"}) as response:
        assert response.status_code == 200
    assert all(r.headers.get("Authorization") == "Bearer s3cret" for r in server.requests)


def test_url_credentials_are_not_forwarded_to_another_host(server, client):
    server.add_file("/landing.bin", b"x")
    server.add_redirect("/cred-start", _other_host(server, "/landing.bin"))
    url = f"http://alice:pa55@127.0.0.1:{server.port}/cred-start"
    with client.get(url) as response:
        assert response.status_code == 200
        assert "pa55" not in response.url
    first, second = server.requests
    assert first.headers["Authorization"].startswith("Basic ")
    assert "Authorization" not in second.headers


def test_at_most_max_redirects_are_followed(server):
    for i in range(5):
        server.add_redirect(f"/loop{i}", f"/loop{i + 1}")
    with HttpClient(max_redirects=3, retries=0) as http:
        with pytest.raises(requests.exceptions.TooManyRedirects) as info:
            http.get(server.url("/loop0"))
    assert request_failure(info.value) == ("failed", "too_many_redirects")
    assert len(server.requests) == 4  # the first request and three redirects


def test_a_url_with_another_scheme_is_refused_before_any_request(client):
    with pytest.raises(requests.exceptions.InvalidSchema) as info:
        client.get("file:///etc/passwd")
    assert request_failure(info.value) == ("failed", "invalid_url")


def test_retry_after_is_honoured_before_the_body(server, client):
    url = server.add_file("/busy.bin", b"finally")
    server.add_fault("/busy.bin", Fault.status(503, retry_after=1))
    with client.get(url) as response:
        assert response.status_code == 200
        assert response.content == b"finally"
    first, second = server.requests
    assert first.status == 503 and second.status == 200
    assert second.time - first.time >= 0.9


def test_429_is_retried_and_waits_go_through_the_wait_callback(server, client):
    url = server.add_file("/limited.bin", b"ok")
    server.add_fault("/limited.bin", Fault.status(429, retry_after=1))
    calls = []
    with client.waiting(lambda: calls.append(1)):
        with client.get(url) as response:
            assert response.status_code == 200
    assert len(calls) >= 2  # at least every half second of the one-second wait
    assert server.stats("/limited.bin").statuses == [429, 200]


def test_the_wait_callback_can_cancel_a_retry_wait(server, client):
    url = server.add_file("/stop.bin", b"never")
    server.add_fault("/stop.bin", Fault.status(503, retry_after=30))

    def stop():
        raise Cancelled("stop")

    with client.waiting(stop):
        with pytest.raises(Cancelled):
            client.get(url)
    assert server.stats("/stop.bin").statuses == [503]


def test_when_retries_are_spent_the_last_status_is_returned(server):
    url = server.add_status("/down", 503, body=b"<html>down</html>")
    with HttpClient(retries=2, backoff_factor=0.0) as http:
        with http.get(url) as response:
            assert response.status_code == 503
    assert server.stats("/down").requests == 3


def test_errors_that_are_not_retryable_are_returned_at_once(server, client):
    url = server.add_status("/gone", 404)
    with client.get(url) as response:
        assert response.status_code == 404
    assert server.stats("/gone").requests == 1


def test_a_close_before_the_headers_is_retried_by_the_client(server, client):
    url = server.add_file("/flaky.bin", b"data")
    server.add_fault("/flaky.bin", Fault.close_before_headers())
    with client.get(url) as response:
        assert response.content == b"data"
    assert server.stats("/flaky.bin").requests == 2


def test_connection_refused_is_retried_then_reported():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    with HttpClient(retries=1, backoff_factor=0.0, timeout=(2.0, 2.0)) as http:
        with pytest.raises(requests.exceptions.ConnectionError) as info:
            http.get(f"http://127.0.0.1:{port}/x")
    assert request_failure(info.value) == ("retry", "connection_refused")
    assert "ConnectionRefusedError" in failure_detail(info.value)


def test_each_thread_has_its_own_session(client):
    sessions = []
    threads = [threading.Thread(target=lambda: sessions.append(client.session())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(s) for s in sessions}) == 3
    assert client.session() is client.session()


def test_retry_after_is_capped():
    class FakeResponse:
        def __init__(self, value):
            self.headers = {"Retry-After": value}
            self.status = 503

    waited = []
    retry = PatientRetry(total=3, backoff_factor=0.0, max_retry_after=0.25, waiter=waited.append)
    assert retry.get_retry_after(FakeResponse("3600")) == 0.25
    assert retry.get_retry_after(FakeResponse("not a date")) is None
    retry.new(total=2).sleep(FakeResponse("3600"))
    assert waited == [0.25]


def test_parse_retry_after_seconds_and_dates():
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(" 0 ") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    ahead = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28.0 <= parse_retry_after(ahead) <= 30.0  # whole seconds, counted from now
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past


def test_a_huge_retry_after_is_capped_as_urllib3_caps_it():
    assert parse_retry_after("9" * 400) == 21600.0  # no OverflowError: six hours at most
    assert parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT") == 21600.0
    assert parse_retry_after("21599") == 21599.0


def test_parse_content_range():
    assert parse_content_range("bytes 100-199/1000") == ContentRange(100, 199, 1000)
    assert parse_content_range("bytes 100-199/1000").length == 100
    assert parse_content_range("bytes 0-9/*") == ContentRange(0, 9, None)
    assert parse_content_range("bytes */1000") == ContentRange(None, None, 1000)
    for bad in ("bytes 10-5/100", "bytes 0-100/100", "items 0-1/2", "bytes=0-1/2", "", None, "bytes */*"):
        assert parse_content_range(bad) is None, bad


def test_strong_and_weak_etags():
    assert is_strong_etag('"abc"')
    assert not is_strong_etag('W/"abc"')
    assert not is_strong_etag("abc")
    assert not is_strong_etag(None)


def test_decodable_content_codings():
    assert decodable(None) and decodable("gzip") and decodable("x-gzip, deflate")
    assert not decodable("compress") and not decodable("gzip, compress")


def _get_failure(client, url, **kwargs):
    with pytest.raises(Exception) as info:
        response = client.get(url, **kwargs)
        response.content  # noqa: B018 - read the body
    return request_failure(info.value)


def test_failures_are_named_for_what_happened(server):
    url = server.add_file("/named.bin", b"x" * 200_000)
    with HttpClient(retries=0, backoff_factor=0.0, timeout=(2.0, 0.3)) as http:
        server.add_fault("/named.bin", Fault.add_headers({"Content-Length": "5"}))
        assert _get_failure(http, url) == ("failed", "protocol_error")
        server.add_fault("/named.bin", Fault.stall(30, after=0))
        assert _get_failure(http, url) == ("retry", "read_timeout")
        server.add_fault("/named.bin", Fault.cut_after(1000, reset=True))
        assert _get_failure(http, url) == ("retry", "connection_reset")
        server.add_fault("/named.bin", Fault.cut_after(1000))
        assert _get_failure(http, url) == ("retry", "connection_lost")


def test_the_engine_sends_the_header_fields_requests_sends(server):
    """What the event-loop engine sends comes from the client, not from a requests session it no longer builds."""
    from contentdownload.transfer.engine import new_event_loop

    server.add_file("/a", b"x" * 10)
    client = HttpClient(headers={"X-Token": "t", "user-agent": "mine/1", "ACCEPT": "application/pdf"})
    client.get(server.url("/a")).close()
    by_requests = server.requests[-1].headers

    async def engine_request():
        engine = client.new_engine(per_host=1)
        exchange = await engine.open(server.url("/a"), {})  # the client's headers are the engine's own
        exchange.abandon()
        await engine.aclose()

    loop = new_event_loop()
    try:
        loop.run_until_complete(engine_request())
    finally:
        loop.close()
    by_engine = server.requests[-1].headers
    assert len(server.requests) == 2
    assert {k.lower(): v for k, v in by_engine.items()} == {k.lower(): v for k, v in by_requests.items()}
    assert by_engine["User-Agent"] == "mine/1" and by_engine["Accept"] == "application/pdf"


def test_a_plugin_importing_the_transport_error_tuple_still_gets_it():
    from contentdownload.transfer.status import TRANSPORT_ERRORS, transport_errors

    assert TRANSPORT_ERRORS == transport_errors()
    assert issubclass(requests.exceptions.ChunkedEncodingError, TRANSPORT_ERRORS)


def test_a_plugin_importing_header_helpers_from_the_client_module_still_gets_them():
    from contentdownload.transfer import headers
    from contentdownload.transfer.http import content_length, parse_content_range  # where they were documented before

    assert content_length is headers.content_length and parse_content_range is headers.parse_content_range
    with pytest.raises(ImportError):
        from contentdownload.transfer.http import no_such_helper  # noqa: F401
