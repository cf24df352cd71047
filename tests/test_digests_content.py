"""Server digest parsing and content sniffing, on the headers and bytes real servers send."""

from __future__ import annotations

import base64
import hashlib

import pytest
import requests.structures

from contentdownload.transfer import content
from contentdownload.transfer.digests import (
    BodyHasher,
    content_digests,
    first_mismatch,
    representation_digests,
    server_digests,
)

BODY = b"%PDF-1.7\n" + bytes(range(256)) * 40


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def headers(**items: str) -> requests.structures.CaseInsensitiveDict:
    return requests.structures.CaseInsensitiveDict({k.replace("_", "-"): v for k, v in items.items()})


def test_every_digest_header_is_read_with_its_scope():
    sha256, sha512, md5 = (hashlib.new(a, BODY).digest() for a in ("sha256", "sha512", "md5"))
    found = server_digests(
        headers(
            Repr_Digest=f"sha-256=:{b64(sha256)}:, sha-512=:{b64(sha512)}:, unixsum=:AAAA:",
            Content_Digest=f"sha-256=:{b64(sha256)}:",
            Digest=f"SHA-256={b64(sha256)},MD5={b64(md5)}",
            Content_MD5=b64(md5),
            x_amz_checksum_sha256=b64(sha256),
        )
    )
    assert tuple(d.label for d in found) == (
        "repr-digest:sha256",
        "repr-digest:sha512",
        "content-digest:sha256",
        "digest:sha256",
        "digest:md5",
        "content-md5:md5",
        "x-amz-checksum-sha256:sha256",
    )
    assert [d.label for d in content_digests(found)] == ["content-digest:sha256", "content-md5:md5"]  # the message body
    actual = {name: hashlib.new(name, BODY).digest() for name in ("sha256", "sha512", "md5")}
    assert first_mismatch(found, actual) is None


@pytest.mark.parametrize(
    "name,value",
    [
        ("Repr-Digest", "sha-256=notbytes"),
        ("Repr-Digest", "sha-256=:AAAA:"),  # wrong length for SHA-256
        ("Repr-Digest", "((("),
        ("Digest", "SHA-256=!!!"),
        ("Content-MD5", "short"),
        ("x-amz-checksum-sha256", "abc-3"),  # a composite multipart checksum, not a digest of the bytes
    ],
)
def test_a_malformed_digest_is_ignored(name, value):
    assert server_digests(headers(**{name.replace("-", "_"): value})) == ()


def test_one_flipped_byte_is_a_mismatch_named_by_its_header():
    good = hashlib.sha256(BODY).digest()
    found = representation_digests(server_digests(headers(Repr_Digest=f"sha-256=:{b64(good)}:")))
    flipped = bytearray(BODY)
    flipped[100] ^= 1
    bad = first_mismatch(found, {"sha256": hashlib.sha256(bytes(flipped)).digest()})
    assert bad is not None and bad.label == "repr-digest:sha256"


def test_a_partial_body_is_checked_against_its_content_digest():
    part = BODY[1000:]
    hasher = BodyHasher(server_digests(headers(Content_Digest=f"sha-512=:{b64(hashlib.sha512(part).digest())}:")))
    hasher.update(part[:10])
    hasher.update(memoryview(part)[10:])
    assert hasher.mismatch() is None
    other = BodyHasher(hasher.digests)
    other.update(BODY)
    assert other.mismatch() is not None


HTML_PAGE = b"\xef\xbb\xbf\r\n  <!DOCTYPE html><html><head><title>Sign in</title>"


@pytest.mark.parametrize(
    "expected_type,filename,url,head,rejected",
    [
        (None, "paper.pdf", "http://h/x", HTML_PAGE, "text/html"),
        (None, None, "http://h/paper.PDF?x=1", HTML_PAGE, "text/html"),
        (None, "paper.pdf", None, BODY, None),
        (None, "paper.pdf", None, b"junk\n" * 10 + BODY, None),  # a header anywhere in the first KiB
        (None, "paper.pdf", None, b"Access denied", "unknown"),
        ("pdf", "download", None, b"PK\x03\x04" + bytes(40), "application/zip"),
        ("application/pdf", "x.bin", None, BODY, None),
        ("html", "x", None, BODY, "application/pdf"),
        (None, "data.json", None, HTML_PAGE, "text/html"),
        (None, "data.json", None, b'{"a": 1}', None),
        (None, "notes.txt", None, b'{"a": 1}', None),
        (None, "feed.xml", None, b"<?xml version='1.0'?><feed/>", None),
        (None, "archive.zip", None, b"unknown bytes", None),  # nothing recognisable: no contradiction
        (None, "data.csv.gz", None, b"\x1f\x8b\x08\x00" + bytes(20), None),
        (None, "blob", "http://h/download", HTML_PAGE, None),  # nothing expected: not checked
        ("application/x-unknown", "blob.pdf", None, HTML_PAGE, None),  # an expectation with no family
    ],
)
def test_content_contradicting_the_expectation(expected_type, filename, url, head, rejected):
    expected = content.expected_family(expected_type, filename, url)
    assert content.contradiction(expected, head) == rejected
