"""Conformance checks for the transfer stages (``resume_decision``, ``stream_io``, ``finalize``).

Any stage plugin can run them: the built-in ``streaming`` and ``legacy`` plugins do in the
project's test suite, and a third-party plugin author calls them from their own tests::

    from contentdownload.testing.conformance import assert_conformance

    def test_my_plugin_meets_the_contract(tmp_path):
        assert_conformance("acme", tmp_path)

The plugin is pinned (without fallback) for each transfer hook it implements; the hooks
it does not implement are answered by the default (``streaming``). Each check runs the
real :class:`~contentdownload.jobs.pipeline.Pipeline` and dispatcher against a
:class:`~contentdownload.testing.server.LoopbackServer` over real sockets, and looks at
the bytes on disk and at what went over the wire:

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

:class:`TransferRig` (a runtime with the plugin pinned, an HTTP client, a pipeline and a
folder) is what the checks use; it is public for plugin tests of their own.
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

from contentdownload.machinery.config import EMPTY
from contentdownload.machinery.flags import FlagLayer
from contentdownload.transfer.http import HttpClient
from contentdownload.hooks.model import NO_LEASE, Job, JobKey, JobResult, Lease, PriorRecord, StagePaths, TransferOptions
from contentdownload.jobs.pipeline import Pipeline
from contentdownload.machinery.runtime import Runtime
from contentdownload.testing.server import Fault, LoopbackServer

__all__ = [
    "CHECKS",
    "CheckResult",
    "ConformanceError",
    "TransferRig",
    "assert_conformance",
    "run_conformance",
    "sha256_hex",
]

#: The hooks a transfer plugin may implement (``job_key`` is not exercised here).
TRANSFER_HOOKS = ("resume_decision", "stream_io", "finalize")


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


@attrs.frozen
class CheckResult:
    """The outcome of one conformance check: its ``name``, whether it ``passed``, and why not (``detail``)."""

    name: str
    passed: bool
    detail: str = ""


class ConformanceError(AssertionError):
    """Raised by :func:`assert_conformance`; ``results`` holds every check's :class:`CheckResult`."""

    def __init__(self, plugin: str, results: Sequence[CheckResult]):
        self.results = list(results)
        failed = [r for r in results if not r.passed]
        lines = [f"plugin {plugin!r} failed {len(failed)} of {len(results)} conformance checks:"]
        lines += [f"- {r.name}: {r.detail}" for r in failed]
        super().__init__("\n".join(lines))


class TransferRig:
    """A pipeline with ``plugin`` answering the transfer hooks, writing under ``root``.

    ``plugin``: the plugin to pin for each transfer hook it implements (``None``: pin
    nothing, the policy and ``environ`` decide). ``hooks``: pin only these hooks.
    ``environ``: the environment flags are read from (default: none). ``extra_plugins``:
    plugin objects to register by name. ``allow_fallback``: let pinned hooks fall back.
    ``retries``/``backoff_factor``: the pipeline's; ``http_retries``: the client's.
    ``options``: transfer options (small chunks by default, so tests see several).
    ``sleep``: the pipeline's wait function (default: no waiting).
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
    ):
        self.root = Path(root)
        self.out = self.root / "out"
        self.staging = self.root / "staging"
        self.out.mkdir(parents=True, exist_ok=True)
        self.staging.mkdir(parents=True, exist_ok=True)
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


#: Every check, by name, in the order they run.
CHECKS: dict[str, Callable[[TransferRig, LoopbackServer, str], None]] = {
    "full_download": check_full_download,
    "cut_and_retry": check_cut_and_retry,
    "short_body_never_finalized": check_short_body_never_finalized,
    "error_body_never_lands": check_error_body_never_lands,
    "retryable_status_retried": check_retryable_status_retried,
    "not_modified_keeps_file": check_not_modified_keeps_file,
    "max_bytes_aborts": check_max_bytes_aborts,
    "sha256_mismatch_not_finalized": check_sha256_mismatch_not_finalized,
    "size_mismatch_not_finalized": check_size_mismatch_not_finalized,
}

_counter = iter(range(1, 1 << 62))
_counter_lock = threading.Lock()


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
    """Run the conformance checks against ``plugin``; one :class:`CheckResult` per check.

    ``tmp_path``: a folder to write into. ``checks``: names from :data:`CHECKS` (default
    all). ``hooks``: pin the plugin for these hooks only (default: every transfer hook
    it implements). ``extra_plugins``: plugin objects to register by name (for a plugin
    that is not installed). ``environ``: flag environment. ``server``: a running
    :class:`LoopbackServer` to use (default: one started for the run).
    """
    names = list(checks) if checks is not None else list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise ValueError(f"unknown conformance checks: {', '.join(unknown)}; known: {', '.join(CHECKS)}")
    own_server = server is None
    srv = server or LoopbackServer().start()
    results: list[CheckResult] = []
    try:
        for name in names:
            with _counter_lock:
                tag = f"c{next(_counter)}-{name}"
            root = Path(tmp_path) / f"conformance-{plugin}" / tag
            try:
                with TransferRig(plugin, root, hooks=hooks, extra_plugins=extra_plugins, environ=environ) as rig:
                    CHECKS[name](rig, srv, tag)
            except AssertionError as exc:
                results.append(CheckResult(name, False, str(exc) or "assertion failed"))
            except Exception as exc:  # a plugin bug surfacing as an exception is a failed check
                tail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                results.append(CheckResult(name, False, f"raised {tail}"))
            else:
                results.append(CheckResult(name, True))
    finally:
        if own_server:
            srv.stop()
    return results


def assert_conformance(plugin: str, tmp_path: str | os.PathLike[str], **options: Any) -> list[CheckResult]:
    """Run :func:`run_conformance` and raise :class:`ConformanceError` listing every failed check."""
    results = run_conformance(plugin, tmp_path, **options)
    if not all(r.passed for r in results):
        raise ConformanceError(plugin, results)
    return results
