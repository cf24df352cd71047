"""Digests a server offers for what it sends, and checking bytes against them.

Read from a response's headers:

- RFC 9530 ``Repr-Digest`` (the whole representation) and ``Content-Digest`` (this message's
  body: on a 206, only the partial body), structured-field dictionaries parsed with
  ``http-sfv``; ``sha-256`` and ``sha-512`` are used, other algorithms are ignored.
- RFC 3230 ``Digest`` (``SHA-256=<base64>``, ``SHA-512=``, ``MD5=``): the representation.
- ``Content-MD5`` (RFC 1864): this message's body (on a 206, the partial body), as older
  servers send it.
- S3's ``x-amz-checksum-sha256`` (a full-object checksum; a composite ``...-N`` value is not a
  digest of the bytes and is ignored).

A :class:`ServerDigest` names the header it came from, so a manifest row can say which digest
verified a file. Nothing here trusts a header that does not parse: a malformed value is ignored,
as if the server had sent none (a digest that parses and does not match fails the job).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Iterable, Mapping

import attrs

#: What to send so a server that can offers a representation digest (RFC 9530 section 4).
WANT_REPR_DIGEST = "sha-256=10"

# RFC 9530 algorithm names (and RFC 3230's, upper-cased) -> hashlib names.
_SFV_ALGORITHMS = {"sha-256": "sha256", "sha-512": "sha512"}
_RFC3230_ALGORITHMS = {"SHA-256": "sha256", "SHA-512": "sha512", "MD5": "md5"}

REPRESENTATION = "representation"
CONTENT = "content"


@attrs.frozen(kw_only=True)
class ServerDigest:
    """One digest a response claims: over the whole representation, or over this body only."""

    source: str  # the header's name in lower case, e.g. "repr-digest"
    algorithm: str  # a hashlib name: "sha256", "sha512", "md5"
    value: bytes
    scope: str  # REPRESENTATION or CONTENT

    @property
    def label(self) -> str:
        """How a manifest row names it: ``repr-digest:sha256``."""
        return f"{self.source}:{self.algorithm}"


def server_digests(headers: Mapping[str, str]) -> tuple[ServerDigest, ...]:
    """Every digest in ``headers`` (a case-insensitive mapping) that parses."""
    found: list[ServerDigest] = []
    found += _sfv_digests(headers.get("repr-digest"), "repr-digest", REPRESENTATION)
    found += _sfv_digests(headers.get("content-digest"), "content-digest", CONTENT)
    found += _rfc3230_digests(headers.get("digest"))
    found += _base64_digest(headers.get("content-md5"), "content-md5", "md5", scope=CONTENT)
    checksum = headers.get("x-amz-checksum-sha256")
    if checksum and "-" not in checksum:
        found += _base64_digest(checksum, "x-amz-checksum-sha256", "sha256")
    return tuple(found)


def _sfv_digests(value: str | None, source: str, scope: str) -> list[ServerDigest]:
    if not value:
        return []
    import http_sfv  # only a server that sends a structured digest field pays its import

    field = http_sfv.Dictionary()
    try:
        field.parse(value.encode("latin-1"))
    except (ValueError, UnicodeEncodeError):
        return []
    out = []
    for name, member in field.items():
        algorithm = _SFV_ALGORITHMS.get(name)
        digest = getattr(member, "value", None)
        if algorithm and isinstance(digest, bytes) and len(digest) == hashlib.new(algorithm).digest_size:
            out.append(ServerDigest(source=source, algorithm=algorithm, value=digest, scope=scope))
    return out


def _rfc3230_digests(value: str | None) -> list[ServerDigest]:
    out: list[ServerDigest] = []
    for part in (value or "").split(","):
        name, sep, encoded = part.strip().partition("=")
        algorithm = _RFC3230_ALGORITHMS.get(name.strip().upper())
        if sep and algorithm:
            out += _base64_digest(encoded.strip(), "digest", algorithm)
    return out


def _base64_digest(value: str | None, source: str, algorithm: str, scope: str = REPRESENTATION) -> list[ServerDigest]:
    if not value:
        return []
    try:
        digest = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        return []
    if len(digest) != hashlib.new(algorithm).digest_size:
        return []
    return [ServerDigest(source=source, algorithm=algorithm, value=digest, scope=scope)]


def representation_digests(digests: Iterable[ServerDigest]) -> tuple[ServerDigest, ...]:
    return tuple(d for d in digests if d.scope == REPRESENTATION)


def content_digests(digests: Iterable[ServerDigest]) -> tuple[ServerDigest, ...]:
    return tuple(d for d in digests if d.scope == CONTENT)


def first_mismatch(digests: Iterable[ServerDigest], actual: Mapping[str, bytes]) -> ServerDigest | None:
    """The first of ``digests`` that ``actual`` (hashlib name -> digest) contradicts, else ``None``."""
    for digest in digests:
        if actual[digest.algorithm] != digest.value:
            return digest
    return None


class BodyHasher:
    """Hashes one response body for the algorithms its ``Content-Digest`` names."""

    def __init__(self, digests: Iterable[ServerDigest]):
        self.digests = tuple(digests)
        self._hashers = {d.algorithm: hashlib.new(d.algorithm) for d in self.digests}

    def update(self, data: bytes | memoryview) -> None:
        for hasher in self._hashers.values():
            hasher.update(data)

    def mismatch(self) -> ServerDigest | None:
        return first_mismatch(self.digests, {name: h.digest() for name, h in self._hashers.items()})
