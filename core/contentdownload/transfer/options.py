"""What every request of a run carries, from the ``[run]`` settings: headers, cookies, proxy, TLS trust, rates.

TLS trust, first match wins: ``ca_bundle`` (``--ca-bundle``), ``verify_tls = false``
(``--insecure``), then the environment's ``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE`` and
``SSL_CERT_FILE``, then certifi's bundle. The proxy, when set, is used for http and
https and beats ``HTTP_PROXY``/``HTTPS_PROXY``; without it requests reads those
variables (and ``NO_PROXY``) and ``~/.netrc`` as usual.
"""

from __future__ import annotations

import http.cookiejar
import os
import ssl
from pathlib import Path
from typing import Any, Mapping

from contentdownload.errors import UsageError
from contentdownload.records.log import get_logger

log = get_logger(__name__)

#: Environment variables naming a CA bundle, in the order they are honoured.
CA_BUNDLE_VARS = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE")
#: The one line the CLI prints when certificates are not checked.
INSECURE_WARNING = "contentdownload: warning: TLS certificates are not verified (--insecure): anyone on the path can read and change the downloads"


def parse_headers(lines: tuple[str, ...]) -> dict[str, str]:
    """``Name: value`` lines (validated by the config schema) as a dict; a later line for a name wins."""
    headers: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip()] = value.strip()
    return headers


def tls_verify(settings: Any, environ: Mapping[str, str]) -> bool | str:
    """``verify`` for requests: a CA bundle path, ``False`` (not checked) or ``True`` (certifi's bundle)."""
    if settings.ca_bundle:
        path = Path(settings.ca_bundle).expanduser()
        if not path.is_file():
            raise UsageError(f"--ca-bundle: no such file: {settings.ca_bundle}")
        return str(path)
    if not settings.verify_tls:
        return False
    return next((environ[var] for var in CA_BUNDLE_VARS if environ.get(var, "").strip()), True)


def ssl_context(verify: bool | str) -> ssl.SSLContext:
    """The TLS context of the event-loop engine for :func:`tls_verify`'s answer (what requests does with it).

    A CA bundle path (a file, or a folder of hashed certificates), ``False``: certificates
    and host names not checked, ``True``: certifi's bundle.
    """
    if verify is False:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    if verify is True:
        import certifi

        verify = certifi.where()
    if os.path.isdir(verify):
        return ssl.create_default_context(capath=verify)
    return ssl.create_default_context(cafile=verify)


def cookie_jar(settings: Any) -> http.cookiejar.CookieJar | None:
    """The cookies of ``cookie_jar`` (a Netscape cookie file) and ``cookies`` (``name=value`` for every host)."""
    if not settings.cookie_jar and not settings.cookies:
        return None
    import requests.cookies  # cookies go through requests: the engine never carries a run that has them

    jar = requests.cookies.RequestsCookieJar()
    if settings.cookie_jar:
        netscape = http.cookiejar.MozillaCookieJar()
        try:
            netscape.load(str(Path(settings.cookie_jar).expanduser()), ignore_discard=True, ignore_expires=True)
        except FileNotFoundError:
            raise UsageError(f"--cookie-jar: no such file: {settings.cookie_jar}") from None
        except (OSError, http.cookiejar.LoadError) as exc:
            raise UsageError(f"--cookie-jar: cannot read {settings.cookie_jar} as a Netscape cookie file: {exc}") from None
        for cookie in netscape:
            if cookie.expires == 0:  # curl writes session cookies with expiry 0
                cookie.expires, cookie.discard = None, True
        jar.update(netscape)
    for text in settings.cookies:
        for pair in filter(None, (p.strip() for p in text.split(";"))):
            name, _, value = pair.partition("=")
            jar.set_cookie(requests.cookies.create_cookie(name.strip(), value.strip()))
    return jar


def client_options(settings: Any, environ: Mapping[str, str]) -> dict[str, Any]:
    """Keyword arguments of :class:`~contentdownload.transfer.http.HttpClient` for these settings."""
    verify = tls_verify(settings, environ)
    if verify is False:
        # The CLI prints INSECURE_WARNING once instead of urllib3's warning on every request.
        import urllib3

        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        log.info("tls_verification_off")
    return {
        "verify": verify,
        "headers": parse_headers(settings.headers),
        "user_agent": settings.user_agent,
        "cookies": cookie_jar(settings),
        "proxies": {"http": settings.proxy, "https": settings.proxy} if settings.proxy else {},
        "host_rate": settings.host_rate,
        "limit_rate": settings.limit_rate,
    }
