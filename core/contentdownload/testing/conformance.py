"""Conformance checks for plugins: each hook a plugin implements, against what the docs promise.

Any plugin can run them: the built-in ``streaming`` and ``legacy`` plugins do in the
project's test suite, and a third-party plugin author calls them from their own tests::

    from contentdownload.testing.conformance import assert_conformance

    def test_my_plugin_meets_the_contract(tmp_path):
        assert_conformance("acme", tmp_path)

The plugin is loaded once; a plugin that cannot be (not installed, a name clash, a load
error, no hook implemented) gives one failed check, ``plugin_loads``. Then the checks of
the hooks it implements run: the ``job_key`` checks (:mod:`contentdownload.testing.jobkeys`:
``job_key_well_formed``, ``job_key_deterministic``, ``job_key_no_io``) when it implements
``job_key``, and the transfer checks below when it implements ``resume_decision``,
``stream_io`` or ``finalize``. For those it is pinned (without fallback) for each transfer
hook it implements; the others are answered by the default (``streaming``). Each transfer
check runs the real :class:`~contentdownload.jobs.pipeline.Pipeline` and dispatcher against
a :class:`~contentdownload.testing.server.LoopbackServer` over real sockets, and looks at
the bytes on disk, at what went over the wire and, through a
:class:`~contentdownload.testing.probe.StreamProbe`, at every ``stream_io`` call:

``full_download``
    a plain download ends with the exact bytes and their SHA-256 in the result.
``cut_and_retry``
    a connection cut mid-body, then a retry: the final file is byte-identical.
``short_body_never_finalized``
    a server that always sends fewer bytes than ``Content-Length``: the job fails and
    nothing is at the final path.
``error_body_never_lands``
    a ``404``: the job fails with ``http_404`` and the error page is nowhere on disk.
``retryable_status_retried``
    a ``503`` then the file: the job succeeds with the right bytes.
``not_modified_keeps_file``
    revalidating a finished file answered ``304``: outcome ``not_modified``, the file is
    untouched, no body byte was sent.
``max_bytes_aborts``
    a body larger than ``max_bytes``: ``too_large``, nothing at the final path, no part.
``sha256_mismatch_not_finalized`` / ``size_mismatch_not_finalized``
    a job whose expected SHA-256 (size) differs from the served bytes: ``sha256_mismatch``
    (``size_mismatch``), nothing at the final path, no part left.
``effects_reported``
    every byte ``stream_io`` added to the part was reported with ``ctx.effects.wrote()``.
``lease_heartbeated``
    a body of several checkpoints: ``stream_io`` heartbeat the lease at least once per
    ``checkpoint_bytes`` written (directly or through ``ctx.progress``).
``range_honoured``
    after a cut, a decision to resume from byte *N*: the server saw a ``Range`` request
    and ``stream_io`` appended to the part instead of starting over (skipped when the
    plugin's own ``resume_decision`` never resumes).
``only_the_part_written``
    ``stream_io`` created, changed or removed no file but the part and its sidecar.

Events logged during a check are captured, never printed; a failed check carries them
(:attr:`CheckResult.logs`) and :class:`ConformanceError` shows them.

:class:`TransferRig` (a runtime with the plugin pinned, an HTTP client, a pipeline and a
folder) is what the transfer checks use; it is public for plugin tests of their own.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import attrs
from structlog.testing import capture_logs

from contentdownload.machinery.config import EMPTY
from contentdownload.machinery.flags import FlagLayer
from contentdownload.transfer.http import HttpClient
from contentdownload.hooks.model import HOOKS, NO_LEASE, Job, JobKey, JobResult, Lease, PriorRecord, StagePaths, TransferOptions
from contentdownload.jobs.pipeline import Pipeline
from contentdownload.machinery.runtime import Runtime
from contentdownload.testing.jobkeys import JOB_KEY_CHECKS, KeyRig
from contentdownload.testing.probe import CountingLease, StreamProbe
from contentdownload.testing.server import Fault, LoopbackServer

__all__ = [
    "CHECKS",
    "JOB_KEY_CHECKS",
    "TRANSFER_CHECKS",
    "CheckResult",
    "ConformanceError",
    "TransferRig",
    "assert_conformance",
    "run_conformance",
    "sha256_hex",
]

#: The hooks the transfer checks exercise (``job_key`` has checks of its own).
TRANSFER_HOOKS = ("resume_decision", "stream_io", "finalize")


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


@attrs.frozen
class CheckResult:
    """The outcome of one conformance check.

    ``name``: the check's name (a key of :data:`CHECKS`, or ``plugin_loads``). ``passed``:
    whether it passed. ``detail``: why not, or why it was skipped. ``skipped``: the check
    did not apply to the plugin (``passed`` is then true). ``logs``: the events logged
    during a failed check, one line each (empty when it passed).
    """

    name: str
    passed: bool
    detail: str = ""
    skipped: bool = False
    logs: tuple[str, ...] = ()


class ConformanceError(AssertionError):
    """Raised by :func:`assert_conformance`: one line per failed check, then the events it logged.

    ``results`` holds every check's :class:`CheckResult`.
    """

    def __init__(self, plugin: str, results: Sequence[CheckResult]):
        self.results = list(results)
        failed = [r for r in results if not r.passed]
        lines = [f"plugin {plugin!r} failed {len(failed)} of {len(results)} conformance checks:"]
        for r in failed:
            lines.append(f"- {r.name}: {r.detail}")
            if r.logs:
                lines += ["  logged:", *(f"    {line}" for line in r.logs)]
        super().__init__("\n".join(lines))


class TransferRig:
    """A pipeline with ``plugin`` answering the transfer hooks, writing under ``root``.

    ``plugin``: the plugin to pin for each transfer hook it implements (``None``: pin
    nothing, the policy and ``environ`` decide). ``hooks``: pin only these hooks.
    ``environ``: the environment flags are read from (default: none). ``extra_plugins``:
    plugin objects to register by name. ``allow_fallback``: let pinned hooks fall back.
    ``retries``/``backoff_factor``: the pipeline's; ``http_retries``: the client's.
    ``options``: transfer options (small chunks by default, so tests see several).
    ``sleep``: the pipeline's wait function (default: no waiting). ``probe``: register a
    :class:`~contentdownload.testing.probe.StreamProbe` of ``root`` (as :attr:`probe`),
    which records every ``stream_io`` call.
    """

    def __init__(
        self,
        plugin: str | None,
        root: Path,
        *,
        hooks: Iterable[str] | None = None,
        environ: Mapping[str, str] | None = None,
        extra_plugins: Mapping[str, object] | None = None,
        allow_fallback: bool = False,
        retries: int = 3,
        backoff_factor: float = 0.0,
        http_retries: int = 0,
        options: TransferOptions | None = None,
        sleep: Callable[[float], None] | None = None,
        timeout: tuple[float, float] = (10.0, 30.0),
        probe: bool = False,
    ):
        self.root = Path(root)
        self.out = self.root / "out"
        self.staging = self.root / "staging"
        self.out.mkdir(parents=True, exist_ok=True)
        self.staging.mkdir(parents=True, exist_ok=True)
        self.probe = StreamProbe(self.root) if probe else None
        if self.probe is not None:
            extra_plugins = {**(extra_plugins or {}), "conformance-probe": self.probe}
        probe = Runtime(config=EMPTY, environ=dict(environ or {}), extra_plugins=extra_plugins)
        pins: dict[str, str] = {}
        if plugin is not None:
            wanted = tuple(hooks) if hooks is not None else TRANSFER_HOOKS
            pins = {h: plugin for h in wanted if probe.plugins.implements(plugin, h)}
            if not pins:
                raise ValueError(f"plugin {plugin!r} implements none of {', '.join(wanted)}")
        self.pins = pins
        cli = FlagLayer(source="cli", pins=pins, allow_fallback=True if allow_fallback else None)
        self.runtime = Runtime(cli=cli, config=EMPTY, environ=dict(environ or {}), extra_plugins=extra_plugins) if pins or allow_fallback else probe
        self.http = HttpClient(timeout=timeout, retries=http_retries, backoff_factor=0.0, max_retry_after=5.0)
        self.options = options or TransferOptions(chunk_size=64 << 10, checkpoint_bytes=256 << 10, timeout=timeout)
        self.pipeline = Pipeline(self.runtime, self.http, self.options, retries=retries, backoff_factor=backoff_factor,
                                 sleep=sleep or (lambda seconds: None))

    def paths(self, name: str) -> StagePaths:
        """Final, part and sidecar paths of output file ``name``."""
        key = sha256_hex(name.encode())
        return StagePaths.for_key(self.out / name, self.staging, key, root=self.out)

    def key(self, name: str) -> JobKey:
        """A job key for output file ``name``."""
        return JobKey(key=sha256_hex(name.encode()), scheme="conformance")

    def run(self, job: Job, name: str, *, record: PriorRecord | None = None, options: TransferOptions | None = None,
            lease: Lease = NO_LEASE, **kwargs: Any) -> JobResult:
        """Run ``job`` into ``out/name`` through the pipeline."""
        key = self.key(name)
        selections = self.runtime.policy.plan(key.key)
        return self.pipeline.run(job, key, self.paths(name), selections, record=record, lease=lease,
                                 options=options, **kwargs)

    def record_of(self, result: JobResult) -> PriorRecord:
        """The record a store would keep of a finished result (for revalidation)."""
        assert result.path is not None
        st = Path(result.path).stat()
        return PriorRecord(path=str(result.path), size=result.size, sha256=result.sha256, etag=result.etag,
                           last_modified=result.last_modified, final_url=result.final_url,
                           content_type=result.content_type, mtime_ns=st.st_mtime_ns)

    def leftovers(self, name: str) -> list[Path]:
        """Part and sidecar files of ``name`` still in staging."""
        paths = self.paths(name)
        return [p for p in (paths.part, paths.sidecar) if p.exists()]

    def close(self) -> None:
        """Close the HTTP client."""
        self.http.close()

    def __enter__(self) -> "TransferRig":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the checks ------------------------------------------------------------------------


def _data(seed: int, size: int = 300_000) -> bytes:
    return random.Random(seed).randbytes(size)


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def _nothing_landed(rig: TransferRig, name: str, forbidden: bytes | None = None) -> None:
    final = rig.paths(name).final
    _expect(not final.exists(), f"{final.name} exists at the final path")
    _expect(not rig.leftovers(name), f"leftovers in staging: {[p.name for p in rig.leftovers(name)]}")
    if forbidden:
        for path in rig.root.rglob("*"):
            if path.is_file() and forbidden in path.read_bytes():
                raise AssertionError(f"the error body was written to {path}")


def check_full_download(rig: TransferRig, server: LoopbackServer, tag: str) -> None:
    """A plain download ends with the served bytes, their SHA-256 and size in the result, nothing left in staging."""
    data = _data(1)
    url = server.add_file(f"/{tag}/full.bin", data)
    result = rig.run(Job(urls=(url,)), f"{tag}-full.bin")
    _expect(result.outcome == "downloaded", f"outcome {result.outcome} ({result.reason})")
    _expect(rig.paths(f"{tag}-full.bin").final.read_bytes() == data, "final bytes differ from the served ones")
    _expect(result.sha256 == sha256_hex(data), f"result sha256 {result.sha256} is not the file's")
    _expect(result.size == len(data), f"result size {result.size} != {len(data)}")
    _expect(not rig.leftovers(f"{tag}-full.bin"), "part or sidecar left in staging after a download")


def check_cut_and_retry(rig: TransferRig, server: LoopbackServer, tag: str) -> None:
    """A connection cut mid-body, then a retry: the final file is byte-identical."""
    data = _data(2)
    path = f"/{tag}/cut.bin"
    url = server.add_file(path, data)
    server.add_fault(path, Fault.cut_after(len(data) * 2 // 5))
    result = rig.run(Job(urls=(url,)), f"{tag}-cut.bin")
    _expect(result.outcome in ("downloaded", "resumed"), f"outcome {result.outcome} ({result.reason})")
    _expect(rig.paths(f"{tag}-cut.bin").final.read_bytes() == data, "final bytes differ after a cut and a retry")
    _expect(server.stats(path).requests >= 2, "the cut was not followed by another request")


def check_short_body_never_finalized(rig: TransferRig, server: LoopbackServer, tag: str) -> None:
    """A body always shorter than Content-Length: the job fails and nothing reaches the final path."""
    data = _data(3)
    path = f"/{tag}/short.bin"
    url = server.add_file(path, data)
    server.add_fault(path, Fault.short_body(1000), times=-1)
    result = rig.run(Job(urls=(url,)), f"{tag}-short.bin")
    _expect(result.outcome == "failed", f"a body always 1000 bytes short ended {result.outcome}")
    _expect(not rig.paths(f"{tag}-short.bin").final.exists(), "a short body reached the final path")


def check_error_body_never_lands(rig: TransferRig, server: LoopbackServer, tag: str) -> None:
    """A 404 fails with http_404 and its page is nowhere on disk."""
    marker = f"<html>conformance error page {tag}</html>".encode()
    url = server.add_status(f"/{tag}/missing.pdf", 404, body=marker)
    result = rig.run(Job(urls=(url,)), f"{tag}-missing.pdf")
    _expect(result.outcome == "failed" and result.reason == "http_404", f"outcome {result.outcome} ({result.reason})")
    _nothing_landed(rig, f"{tag}-missing.pdf", forbidden=marker)


def check_retryable_status_retried(rig: TransferRig, server: LoopbackServer, tag: str) -> None:
    """One 503, then the file: the job succeeds with the right bytes."""
    data = _data(4, 50_000)
    path = f"/{tag}/busy.bin"
    url = server.add_file(path, data)
    server.add_fault(path, Fault.status(503, retry_after=0))
    result = rig.run(Job(urls=(url,)), f"{tag}-busy.bin")
    _expect(result.outcome == "downloaded", f"outcome {result.outcome} ({result.reason}) after one 503")
    _expect(rig.paths(f"{tag}-busy.bin").final.read_bytes() == data, "final bytes differ after a 503")


def check_not_modified_keeps_file(rig: TransferRig, server: LoopbackServer, tag: str) -> None:
    """Revalidating a finished file answered 304: not_modified, no body byte, the file untouched."""
    data = _data(5)
    path = f"/{tag}/same.bin"
    url = server.add_file(path, data)
    first = rig.run(Job(urls=(url,)), f"{tag}-same.bin")
    _expect(first.outcome == "downloaded", f"first download: {first.outcome} ({first.reason})")
    final = rig.paths(f"{tag}-same.bin").final
    before = final.stat().st_mtime_ns
    server.reset_stats()
    options = attrs.evolve(rig.options, revalidate=True)
    second = rig.run(Job(urls=(url,)), f"{tag}-same.bin", record=rig.record_of(first), options=options)
    stats = server.stats(path)
    _expect(second.outcome == "not_modified", f"revalidation ended {second.outcome} ({second.reason}), statuses {stats.statuses}")
    _expect(stats.body_bytes == 0, f"{stats.body_bytes} body bytes sent for a revalidation")
    _expect(final.read_bytes() == data and final.stat().st_mtime_ns == before, "the finished file changed on a 304")


def check_max_bytes_aborts(rig: TransferRig, server: LoopbackServer, tag: str) -> None:
    """A body past max_bytes: too_large, no final file, no part."""
    data = _data(6)
    url = server.add_file(f"/{tag}/big.bin", data)
    options = attrs.evolve(rig.options, max_bytes=len(data) // 3)
    result = rig.run(Job(urls=(url,)), f"{tag}-big.bin", options=options)
    _expect(result.outcome == "failed" and result.reason == "too_large", f"outcome {result.outcome} ({result.reason})")
    _nothing_landed(rig, f"{tag}-big.bin")


def check_sha256_mismatch_not_finalized(rig: TransferRig, server: LoopbackServer, tag: str) -> None:
    """An expected SHA-256 that differs: sha256_mismatch, nothing promoted, no part left."""
    data = _data(7)
    url = server.add_file(f"/{tag}/wrong-sha.bin", data)
    result = rig.run(Job(urls=(url,), sha256="0" * 64), f"{tag}-wrong-sha.bin")
    _expect(result.outcome == "failed" and result.reason == "sha256_mismatch", f"outcome {result.outcome} ({result.reason})")
    _nothing_landed(rig, f"{tag}-wrong-sha.bin")


def check_size_mismatch_not_finalized(rig: TransferRig, server: LoopbackServer, tag: str) -> None:
    """An expected size that differs: size_mismatch, nothing promoted, no part left."""
    data = _data(8)
    url = server.add_file(f"/{tag}/wrong-size.bin", data)
    result = rig.run(Job(urls=(url,), size=len(data) + 1), f"{tag}-wrong-size.bin")
    _expect(result.outcome == "failed" and result.reason == "size_mismatch", f"outcome {result.outcome} ({result.reason})")
    _nothing_landed(rig, f"{tag}-wrong-size.bin")


def _probe(rig: TransferRig) -> StreamProbe:
    if rig.probe is None:
        raise AssertionError("the rig was built without probe=True")
    return rig.probe


def check_effects_reported(rig: TransferRig, server: LoopbackServer, tag: str) -> None:
    """Every byte stream_io added to the part was reported with ctx.effects.wrote()."""
    data = _data(9)
    url = server.add_file(f"/{tag}/effects.bin", data)
    result = rig.run(Job(urls=(url,)), f"{tag}-effects.bin")
    _expect(result.outcome == "downloaded", f"outcome {result.outcome} ({result.reason})")
    for call in _probe(rig).calls:
        grown = call.part_growth()
        _expect(call.reported >= grown, f"stream_io added {grown} bytes to the part but reported {call.reported} "
                                        f"with ctx.effects.wrote() (a fallback would then overwrite them)")


def check_lease_heartbeated(rig: TransferRig, server: LoopbackServer, tag: str) -> None:
    """A body of several checkpoints: at least one lease heartbeat per checkpoint_bytes written."""
    every = rig.options.checkpoint_bytes
    data = _data(10, every * 4 + 1000)
    url = server.add_file(f"/{tag}/long.bin", data)
    result = rig.run(Job(urls=(url,)), f"{tag}-long.bin", lease=CountingLease())
    _expect(result.outcome == "downloaded", f"outcome {result.outcome} ({result.reason})")
    for call in _probe(rig).calls:
        needed = max(1, call.reported // every)
        _expect(call.beats >= needed, f"stream_io wrote {call.reported} bytes with {call.beats} lease heartbeats; "
                                      f"at least {needed} (one per {every} bytes) keep the job from being taken over")


def check_range_honoured(rig: TransferRig, server: LoopbackServer, tag: str) -> None:
    """A decision to resume from byte N: the server sees Range and stream_io appends to the part."""
    data = _data(11, 600_000)
    path = f"/{tag}/resume.bin"
    url = server.add_file(path, data)
    server.add_fault(path, Fault.cut_after(len(data) // 2))
    result = rig.run(Job(urls=(url,)), f"{tag}-resume.bin")
    _expect(rig.paths(f"{tag}-resume.bin").final.read_bytes() == data, f"final bytes differ ({result.outcome}, {result.reason})")
    calls = [c for c in _probe(rig).calls if c.ctx.decision.mode == "resume"]
    if not calls:
        raise _Skip("the plugin's resume_decision never asked for a resume")
    ranged = [r for r in server.stats(path).ranges if r is not None]
    _expect(len(ranged) >= len(calls), f"{len(calls)} decisions to resume (from byte {calls[0].ctx.decision.offset}); "
                                       f"the server saw {len(ranged)} requests with a Range header")
    for call in calls:
        offset = call.ctx.decision.offset
        _expect(call.result is not None and call.result.resumed_from == offset,
                f"resumed_from {call.result.resumed_from if call.result else None}, the decision said {offset}")
        _expect(call.part_growth() <= len(data) - offset,
                f"the part grew by {call.part_growth()} bytes on a resume from {offset} of {len(data)}: it was rewritten")


def check_only_the_part_written(rig: TransferRig, server: LoopbackServer, tag: str) -> None:
    """A cut and a resumed retry: stream_io touched no file but the part and its sidecar."""
    data = _data(12)
    path = f"/{tag}/tree.bin"
    url = server.add_file(path, data)
    server.add_fault(path, Fault.cut_after(len(data) // 2))
    rig.run(Job(urls=(url,)), f"{tag}-tree.bin")
    paths = rig.paths(f"{tag}-tree.bin")
    allowed = {paths.part, paths.sidecar, paths.sidecar.with_name(paths.sidecar.name + ".tmp")}
    for call in _probe(rig).calls:
        outside = call.changed_outside(allowed)
        _expect(not outside, f"stream_io changed files other than the part: {[str(p.relative_to(rig.root)) for p in outside]}")


class _Skip(Exception):
    """A check that does not apply to this plugin; the message says why."""


#: The transfer checks, by name, in the order they run.
TRANSFER_CHECKS: dict[str, Callable[[TransferRig, LoopbackServer, str], None]] = {
    "full_download": check_full_download,
    "cut_and_retry": check_cut_and_retry,
    "short_body_never_finalized": check_short_body_never_finalized,
    "error_body_never_lands": check_error_body_never_lands,
    "retryable_status_retried": check_retryable_status_retried,
    "not_modified_keeps_file": check_not_modified_keeps_file,
    "max_bytes_aborts": check_max_bytes_aborts,
    "sha256_mismatch_not_finalized": check_sha256_mismatch_not_finalized,
    "size_mismatch_not_finalized": check_size_mismatch_not_finalized,
    "effects_reported": check_effects_reported,
    "lease_heartbeated": check_lease_heartbeated,
    "range_honoured": check_range_honoured,
    "only_the_part_written": check_only_the_part_written,
}

#: Every check, by name, in the order they run: the ``job_key`` checks, then the transfer checks.
CHECKS: dict[str, Callable[..., None]] = {**JOB_KEY_CHECKS, **TRANSFER_CHECKS}

_counter = iter(range(1, 1 << 62))
_counter_lock = threading.Lock()
_LOG_LINES = 40


def _log_line(event: Mapping[str, Any]) -> str:
    fields = " ".join(f"{k}={v!r}" for k, v in event.items() if k not in ("event", "log_level"))
    return f"{event.get('log_level', '?')}: {event.get('event')} {fields}".rstrip()


def _outcome(name: str, check: Callable[[], None]) -> CheckResult:
    """Run one check with its logs captured; the logs are kept only when it fails."""
    with capture_logs() as events:
        try:
            check()
        except _Skip as skip:
            return CheckResult(name, True, f"skipped: {skip}", skipped=True)
        except AssertionError as exc:
            detail = str(exc) or "assertion failed"
        except Exception as exc:  # a plugin bug surfacing as an exception is a failed check
            detail = "raised " + "".join(traceback.format_exception_only(type(exc), exc)).strip()
        else:
            return CheckResult(name, True)
    return CheckResult(name, False, detail, logs=tuple(_log_line(e) for e in events[-_LOG_LINES:]))


def _loaded(plugin: str, hooks: Iterable[str] | None, extra_plugins: Mapping[str, object] | None,
            environ: Mapping[str, str] | None) -> tuple[Runtime | None, set[str], str]:
    """The runtime with ``plugin`` loaded and the hooks to check, or why the plugin cannot be checked."""
    with capture_logs():
        try:
            runtime = Runtime(config=EMPTY, environ=dict(environ or {}), extra_plugins=extra_plugins)
        except Exception as exc:
            return None, set(), f"the plugins could not be loaded: {exc}"
    info = runtime.plugins.infos.get(plugin)
    if info is None:
        return None, set(), f"plugin {plugin!r} is not installed; installed: {', '.join(sorted(runtime.plugins.infos))}"
    if info.status != "active":
        return None, set(), f"plugin {plugin!r} is {info.status}: {info.error}"
    wanted = tuple(hooks) if hooks is not None else HOOKS
    implemented = {h for h in wanted if runtime.plugins.implements(plugin, h)}
    if not implemented:
        return None, set(), f"plugin {plugin!r} implements none of {', '.join(wanted)}"
    return runtime, implemented, ""


def run_conformance(
    plugin: str,
    tmp_path: str | os.PathLike[str],
    *,
    checks: Iterable[str] | None = None,
    hooks: Iterable[str] | None = None,
    extra_plugins: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
    server: LoopbackServer | None = None,
) -> list[CheckResult]:
    """Run the conformance checks of the hooks ``plugin`` implements; one :class:`CheckResult` per check.

    ``tmp_path``: a folder to write into. ``checks``: names from :data:`CHECKS` (default:
    every check of a hook the plugin implements; a named check of a hook it does not
    implement is reported skipped). ``hooks``: check (and pin) the plugin for these hooks
    only (default: every hook it implements). ``extra_plugins``: plugin objects to
    register by name (for a plugin that is not installed). ``environ``: flag environment.
    ``server``: a running :class:`LoopbackServer` to use (default: one started for the
    run). A plugin that cannot be checked at all gives one failed ``plugin_loads``.
    """
    names = list(checks) if checks is not None else list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise ValueError(f"unknown conformance checks: {', '.join(unknown)}; known: {', '.join(CHECKS)}")
    runtime, implemented, problem = _loaded(plugin, hooks, extra_plugins, environ)
    if runtime is None:
        return [CheckResult("plugin_loads", False, problem)]
    transfer = implemented & set(TRANSFER_HOOKS)
    applies = {n: (n in JOB_KEY_CHECKS and "job_key" in implemented) or (n in TRANSFER_CHECKS and bool(transfer))
               for n in names}
    if checks is None:
        names = [n for n in names if applies[n]]
    own_server = server is None and any(applies[n] and n in TRANSFER_CHECKS for n in names)
    srv = LoopbackServer().start() if own_server else server
    run = _Run(plugin, runtime, Path(tmp_path), transfer, dict(extra_plugins or {}), dict(environ or {}), srv)
    try:
        return [run.check(n) if applies[n] else run.skip(n) for n in names]
    finally:
        if own_server and srv is not None:
            srv.stop()


@attrs.frozen
class _Run:
    """One :func:`run_conformance` call: the plugin, how it was loaded, where the checks write."""

    plugin: str
    runtime: Runtime
    tmp_path: Path
    transfer: set[str]
    extra_plugins: dict[str, object]
    environ: dict[str, str]
    server: LoopbackServer | None

    def skip(self, name: str) -> CheckResult:
        hook = "job_key" if name in JOB_KEY_CHECKS else "a transfer hook"
        return CheckResult(name, True, f"skipped: {self.plugin!r} does not implement {hook}", skipped=True)

    def check(self, name: str) -> CheckResult:
        if name in JOB_KEY_CHECKS:
            keys = KeyRig(self.plugin, self.runtime, self.extra_plugins)
            return _outcome(name, lambda: JOB_KEY_CHECKS[name](keys))
        with _counter_lock:
            tag = f"c{next(_counter)}-{name}"
        root = self.tmp_path / f"conformance-{self.plugin}" / tag

        def transfer_check() -> None:
            with TransferRig(self.plugin, root, hooks=self.transfer, extra_plugins=self.extra_plugins,
                             environ=self.environ, probe=True) as rig:
                TRANSFER_CHECKS[name](rig, self.server, tag)

        return _outcome(name, transfer_check)


def assert_conformance(plugin: str, tmp_path: str | os.PathLike[str], **options: Any) -> list[CheckResult]:
    """Run :func:`run_conformance` (same arguments); raise :class:`ConformanceError` listing every failed check."""
    results = run_conformance(plugin, tmp_path, **options)
    if not all(r.passed for r in results):
        raise ConformanceError(plugin, results)
    return results
