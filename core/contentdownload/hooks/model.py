"""Jobs, hook contexts and hook results.

Every hook takes one frozen context object and returns one frozen result (or ``None``
to decline). New fields are only ever added with defaults, so plugins written against
an older :data:`contentdownload.hooks.specs.HOOKSPEC_VERSION` keep working.

The one mutable piece is :class:`Effects`, which a context carries so that the stage
can tell the dispatcher what it already did to the disk (bytes written, rename done):
that is what decides whether falling back to another plugin is still safe.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal, Mapping, Sequence

import attrs

if TYPE_CHECKING:  # pragma: no cover
    from contentdownload.transfer.http import HttpClient

HOOKS: tuple[str, ...] = ("job_key", "resume_decision", "stream_io", "finalize")
#: Optional asynchronous forms of a stage, by the stage they stand for (same chain, same policy, same telemetry).
ASYNC_HOOKS: dict[str, str] = {"stream_io_async": "stream_io", "finalize_async": "finalize"}

ResumeMode = Literal["fresh", "resume", "revalidate", "discard"]
RESUME_MODES: tuple[str, ...] = ("fresh", "resume", "revalidate", "discard")

StreamStatus = Literal["complete", "not_modified", "retry", "failed"]
STREAM_STATUSES: tuple[str, ...] = ("complete", "not_modified", "retry", "failed")

Outcome = Literal["downloaded", "resumed", "not_modified", "skipped", "failed"]
OUTCOMES: tuple[str, ...] = ("downloaded", "resumed", "not_modified", "skipped", "failed")
#: Outcomes after which the job's file is at its final path.
SUCCESS_OUTCOMES = frozenset(OUTCOMES) - {"failed"}


def _tuple_of_str(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def _frozen_headers(value: Mapping[str, str] | tuple[tuple[str, str], ...] | None) -> tuple[tuple[str, str], ...]:
    if not value:
        return ()
    items = value.items() if isinstance(value, Mapping) else value
    return tuple((str(k), str(v)) for k, v in items)


@attrs.frozen
class Job:
    """One artifact to fetch.

    ``urls`` are candidate URLs tried in order until one succeeds. ``work_id`` and
    ``artifact_id`` identify the artifact independently of where it is served from.
    ``filename`` names the output file (sanitised by the runner). ``sha256`` and
    ``size`` are what the finished file must match, when known. ``expected_type`` is what
    the body must be (a media type such as ``application/pdf`` or a family: ``pdf``,
    ``html``, ``xml``, ``json``, ``zip``, ``gzip``, ``image``, ``text``); without it the
    file name's or URL's extension says. ``line`` is the input line the job came from,
    for error reports.
    """

    urls: tuple[str, ...] = attrs.field(converter=_tuple_of_str)
    work_id: str | None = None
    artifact_id: str | None = None
    filename: str | None = None
    sha256: str | None = attrs.field(default=None, converter=attrs.converters.optional(str.lower))
    size: int | None = None
    expected_type: str | None = None
    line: int | None = attrs.field(default=None, eq=False)

    @urls.validator
    def _check_urls(self, _attribute: Any, value: tuple[str, ...]) -> None:
        if not value:
            raise ValueError("a job needs at least one URL")

    @property
    def url(self) -> str:
        """The first candidate URL."""
        return self.urls[0]


@attrs.frozen(kw_only=True)
class JobKey:
    """A job's identity: the same job gives the same key in every process and run.

    ``key`` is a lowercase hex SHA-256. ``scheme`` names how it was derived (for
    instance ``streaming-v1`` or ``legacy-v1``), so keys of different schemes are never
    mistaken for each other. ``canonical_url`` is the canonicalised URL the key was
    derived from, when the scheme uses one.
    """

    key: str
    scheme: str
    canonical_url: str | None = None


@attrs.define
class Effects:
    """What a stage has already done to the disk; read by the dispatcher to decide if a fallback is safe.

    ``bytes_written`` counts body bytes written to the part by ``stream_io`` in this
    attempt; ``renamed`` is set by ``finalize`` the moment the part was moved into place.
    A plugin must call :meth:`wrote` before (or as) it writes and :meth:`mark_renamed`
    right after the rename (the part store's ``promote`` does both).
    """

    bytes_written: int = 0
    renamed: bool = False
    _lock: threading.Lock = attrs.field(factory=threading.Lock, repr=False, eq=False)

    def wrote(self, n: int) -> None:
        with self._lock:
            self.bytes_written += n

    def mark_renamed(self) -> None:
        self.renamed = True


class Lease:
    """A worker's hold on a job. The base class is the lease of a run without a job store.

    ``epoch`` is the fencing token: it grows with every claim of the job. ``heartbeat``
    extends the lease while a transfer runs; ``assert_held`` raises
    :class:`~contentdownload.errors.LeaseLostError` when another worker took the job
    over, and must be called right before a part is promoted to its final path.
    """

    epoch: int = 0
    owner: str = "local"

    def heartbeat(self) -> None:
        """Extend the lease; raise LeaseLostError when it was taken over."""

    def due(self) -> bool:
        """Whether :meth:`heartbeat` may ask the store now, so a caller that must not wait runs it elsewhere
        (the event loop: in a thread). A lease that cannot tell says ``True``."""
        return True

    def assert_held(self) -> None:
        """Raise LeaseLostError when this worker no longer holds the job."""

    @classmethod
    def lost_of(cls, leases: "Sequence[Lease]") -> "set[Lease]":
        """:meth:`assert_held` for each of ``leases`` (all of this class): the ones no longer held.

        A subclass may ask for them all at once (the job store's: one transaction).
        """
        from contentdownload.errors import LeaseLostError

        lost: set[Lease] = set()
        for lease in leases:
            try:
                lease.assert_held()
            except LeaseLostError:
                lost.add(lease)
        return lost


def lost_leases(leases: "Iterable[Lease]") -> "set[Lease]":
    """The leases among ``leases`` no longer held, asked together per kind of lease (:meth:`Lease.lost_of`)."""
    kinds: dict[type, list[Lease]] = {}
    for lease in leases:
        kinds.setdefault(type(lease), []).append(lease)
    lost: set[Lease] = set()
    for kind, group in kinds.items():
        lost |= kind.lost_of(group)
    return lost


NO_LEASE = Lease()


@attrs.frozen
class PriorRecord:
    """What an earlier run recorded about a job (from the job store or a manifest).

    Used to skip finished files, to send conditional requests and to refuse a part
    whose validators no longer match. ``path`` (relative to the output folder or
    absolute), ``size``, ``sha256`` and ``mtime_ns`` describe the finished file;
    ``etag``, ``last_modified``, ``final_url`` and ``content_type`` what the server said.
    """

    path: str | None = None
    size: int | None = None
    sha256: str | None = None
    etag: str | None = None
    last_modified: str | None = None
    final_url: str | None = None
    content_type: str | None = None
    mtime_ns: int | None = None


@attrs.frozen
class StagePaths:
    """Where a job's bytes live: ``final`` (the finished file), ``part`` (the staging file
    being written) and ``sidecar`` (the part's JSON metadata). ``root`` is the output
    folder the final path lies in (its parent folders are created and checked below it)."""

    final: Path
    part: Path
    sidecar: Path
    root: Path | None = None

    @classmethod
    def for_key(cls, final: Path, staging_dir: Path, key: str, suffix: str = "", root: Path | None = None) -> "StagePaths":
        part = staging_dir / f"{key}{suffix}.part"
        return cls(final=final, part=part, sidecar=part.with_name(part.name + ".json"), root=root)


@attrs.frozen
class TransferOptions:
    """Per-run transfer settings a stage may read.

    ``max_bytes``: abort a body larger than this. ``chunk_size``: read and write size.
    ``checkpoint_bytes``: fsync the part and update its sidecar every so many bytes.
    ``timeout``: (connect, read) seconds. ``revalidate``: send a conditional request
    for finished files instead of skipping them. ``accept_any_content``: promote a body
    whatever its first bytes show (no check against the job's expected type).
    ``low_speed_limit`` / ``low_speed_time``: an attempt receiving fewer than
    ``low_speed_limit`` bytes a second for ``low_speed_time`` seconds ends as
    ``too_slow`` (0: no limit); ``max_time``: an attempt longer than this many seconds
    ends as ``max_time`` (``None``: no limit). Both keep the part for a resume.
    """

    max_bytes: int | None = None
    chunk_size: int = 256 << 10
    checkpoint_bytes: int = 16 << 20
    timeout: tuple[float, float] = (10.0, 60.0)
    revalidate: bool = False
    accept_any_content: bool = False
    low_speed_limit: int = 1000
    low_speed_time: float = 60.0
    max_time: float | None = None


@attrs.frozen(kw_only=True)
class JobKeyContext:
    """Input of ``job_key``.

    ``job`` is the job to key; ``relative_path`` the output path it was planned to,
    relative to the output folder, with ``/`` separators.
    """

    job: Job
    relative_path: str


@attrs.frozen(kw_only=True)
class ResumeContext:
    """Input of ``resume_decision``.

    ``job`` and ``job_key`` name the job. ``url`` is the candidate URL this attempt will
    request. ``options`` are the run's transfer options. ``paths`` are the final
    file, the part and its sidecar. ``record`` is what earlier runs recorded, if
    anything. ``attempt`` counts attempts for this candidate from 1; ``previous`` is the
    :class:`StreamResult` of the attempt before, so a decision can react to it (for
    instance drop validators after a 412).
    """

    job: Job
    job_key: JobKey
    url: str
    paths: StagePaths
    options: TransferOptions = TransferOptions()
    record: PriorRecord | None = None
    attempt: int = 1
    previous: "StreamResult | None" = None


@attrs.frozen(kw_only=True)
class ResumeDecision:
    """Result of ``resume_decision``: how to request the URL, decided before any request is sent.

    ``mode`` is one of ``fresh``, ``resume`` (send ``Range`` from ``offset``),
    ``revalidate`` (conditional request for a finished file) and ``discard`` (drop the
    unusable part, then fetch fresh). ``headers`` are the request headers to add.
    ``offset`` is the byte the part will continue from (0 unless ``resume``).
    ``expected_total`` is the full size an earlier response announced, when known.
    ``reason`` says why, in a few words (logged and counted). ``etag`` and
    ``last_modified`` are the validators the request carries (``If-Range``,
    ``If-None-Match``, ``If-Modified-Since``), when any.
    """

    mode: ResumeMode = attrs.field(validator=attrs.validators.in_(RESUME_MODES))
    reason: str = attrs.field()
    headers: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_frozen_headers)
    offset: int = 0
    etag: str | None = None
    last_modified: str | None = None
    expected_total: int | None = None


@attrs.frozen(kw_only=True)
class StreamContext:
    """Input of ``stream_io``: the decision to carry out and everything needed to do it.

    ``job``, ``job_key`` and ``url`` say what to fetch; ``paths`` where the part and its
    sidecar live; ``decision`` is the ``resume_decision`` answer to carry out;
    ``options`` the transfer options (``max_bytes``, chunk size, timeouts); ``record``
    what an earlier run recorded. ``http`` is the worker's HTTP client (connection pooling, timeouts, redirect and
    retry rules already applied). ``progress`` is called with the number of new body
    bytes. ``lease`` must be heart-beaten at checkpoints. ``effects`` must be told of
    every byte written (see :class:`Effects`).
    """

    job: Job
    job_key: JobKey
    url: str
    paths: StagePaths
    decision: ResumeDecision
    http: "HttpClient"
    options: TransferOptions = TransferOptions()
    record: PriorRecord | None = None
    lease: Lease = NO_LEASE
    effects: Effects = attrs.field(factory=Effects)
    progress: Callable[[int], None] | None = None


@attrs.frozen(kw_only=True)
class StreamResult:
    """Result of ``stream_io``: what the transfer did.

    ``status``: ``complete`` (the whole body is in the part and ``sha256`` is the hash
    of the whole part), ``not_modified`` (a 304; the finished file stays), ``retry``
    (retryable: the part is kept for a resume; ``retry_after`` seconds when the server
    said so) or ``failed`` (final; ``reason`` such as ``http_404`` or ``too_large``).
    ``bytes_written`` counts bytes written in this attempt, ``resumed_from`` the offset it
    continued from, ``total_size`` the size of the part afterwards. ``http_status`` is
    the final response's status, ``url`` the URL requested and ``final_url`` the one
    after redirects. ``content_type``, ``content_encoding``, ``etag`` and
    ``last_modified`` come from the response headers. ``elapsed_ms`` is the time the
    attempt took, ``ttfb_ms`` the time to the status line. ``server_digests`` are the
    representation digests the server offered (``{"repr-digest:sha256": hex, ...}``),
    checked when the part is promoted; ``verified_by`` names digests already checked while
    streaming (a ``Content-Digest`` over a partial body).
    """

    status: StreamStatus = attrs.field(validator=attrs.validators.in_(STREAM_STATUSES))
    reason: str = ""
    http_status: int | None = None
    url: str | None = None
    final_url: str | None = None
    bytes_written: int = 0
    resumed_from: int = 0
    total_size: int | None = None
    sha256: str | None = None
    content_type: str | None = None
    content_encoding: str | None = None
    etag: str | None = None
    last_modified: str | None = None
    retry_after: float | None = None
    elapsed_ms: float = 0.0
    ttfb_ms: float | None = None
    server_digests: Mapping[str, str] = attrs.field(factory=dict)
    verified_by: tuple[str, ...] = ()


@attrs.frozen(kw_only=True)
class FinalizeContext:
    """Input of ``finalize``: a complete part to promote to ``paths.final``.

    ``job`` (with the expected ``size`` and ``sha256``, if any) and ``job_key`` name the
    job; ``paths`` give the part and the final path; ``stream`` is the ``complete``
    result of ``stream_io``. ``lease``: ``lease.assert_held()`` must be called right
    before the rename. ``effects``: ``effects.mark_renamed()`` right after it.
    ``options``: the run's transfer settings (``accept_any_content``).
    """

    job: Job
    job_key: JobKey
    paths: StagePaths
    stream: StreamResult
    lease: Lease = NO_LEASE
    effects: Effects = attrs.field(factory=Effects)
    options: TransferOptions = attrs.field(factory=TransferOptions)


@attrs.frozen(kw_only=True)
class FinalizeResult:
    """Result of ``finalize``.

    ``ok`` true: the file is at ``path`` with ``size`` bytes and ``sha256``; ``durable``
    says whether it was fsynced (file and directory). ``ok`` false: nothing was
    promoted, the part was removed when it cannot be trusted, and ``reason`` says why
    (``size_mismatch``, ``sha256_mismatch``, ``digest_mismatch``, ``unexpected_content``, ...).
    ``verified_by`` names what the bytes were checked against (``sha256`` of the job,
    ``repr-digest:sha256``, ``content-md5:md5``, ...); ``detected_type`` is the media type
    the first bytes show (``None`` when they show nothing recognisable), ok or not.
    ``mtime_ns`` is the promoted file's modification time as the part store saw it (``None``
    when not known: the core then looks at the file).
    """

    ok: bool
    path: Path | None = None
    size: int | None = None
    sha256: str | None = None
    reason: str = ""
    durable: bool = False
    verified_by: tuple[str, ...] = ()
    detected_type: str | None = None
    mtime_ns: int | None = None


HOOK_RESULT_TYPES: dict[str, type] = {
    "job_key": JobKey,
    "resume_decision": ResumeDecision,
    "stream_io": StreamResult,
    "finalize": FinalizeResult,
}
HOOK_CONTEXT_TYPES: dict[str, type] = {
    "job_key": JobKeyContext,
    "resume_decision": ResumeContext,
    "stream_io": StreamContext,
    "finalize": FinalizeContext,
}


@attrs.frozen(kw_only=True)
class JobResult:
    """The outcome of one job, as the library returns it and the manifest records it.

    ``outcome`` is ``downloaded``, ``resumed``, ``not_modified``, ``skipped`` or
    ``failed`` (then ``reason`` says why, e.g. ``http_404``, ``sha256_mismatch``).
    ``plugins`` maps each hook to the plugin that answered it and ``fallbacks`` each
    hook to whether that was a fallback. ``bytes_downloaded`` counts body bytes received
    in this run, ``resumed_from`` the offset the last transfer continued from.
    ``job`` is the job and ``job_key`` its key. ``url`` is the candidate that answered and
    ``final_url`` where redirects led; ``http_status`` the last status seen. ``path``,
    ``size`` and ``sha256`` describe the finished file. ``content_type``, ``etag`` and
    ``last_modified`` come from the server. ``attempts`` counts requests sent (the client's own retries included),
    ``elapsed_ms`` the job's wall time. ``decisions`` lists the resume decision mode of
    each attempt, in order (``fresh``, ``resume``, ``revalidate``, ``discard``).
    ``verified_by``, ``detected_type`` and ``mtime_ns`` are the finalize stage's (see :class:`FinalizeResult`).
    """

    outcome: Outcome = attrs.field(validator=attrs.validators.in_(OUTCOMES))
    job: Job
    job_key: str | None = None
    reason: str = ""
    url: str | None = None
    final_url: str | None = None
    http_status: int | None = None
    path: Path | None = None
    size: int | None = None
    sha256: str | None = None
    content_type: str | None = None
    etag: str | None = None
    last_modified: str | None = None
    attempts: int = 0
    elapsed_ms: float = 0.0
    bytes_downloaded: int = 0
    resumed_from: int = 0
    plugins: Mapping[str, str] = attrs.field(factory=dict)
    fallbacks: Mapping[str, bool] = attrs.field(factory=dict)
    decisions: tuple[str, ...] = ()
    verified_by: tuple[str, ...] = ()
    detected_type: str | None = None
    mtime_ns: int | None = None

    @property
    def ok(self) -> bool:
        return self.outcome in SUCCESS_OUTCOMES
