"""URL canonicalisation and deterministic job keys."""

from __future__ import annotations

import subprocess
import sys

import pytest

from contentdownload.errors import UsageError
from contentdownload.jobs.keys import identity_key, operation_key, path_key
from contentdownload.hooks.model import Job, JobKeyContext
from contentdownload.transfer.urls import canonical_url, redact_url, identity_url
from contentdownload_legacy.job_key import job_key as legacy_job_key
from contentdownload_streaming.job_key import job_key as streaming_job_key


@pytest.mark.parametrize(
    "url, expected",
    [
        ("HTTP://Example.COM/Path", "http://example.com/Path"),
        ("http://example.com:80/a", "http://example.com/a"),
        ("https://example.com:443/a", "https://example.com/a"),
        ("https://example.com:8443/a", "https://example.com:8443/a"),
        ("http://example.com/a#section-2", "http://example.com/a"),
        ("http://example.com", "http://example.com/"),
        ("http://example.com/%7euser/%41%62", "http://example.com/~user/Ab"),
        ("http://example.com/a%2fb", "http://example.com/a%2Fb"),
        ("http://example.com/a b", "http://example.com/a%20b"),
        ("http://example.com/caf\u00e9", "http://example.com/caf%C3%A9"),
        ("http://example.com/caf%c3%a9", "http://example.com/caf%C3%A9"),
        ("http://example.com/?b=2&a=1", "http://example.com/?b=2&a=1"),
        ("http://example.com/?q=a%20b&q=%7e", "http://example.com/?q=a%20b&q=~"),
        ("http://B\u00fccher.example/x", "http://xn--bcher-kva.example/x"),
        ("http://xn--bcher-kva.example/x", "http://xn--bcher-kva.example/x"),
        ("http://example.com./x", "http://example.com/x"),
        ("http://[::1]:80/x", "http://[::1]/x"),
        ("http://example.com/100%", "http://example.com/100%25"),
    ],
)
def test_canonical_url(url, expected):
    assert canonical_url(url) == expected


@pytest.mark.parametrize("url", ["ftp://example.com/x", "file:///etc/passwd", "javascript:alert(1)", "example.com/x", "http:///nohost"])
def test_canonical_url_refuses_other_schemes_and_hostless(url):
    with pytest.raises(UsageError):
        canonical_url(url)


def test_query_order_is_kept_not_sorted():
    assert canonical_url("http://h/?z=1&a=2") != canonical_url("http://h/?a=2&z=1")


def test_streaming_key_ignores_url_spelling_but_not_identity():
    a = Job(urls=("HTTP://Example.com:80/paper.pdf#page=2",), work_id="W1")
    b = Job(urls=("http://example.com/paper.pdf",), work_id="W1")
    c = Job(urls=("http://example.com/paper.pdf",), work_id="W2")
    ka = streaming_job_key(JobKeyContext(job=a, relative_path="paper.pdf"))
    kb = streaming_job_key(JobKeyContext(job=b, relative_path="other-name.pdf"))
    kc = streaming_job_key(JobKeyContext(job=c, relative_path="paper.pdf"))
    assert ka == kb
    assert ka.key != kc.key
    assert ka.scheme == "streaming-v1" and ka.canonical_url == "http://example.com/paper.pdf"
    assert len(ka.key) == 64 and int(ka.key, 16) >= 0


def test_legacy_key_is_the_output_path():
    a = legacy_job_key(JobKeyContext(job=Job("http://a/x"), relative_path="docs/x.pdf"))
    b = legacy_job_key(JobKeyContext(job=Job("http://b/y"), relative_path="docs/x.pdf"))
    assert a == b and a.scheme == "legacy-v1"
    assert a.key == path_key("docs/x.pdf") != path_key("docs/y.pdf")


def test_keys_are_the_same_in_another_process():
    job = Job(urls=("http://Example.com/a?x=1",), work_id="w", artifact_id="pdf")
    code = (
        "from contentdownload.jobs.keys import identity_key; from contentdownload.hooks.model import Job;"
        "print(identity_key(Job(urls=('http://Example.com/a?x=1',), work_id='w', artifact_id='pdf'))[0])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == identity_key(job)[0]


def test_operation_keys_differ_per_operation():
    assert operation_key("k", "transfer") != operation_key("k", "finalize")
    assert operation_key("k", "manifest") == operation_key("k", "manifest")


def test_redact_url_drops_credentials():
    assert redact_url("https://user:secret@h.example/x?y=1") == "https://h.example/x?y=1"
    assert redact_url("https://h.example/x") == "https://h.example/x"


@pytest.mark.parametrize(
    "a,b",
    [
        ("http://h/./a.pdf", "http://h/a.pdf"),
        ("http://h/x/../a.pdf", "http://H:80/a.pdf"),
        ("https://bucket.s3.amazonaws.com/k.pdf?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F20261201"
         "&X-Amz-Date=20261201T000000Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host&X-Amz-Signature=abc",
         "https://bucket.s3.amazonaws.com/k.pdf?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F20261202"
         "&X-Amz-Date=20261202T000000Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host&X-Amz-Signature=def"),
        ("https://a.blob.core.windows.net/c/b.pdf?sv=2022-11-02&se=2026-12-01&sp=r&sig=AAA",
         "https://a.blob.core.windows.net/c/b.pdf?sv=2022-11-02&se=2026-12-09&sp=r&sig=BBB"),
        ("https://d.cloudfront.net/p.pdf?Expires=1&Signature=x&Key-Pair-Id=K", "https://d.cloudfront.net/p.pdf"),
        ("https://s.example/o?AWSAccessKeyId=A&Expires=1&Signature=s&versionId=3", "https://s.example/o?versionId=3"),
        ("https://storage.googleapis.com/b/o?X-Goog-Signature=1&X-Goog-Date=2", "https://storage.googleapis.com/b/o"),
        ("https://alice:pw@h/a.pdf", "https://h/a.pdf"),
    ],
)
def test_the_same_resource_has_one_identity(a, b):
    assert identity_url(a) == identity_url(b)
    assert identity_key(Job(urls=(a,))) == identity_key(Job(urls=(b,)))


@pytest.mark.parametrize(
    "a,b",
    [
        ("http://h/a.pdf?st=1", "http://h/a.pdf?st=2"),  # no SAS signature: st is the server's business
        ("http://h/a.pdf?Expires=1", "http://h/a.pdf?Expires=2"),
        ("http://h/a.pdf?page=1", "http://h/a.pdf?page=2"),
    ],
)
def test_parameters_that_sign_nothing_stay_in_the_identity(a, b):
    assert identity_url(a) != identity_url(b)


def test_the_identity_keeps_no_secret():
    assert "pw" not in identity_url("https://alice:pw@h/a.pdf?X-Amz-Signature=topsecret&X-Amz-Credential=AKIA")
    assert "topsecret" not in identity_url("https://h/a.pdf?X-Amz-Signature=topsecret")


@pytest.mark.parametrize("host", [
    "example.com", "EXAMPLE.com.", "127.0.0.1", "a-b.c-d", "ab--cd.example", "xn--nxasmq6b.com",
    "-lead.example", "trail-.example", "a_b.example", "a" * 63 + ".com", "a" * 64 + ".com",
    ".".join(["a" * 60] * 5), "bücher.example", "ＥＸＡＭＰＬＥ.com", "faß.de",
])
def test_a_host_is_written_as_idna_writes_it_whether_or_not_it_is_plain(host):
    import idna

    try:
        expected = idna.encode(host.rstrip(".").lower(), uts46=True).decode("ascii")
    except idna.IDNAError:
        try:
            expected = host.rstrip(".").lower().encode("idna").decode("ascii")
        except UnicodeError:
            expected = None
    try:
        written = canonical_url(f"http://{host}/").split("/")[2]
    except UsageError:
        written = None
    assert written == expected
