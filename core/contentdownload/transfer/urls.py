"""URL canonicalisation shared by job keys and the canary bucket.

Two URLs that name the same resource over HTTP canonicalise to the same string:
scheme and host lower-cased, IDN hosts in their ASCII (punycode) form, the default
port dropped, the fragment dropped, percent-encoding normalised (unreserved
characters decoded, hex digits upper-cased, unsafe characters encoded), an empty path
made ``/``. The order of query parameters is kept: servers may depend on it.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit, urlunsplit

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


def canonical_url(url: str) -> str:
    """Return the canonical form of an http(s) URL; raise :class:`UsageError` for anything else."""
    shown = redact_url(url.strip())
    try:
        parts = urlsplit(url.strip())
    except ValueError as exc:
        raise UsageError(f"malformed URL {shown!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        raise UsageError(f"unsupported URL scheme {parts.scheme or '(none)'!r} in {shown!r}: only http and https")
    if not parts.hostname:
        raise UsageError(f"URL has no host: {shown!r}")
    host = _ascii_host(parts.hostname)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"invalid port in URL: {shown!r}") from None
    netloc = host if port in (None, DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    if parts.username is not None:
        userinfo = parts.username + (f":{parts.password}" if parts.password is not None else "")
        netloc = f"{userinfo}@{netloc}"
    path = _normalise_component(parts.path or "/", _PATH_SAFE)
    query = _normalise_component(parts.query, _QUERY_SAFE)
    return urlunsplit((scheme, netloc, path, query, ""))


#: Query parameters that sign a URL or carry a credential (AWS SigV4/v2, GCS, Azure SAS,
#: CloudFront); compared case-insensitively. Their values are never written anywhere.
SIGNED_QUERY_PARAMS = frozenset(
    name.lower()
    for name in (
        "X-Amz-Signature", "X-Amz-Credential", "X-Amz-Security-Token", "Signature", "Expires", "AWSAccessKeyId",
        "X-Goog-Signature", "X-Goog-Credential",
        "sig", "se", "st", "sp", "sv", "skoid", "sktid", "skt", "ske", "sks", "skv",
        "Policy", "Key-Pair-Id",
    )
)
REDACTED = "REDACTED"
_AUTHORITY = re.compile(r"^(?P<head>[A-Za-z][A-Za-z0-9+.\-]*:)?//(?P<authority>[^/?#]*)")
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]*")


def _redact_query(query: str) -> str:
    pairs = []
    for pair in query.split("&"):
        name, eq, _ = pair.partition("=")
        if eq and unquote(name).lower() in SIGNED_QUERY_PARAMS:
            pair = f"{name}={REDACTED}"
        pairs.append(pair)
    return "&".join(pairs)


def redact_url(url: str) -> str:
    """The URL without userinfo and with signing query values replaced, for every place a URL is written.

    Works on the text alone and never raises, so a malformed or rejected URL is redacted too.
    """
    match = _AUTHORITY.match(url)
    if match and "@" in match["authority"]:
        host = match["authority"].rpartition("@")[2]
        url = f"{match['head'] or ''}//{host}{url[match.end():]}"
    rest, hash_, fragment = url.partition("#")
    base, question, query = rest.partition("?")
    if not question:
        return url
    return f"{base}?{_redact_query(query)}{hash_}{fragment}"


def redact_text(text: str) -> str:
    """``text`` with every URL in it redacted (for error messages that quote a URL)."""
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)
