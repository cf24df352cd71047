"""What a body is, judged by its first bytes, and whether that contradicts what the job expects.

Publishers answer a request for ``paper.pdf`` with a login or error page often enough that a
downloader must look at the bytes: the ``Content-Type`` header is not evidence (an HTML page
labelled ``application/pdf`` is common, and a real PDF labelled ``application/octet-stream`` is
too). Binary formats are recognised by their magic bytes with ``filetype``; the text formats a
magic-bytes library does not cover (HTML, XML, JSON) by their opening characters, here.

The check rejects only a contradiction: a body whose detected family is not the family the job
expects (an HTML page for a PDF, a ZIP for a PDF, a PDF where HTML is expected), or, for a PDF,
a body with no ``%PDF-`` header in its first KiB (PDF readers accept the header anywhere there).
A job that expects nothing in particular (no ``expected_type``, no telling extension) is not
checked, and neither is a body of a family the job's expectation does not name.
"""

from __future__ import annotations

import mimetypes
import posixpath
import urllib.parse

import filetype

#: How many leading bytes the detectors look at.
SNIFF_BYTES = 1024

PDF, HTML, XML, JSON, ZIP, GZIP, IMAGE, TEXT = "pdf", "html", "xml", "json", "zip", "gzip", "image", "text"
FAMILIES = (PDF, HTML, XML, JSON, ZIP, GZIP, IMAGE, TEXT)
_TEXT_FAMILIES = frozenset({HTML, XML, JSON, TEXT})
_HTML_OPENINGS = (b"<!doctype html", b"<html", b"<head", b"<body", b"<title", b"<script", b"<meta", b"<!--")


def family_of(media_type: str | None) -> str | None:
    """The family of a media type (``application/pdf`` -> ``pdf``), or ``None`` if it has none here."""
    if not media_type:
        return None
    mime = media_type.split(";", 1)[0].strip().lower()
    if mime in FAMILIES:
        return mime
    if mime == "application/pdf":
        return PDF
    if mime in ("text/html", "application/xhtml+xml"):
        return HTML
    if mime.endswith("/xml") or mime.endswith("+xml"):
        return XML
    if mime.endswith("/json") or mime.endswith("+json"):
        return JSON
    if mime in ("application/zip", "application/epub+zip", "application/java-archive") or "openxmlformats" in mime:
        return ZIP
    if mime in ("application/gzip", "application/x-gzip"):
        return GZIP
    if mime.startswith("image/"):
        return IMAGE
    if mime.startswith("text/"):
        return TEXT
    return None


def expected_family(expected_type: str | None, filename: str | None, url: str | None) -> str | None:
    """What the job expects: its ``expected_type`` if given, else its file name's or URL's extension."""
    if expected_type:
        return family_of(expected_type)
    for name in (filename, urllib.parse.urlsplit(url or "").path):
        if name:
            media_type, encoding = mimetypes.guess_type(posixpath.basename(name), strict=False)
            family = GZIP if encoding == "gzip" else family_of(media_type)
            if family:
                return family
    return None


def detect(head: bytes) -> str | None:
    """The media type the first bytes show, or ``None`` when they show nothing recognisable."""
    kind = filetype.guess(head) if head else None
    if kind is not None:
        return kind.mime
    if b"%PDF-" in head[:SNIFF_BYTES]:
        return "application/pdf"
    text = head[:SNIFF_BYTES].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"<?xml"):
        return "text/html" if b"<html" in text else "application/xml"
    if text.startswith(_HTML_OPENINGS):
        return "text/html"
    if text[:1] in (b"{", b"["):
        return "application/json"
    return None


def contradiction(expected: str | None, head: bytes, detected: str | None = None) -> str | None:
    """The detected media type when ``head`` contradicts the ``expected`` family, else ``None``.

    ``detected``: :func:`detect` of ``head``, when the caller has it already.
    """
    if expected is None:
        return None
    detected = detected or detect(head)
    found = family_of(detected)
    if expected == PDF and found != PDF:
        return detected or "unknown"
    if found is None or found == expected:
        return None
    if found in _TEXT_FAMILIES and expected in _TEXT_FAMILIES and HTML not in (found, expected):
        return None  # JSON or XML saved as .txt: a text family, not an error page
    if found == HTML and expected == XML:
        return None  # XHTML is XML
    return detected
