"""The error tree.

Every error the library raises on purpose derives from :class:`ContentDownloadError`
and, like requests' and attrs' errors, also from the nearest builtin, so callers can
catch either ``ContentDownloadError`` or the builtin they already expect.
"""

from __future__ import annotations

import errno
import http.client


class ContentDownloadError(Exception):
    """Base of every error raised on purpose by contentdownload."""


class UsageError(ContentDownloadError, ValueError):
    """Bad flags, bad config or a bad input file, found before any download (CLI exit 2)."""


class ConfigError(UsageError):
    """A config file that cannot be read, has an unknown key or a value of the wrong type."""


class UnknownPluginError(UsageError, LookupError):
    """A plugin or hook name that is not installed; the message lists what is and the closest match."""


class PluginLoadError(ContentDownloadError, ImportError):
    """A plugin failed to import or failed validation, and strict loading was asked for."""


class DuplicatePluginError(PluginLoadError):
    """Two distributions register a plugin under the same name."""


class NoPluginAnsweredError(ContentDownloadError, RuntimeError):
    """Every plugin in a hook's chain declined or failed; ``attempts`` says who and why."""

    def __init__(self, hook: str, attempts: list[tuple[str, str]]):
        self.hook = hook
        self.attempts = attempts
        detail = "; ".join(f"{name}: {why}" for name, why in attempts) or "no plugin implements it"
        super().__init__(f"no plugin answered hook {hook!r} ({detail})")


class JobAbort(ContentDownloadError, RuntimeError):
    """Stops one job without counting as a plugin fault: the dispatcher never falls back on it."""


class LeaseLostError(JobAbort):
    """This worker's lease on a job was taken over (its epoch is stale); it must not finalize."""


class Cancelled(JobAbort):
    """The run was interrupted (Ctrl-C); the job's part is kept for a later resume."""


class UnsafeRedirectError(ContentDownloadError, ValueError):
    """A server redirected to a URL the HTTP client refuses to follow (a scheme other than http or https).

    ``location`` is the refused target with any credentials removed.
    """

    def __init__(self, message: str, location: str | None = None):
        self.location = location
        super().__init__(message)


class TooSlowError(ContentDownloadError, TimeoutError):
    """A transfer attempt broke a speed limit: ``reason`` is ``too_slow`` (under ``--low-speed-limit``
    bytes a second for ``--low-speed-time`` seconds) or ``max_time`` (longer than ``--max-time``).

    A transport error like a read timeout: the attempt ends as ``retry`` and its part is kept.
    """

    def __init__(self, message: str, reason: str = "too_slow"):
        self.reason = reason
        super().__init__(message)


class TransportError(ContentDownloadError, OSError):
    """A request of the event-loop engine (:mod:`contentdownload.transfer.engine`) failed.

    ``reason`` is the short reason a result records, the one
    :func:`~contentdownload.transfer.http.request_failure` gives the synchronous path's error.
    """

    reason = "connection_error"


class EngineConnectError(TransportError, ConnectionError):
    """No connection could be opened (refused, unreachable, TLS handshake failed); the cause is chained."""

    def __init__(self, message: str, reason: str = "connection_error"):
        self.reason = reason
        super().__init__(message)


class EngineConnectTimeout(TransportError, TimeoutError):
    """The connection was not open within the connect timeout."""

    reason = "connect_timeout"


class EngineReadTimeout(TransportError, TimeoutError):
    """No byte of the headers, or of the body's next block, came within the read timeout."""

    reason = "read_timeout"


class EngineConnectionLost(TransportError, ConnectionError):
    """The server closed the connection before the response's headers were complete."""

    reason = "connection_lost"


class EngineConnectionReset(EngineConnectionLost, ConnectionResetError):
    """The server reset the connection (RST)."""

    reason = "connection_reset"


class EngineIncompleteBody(EngineConnectionLost, http.client.IncompleteRead):
    """The connection ended before the body did: shorter than its ``Content-Length``, or a chunked body cut mid-way.

    ``partial`` is the count of body bytes received, ``expected`` the count still missing (``None``: unknown).
    """

    reason = "short_body"

    def __init__(self, received: int, missing: int | None):
        http.client.IncompleteRead.__init__(self, b"", missing)
        self.received = received
        self.args = (f"the body ended after {received} bytes" + (f", {missing} short" if missing is not None else ""),)

    def __str__(self) -> str:
        return self.args[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.args[0]!r})"


class EngineProtocolError(TransportError, http.client.HTTPException):
    """The response is not HTTP/1.1 the parser accepts (a bad status line, bad framing, contradicting lengths)."""

    reason = "protocol_error"


class StagingError(ContentDownloadError, OSError):
    """The staging folder cannot be used (for instance it is on another filesystem than the output)."""


class IllegalTransition(ContentDownloadError, ValueError):
    """The job store was asked to move a job between two states that the transition table forbids."""


class StoreError(ContentDownloadError, RuntimeError):
    """The job store is unreachable, has an unknown schema version, or refused an operation."""


class DamagedStoreError(StoreError, UsageError):
    """The job store file is not a database this version can read (not SQLite, or tables missing):
    a usage error (exit 2) whose message names the file and ``contentdownload jobs rebuild``."""


class UnsafePathError(StagingError):
    """A staging or output path is a symlink (or not what it should be): nothing is written through it.

    ``reason`` is the short failure reason recorded for the job (``part_path_is_symlink``, ...).
    """

    def __init__(self, message: str, reason: str = "unsafe_path"):
        self.reason = reason
        super().__init__(message)


class StoreUnavailableError(ContentDownloadError, ConnectionError):
    """The job store stayed unreachable past the retry budget (``--store-retry-s``).

    An infrastructure failure: neither a plugin fault (no fallback, the part is kept)
    nor a failure of the job being worked on.
    """


class DiskError(ContentDownloadError, OSError):
    """The output folder's filesystem refused a write: it is full, read-only or failing.

    An infrastructure failure, like the job store being away: neither a plugin fault (no
    fallback, the part is kept) nor a transport error to retry; the run stops claiming
    jobs. ``reason`` is the job reason recorded (``disk_full``, ``read_only``, ``io_error``); ``errno``,
    ``strerror`` and ``filename`` are the ``OSError``'s.
    """

    reason = "disk_error"
    #: what happened, and what to do before running again (the run's last line)
    what, advice = "the disk refused a write", "fix it"
    #: the errno values of each kind
    ERRNOS: frozenset[int] = frozenset()

    def __str__(self) -> str:
        text = f"{self.reason}: {self.strerror or self.what}"
        return f"{text}: {self.filename}" if self.filename else text

    @staticmethod
    def of(exc: BaseException) -> "DiskError | None":
        """The :class:`DiskError` an ``OSError`` stands for (``exc`` itself when it is one); ``None`` for any other error."""
        if isinstance(exc, DiskError):
            return exc
        if not isinstance(exc, OSError):
            return None
        for kind in (DiskFullError, ReadOnlyError, DiskIOError):
            if exc.errno in kind.ERRNOS:
                return kind(exc.errno, exc.strerror, exc.filename) if exc.filename else kind(exc.errno, exc.strerror)
        return None


class DiskFullError(DiskError):
    """No space left on the output folder's filesystem (``ENOSPC``, or the user's quota: ``EDQUOT``)."""

    reason = "disk_full"
    what, advice = "no space left", "free space"
    ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class ReadOnlyError(DiskError):
    """The output folder's filesystem is (or turned) read-only (``EROFS``)."""

    reason = "read_only"
    what, advice = "the filesystem is read-only", "make it writable"
    ERRNOS = frozenset({errno.EROFS})


class DiskIOError(DiskError):
    """The output folder's disk reported an I/O error (``EIO``: a write or an fsync failed; after it,
    ext4 mounted ``errors=remount-ro`` refuses every write)."""

    reason = "io_error"
    what, advice = "the disk reported an I/O error", "check the disk"
    ERRNOS = frozenset({errno.EIO})


#: Errors that are not a plugin's fault: they stop the job (or the run) and never cause a
#: fallback to another plugin, which could not do better (the store, the disk or the run is the cause).
NOT_PLUGIN_FAULTS: tuple[type[BaseException], ...] = (JobAbort, StoreError, StoreUnavailableError, DiskError)
