"""URL canonicalisation shared by job keys and the canary bucket.

Two URLs that name the same resource over HTTP canonicalise to the same string:
scheme and host lower-cased, IDN hosts in their ASCII (punycode) form, the default
port dropped, the fragment dropped, percent-encoding normalised (unreserved
characters decoded, hex digits upper-cased, unsafe characters encoded), an empty path
made ``/``, dot segments removed (RFC 3986 section 5.2.4). The order of query parameters
is kept: servers may depend on it.

A job's *identity* (:func:`identity_url`) is its canonical URL without credentials and
without the signing and expiry parameters of presigned URLs (AWS SigV4 and v2, Google
Cloud Storage, Azure SAS, CloudFront), so a re-signed URL names the same job. A group of
parameters is dropped only when its signature parameter is present: ``st`` or ``Expires``
alone may mean something else to an ordinary server.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

import idna

from contentdownload.errors import UsageError

DEFAULT_PORTS = {"http": 80, "https": 443}
ALLOWED_SCHEMES = frozenset(DEFAULT_PORTS)

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Characters that may stand unencoded in a path or query (RFC 3986 pchar, plus / and ?).
_PATH_SAFE = _UNRESERVED | frozenset("!$&'()*+,;=:@/")
_QUERY_SAFE = _PATH_SAFE | frozenset("?")
_HEX = re.compile(rb"[0-9A-Fa-f]{2}")


def _normalise_component(text: str, safe: frozenset[str]) -> str:
    raw = text.encode("utf-8", "surrogatepass")
    out: list[str] = []
    i = 0
    while i < len(raw):
        byte = raw[i]
        if byte == 0x25 and i + 2 < len(raw) and _HEX.fullmatch(raw[i + 1 : i + 3]):
            value = int(raw[i + 1 : i + 3], 16)
            out.append(chr(value) if chr(value) in _UNRESERVED else f"%{value:02X}")
            i += 3
            continue
        char = chr(byte)
        out.append(char if byte < 0x80 and char in safe else f"%{byte:02X}")
        i += 1
    return "".join(out)


def _ascii_host(host: str) -> str:
    host = host.rstrip(".").lower()
    if not host or host.startswith("["):
        return host
    try:
        return idna.encode(host, uts46=True).decode("ascii")
    except idna.IDNAError:
        try:
            return host.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise UsageError(f"invalid host name in URL: {host!r}") from exc


def _without_dot_segments(path: str) -> str:
    if "/." not in path:
        return path  # the common case; rfc3986 costs 20 ms to import
    from rfc3986 import normalizers

    return normalizers.remove_dot_segments(path)


def canonical_url(url: str) -> str:
    """Return the canonical form of an http(s) URL; raise :class:`UsageError` for anything else."""
    try:
        parts = urlsplit(url.strip())
    except ValueError as exc:  # an unclosed IPv6 bracket, for instance
        raise UsageError(f"malformed URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        raise UsageError(f"unsupported URL scheme {parts.scheme or '(none)'!r} in {url!r}: only http and https")
    if not parts.hostname:
        raise UsageError(f"URL has no host: {url!r}")
    host = _ascii_host(parts.hostname)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"invalid port in URL: {url!r}") from exc
    netloc = host if port in (None, DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    if parts.username is not None:
        userinfo = parts.username + (f":{parts.password}" if parts.password is not None else "")
        netloc = f"{userinfo}@{netloc}"
    path = _without_dot_segments(_normalise_component(parts.path or "/", _PATH_SAFE))
    query = _normalise_component(parts.query, _QUERY_SAFE)
    return urlunsplit((scheme, netloc, path, query, ""))


#: signature parameter -> the parameters of its scheme (lower case), dropped with it.
_SIGNING_SCHEMES: tuple[tuple[str, frozenset[str] | str], ...] = (
    ("x-amz-signature", "x-amz-"),  # AWS SigV4: every X-Amz-* parameter
    ("x-goog-signature", "x-goog-"),  # Google Cloud Storage V4
    ("sig", frozenset({"sig", "se", "st", "sp", "sv", "spr", "sr", "skoid", "sktid", "skt", "ske", "sks", "skv",
                       "sip", "ss", "srt", "sdd", "ses", "rscc", "rscd", "rsce", "rscl", "rsct"})),  # Azure SAS
    ("signature", frozenset({"signature", "expires", "awsaccesskeyid", "x-amz-security-token", "googleaccessid",
                             "policy", "key-pair-id"})),  # AWS v2, GCS v2, CloudFront
)


def signing_params(names: list[str]) -> frozenset[str]:
    """Which of the query parameter ``names`` sign or expire a presigned URL (compared in lower case)."""
    lower = {name.lower() for name in names}
    dropped: set[str] = set()
    for trigger, members in _SIGNING_SCHEMES:
        if trigger in lower:
            dropped |= {n for n in lower if n.startswith(members)} if isinstance(members, str) else lower & members
    return frozenset(dropped)


def _param_name(pair: str) -> str:
    return _normalise_component(pair.split("=", 1)[0], _UNRESERVED).lower()


def identity_url(url: str) -> str:
    """The canonical URL without credentials and without presigned-URL signing parameters."""
    parts = urlsplit(canonical_url(url))
    netloc = parts.netloc.rpartition("@")[2]
    pairs = [pair for pair in parts.query.split("&") if pair]
    drop = signing_params([_param_name(pair) for pair in pairs])
    query = "&".join(pair for pair in pairs if _param_name(pair) not in drop)
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def redact_url(url: str) -> str:
    """The URL without credentials, for logs and records."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    netloc = parts.hostname or ""
    if parts.port is not None:
        netloc = f"{netloc}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
