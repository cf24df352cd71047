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

import functools
import re
from typing import Iterable
from urllib.parse import unquote, urlsplit, urlunsplit

from contentdownload.errors import UsageError

DEFAULT_PORTS = {"http": 80, "https": 443}
ALLOWED_SCHEMES = frozenset(DEFAULT_PORTS)

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Characters that may stand unencoded in a path or query (RFC 3986 pchar, plus / and ?).
_PATH_SAFE = _UNRESERVED | frozenset("!$&'()*+,;=:@/")
_QUERY_SAFE = _PATH_SAFE | frozenset("?")
_HEX = re.compile(rb"[0-9A-Fa-f]{2}")
# A host IDNA leaves as it is: ASCII letters, digits and inner hyphens, labels of 1 to 63, no
# "--" in the 3rd and 4th places (where "xn--" and other reserved prefixes stand).
_PLAIN_LABEL = r"(?![a-z0-9]{2}--)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_PLAIN_HOST = re.compile(rf"{_PLAIN_LABEL}(?:\.{_PLAIN_LABEL})*")


def _only(safe: frozenset[str]) -> re.Pattern:
    """A pattern matching text made of ``safe`` characters only."""
    return re.compile("[" + re.escape("".join(sorted(safe))) + "]*")


#: The components :func:`_normalised` leaves as they are, by their set of safe characters.
_PLAIN = {_PATH_SAFE: _only(_PATH_SAFE), _QUERY_SAFE: _only(_QUERY_SAFE)}


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


def _normalised(text: str, safe: frozenset[str]) -> str:
    """:func:`_normalise_component`, with no work for a component of safe characters only (the usual one)."""
    return text if _PLAIN[safe].fullmatch(text) else _normalise_component(text, safe)


@functools.lru_cache(maxsize=4096)  # a job list names few hosts; IDNA encoding costs as much as the rest of a URL
def _ascii_host(host: str) -> str:
    host = host.rstrip(".").lower()
    if not host or host.startswith("[") or (len(host) <= 253 and _PLAIN_HOST.fullmatch(host)):
        return host
    import idna  # only a host that is not plain ASCII needs its 160 ms of Unicode tables

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
    return urlunsplit(_canonical_parts(url))


@functools.lru_cache(maxsize=4096)  # a job's URL is checked when its line is read, then keyed: parsed once
def _canonical_parts(url: str) -> tuple[str, str, str, str, str]:
    """The parts of :func:`canonical_url`: scheme, netloc, path, query and an empty fragment."""
    url = url.strip()
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise UsageError(f"malformed URL {redact_url(url)!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        raise UsageError(f"unsupported URL scheme {parts.scheme or '(none)'!r} in {redact_url(url)!r}: only http and https")
    if not parts.hostname:
        raise UsageError(f"URL has no host: {redact_url(url)!r}")
    host = _ascii_host(parts.hostname)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        raise UsageError(f"invalid port in URL: {redact_url(url)!r}") from None
    netloc = host if port in (None, DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    if parts.username is not None:
        userinfo = parts.username + (f":{parts.password}" if parts.password is not None else "")
        netloc = f"{userinfo}@{netloc}"
    path = _without_dot_segments(_normalised(parts.path or "/", _PATH_SAFE))
    query = _normalised(parts.query, _QUERY_SAFE)
    return scheme, netloc, path, query, ""


#: signature parameter -> the parameters of its scheme (lower case), dropped with it.
_SIGNING_SCHEMES: tuple[tuple[str, frozenset[str] | str], ...] = (
    ("x-amz-signature", "x-amz-"),  # AWS SigV4: every X-Amz-* parameter
    ("x-goog-signature", "x-goog-"),  # Google Cloud Storage V4
    ("sig", frozenset({"sig", "se", "st", "sp", "sv", "spr", "sr", "skoid", "sktid", "skt", "ske", "sks", "skv",
                       "sip", "ss", "srt", "sdd", "ses", "rscc", "rscd", "rsce", "rscl", "rsct"})),  # Azure SAS
    ("signature", frozenset({"signature", "expires", "awsaccesskeyid", "x-amz-security-token", "googleaccessid",
                             "policy", "key-pair-id"})),  # AWS v2, GCS v2, CloudFront
)


#: Parameters the configuration names as signing ones (``signing_params``), lower case: dropped
#: from identities whatever else the URL holds, and redacted. One set per process: every
#: configuration read in it adds to it (redacting too much costs nothing).
_configured: frozenset[str] = frozenset()


def add_signing_params(names: Iterable[str]) -> None:
    """Treat the query parameters ``names`` (any case) as signing parameters from now on, in this process."""
    global _configured
    _configured = _configured.union(name.lower() for name in names)


def signing_params(names: list[str]) -> frozenset[str]:
    """Which of the query parameter ``names`` sign or expire a presigned URL (compared in lower case)."""
    lower = {name.lower() for name in names}
    dropped: set[str] = set(lower & _configured)
    for trigger, members in _SIGNING_SCHEMES:
        if trigger in lower:
            dropped |= {n for n in lower if n.startswith(members)} if isinstance(members, str) else lower & members
    return frozenset(dropped)


def _param_name(pair: str) -> str:
    return _normalise_component(pair.split("=", 1)[0], _UNRESERVED).lower()


def identity_url(url: str) -> str:
    """The canonical URL without credentials and without presigned-URL signing parameters."""
    scheme, netloc, path, query, _ = _canonical_parts(url)
    netloc = netloc.rpartition("@")[2]
    if query:
        pairs = [pair for pair in query.split("&") if pair]
        drop = signing_params([_param_name(pair) for pair in pairs])
        query = "&".join(pair for pair in pairs if _param_name(pair) not in drop)
    return urlunsplit((scheme, netloc, path, query, ""))


#: Query parameters that sign a URL or carry a credential (AWS SigV4/v2, GCS, Azure SAS,
#: CloudFront), lower case; their values are never written anywhere, with or without the
#: signature beside them (redacting too much costs nothing, too little leaks a credential).
SIGNED_QUERY_PARAMS = frozenset(
    {"x-amz-signature", "x-amz-credential", "x-amz-security-token", "x-goog-signature", "x-goog-credential"}
).union(*(members for _, members in _SIGNING_SCHEMES if isinstance(members, frozenset)))
REDACTED = "REDACTED"
_AUTHORITY = re.compile(r"^(?P<head>[A-Za-z][A-Za-z0-9+.\-]*:)?//(?P<authority>[^/?#]*)")
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]*")


def _redact_query(query: str) -> str:
    pairs = []
    for pair in query.split("&"):
        name, eq, _ = pair.partition("=")
        if eq and (unquote(name).lower() in SIGNED_QUERY_PARAMS or unquote(name).lower() in _configured):
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
