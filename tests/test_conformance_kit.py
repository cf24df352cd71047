"""The plugin kit checks what the docs promise: the docs' own examples pass, each deliberate mistake fails its check."""

from __future__ import annotations

import hashlib
import importlib
import os
import socket
import subprocess
import sys
import textwrap

import attrs
import pytest

from contentdownload import FinalizeResult, JobKey, ResumeDecision, StreamResult, hookimpl
from contentdownload.hooks.model import NO_LEASE, Effects
from contentdownload.testing.conformance import (
    CHECKS,
    JOB_KEY_CHECKS,
    TRANSFER_CHECKS,
    ConformanceError,
    assert_conformance,
    run_conformance,
)
from contentdownload.testing.server import LoopbackServer
from helpers import docs_examples


@pytest.fixture(scope="module")
def server():
    with LoopbackServer() as srv:
        yield srv


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    """The plugin examples of docs/plugins.md, written out as files and imported."""
    root = tmp_path_factory.mktemp("docs-examples")
    for path, code in docs_examples().items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        (target.parent / "__init__.py").touch()
        target.write_text(code)
    sys.path.insert(0, str(root))
    try:
        yield {path.split("/")[0]: importlib.import_module(path[:-3].replace("/", ".")) for path in docs_examples()}
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m.startswith("acme_")]:
            del sys.modules[name]


def failed(results):
    return sorted(r.name for r in results if not r.passed)


def test_the_docs_examples_are_found():
    assert set(docs_examples()) == {"acme_fetch/plugin.py", "acme_stream/plugin.py"}


def test_the_docs_job_key_example_passes_the_job_key_checks(examples, tmp_path, server):
    results = assert_conformance("acme", tmp_path, extra_plugins={"acme": examples["acme_fetch"]}, server=server)
    assert [r.name for r in results] == list(JOB_KEY_CHECKS)
    assert all(r.passed and not r.skipped for r in results), results


def test_the_docs_stream_io_example_passes_the_transfer_checks(examples, tmp_path, server):
    results = assert_conformance("acme", tmp_path, extra_plugins={"acme": examples["acme_stream"]}, server=server)
    assert [r.name for r in results] == list(TRANSFER_CHECKS)
    assert all(r.passed and not r.skipped for r in results), results


# -- seven deliberate mistakes, each one edit away from the docs' stream_io ------------------


class _Wrong:
    """The docs' stream_io, called with one thing taken away from it."""

    def __init__(self, good):
        self.good = good

    def change(self, ctx):
        return {}

    @hookimpl
    def stream_io(self, ctx):
        return self.good.stream_io(attrs.evolve(ctx, **self.change(ctx)))


class NoEffects(_Wrong):
    def change(self, ctx):
        return {"effects": Effects()}  # the bytes are written, the dispatcher is never told


class NoHeartbeat(_Wrong):
    def change(self, ctx):
        return {"lease": NO_LEASE, "progress": None}  # neither the lease nor the progress callback (which beats) is used


class IgnoresRange(_Wrong):
    def change(self, ctx):
        if ctx.decision.mode != "resume":
            return {}
        return {"decision": ResumeDecision(mode="fresh", reason="a resume started over from byte 0")}


class WritesBesideThePart(_Wrong):
    @hookimpl
    def stream_io(self, ctx):
        ctx.paths.part.with_name(ctx.paths.part.name + ".notes").write_text("seen\n")
        return self.good.stream_io(ctx)


class IgnoresMaxBytes(_Wrong):
    def change(self, ctx):
        return {"options": attrs.evolve(ctx.options, max_bytes=None)}


class WritesErrorBodies:
    """Writes whatever the server sends, then judges the status."""

    @hookimpl
    def stream_io(self, ctx):
        with ctx.http.get(ctx.url, dict(ctx.decision.headers)) as response:
            body = response.content
        ctx.effects.wrote(len(body))
        ctx.paths.part.write_bytes(body)
        if response.status_code != 200:
            return StreamResult(status="failed", reason=f"http_{response.status_code}", http_status=response.status_code)
        return StreamResult(status="complete", http_status=200, bytes_written=len(body), total_size=len(body),
                            sha256=hashlib.sha256(body).hexdigest())


class PromotesAnything:
    """A finalize that renames the part without checking it against the job."""

    @hookimpl
    def finalize(self, ctx):
        ctx.lease.assert_held()
        ctx.paths.final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(ctx.paths.part, ctx.paths.final)
        ctx.effects.mark_renamed()
        return FinalizeResult(ok=True, path=ctx.paths.final, size=ctx.stream.total_size, sha256=ctx.stream.sha256)


MISTAKES = [
    (NoEffects, "effects_reported"),
    (NoHeartbeat, "lease_heartbeated"),
    (IgnoresRange, "range_honoured"),
    (WritesBesideThePart, "only_the_part_written"),
    (WritesErrorBodies, "error_body_never_lands"),
    (PromotesAnything, "sha256_mismatch_not_finalized"),
    (IgnoresMaxBytes, "max_bytes_aborts"),
]


@pytest.mark.parametrize(("mistake", "check"), MISTAKES, ids=[c for _, c in MISTAKES])
def test_each_deliberate_mistake_fails_its_named_check(mistake, check, examples, tmp_path, server):
    plugin = mistake(examples["acme_stream"]) if issubclass(mistake, _Wrong) else mistake()
    results = run_conformance("wrong", tmp_path, extra_plugins={"wrong": plugin}, server=server)
    by_name = {r.name: r for r in results}
    assert not by_name[check].passed, by_name[check]
    assert by_name[check].detail
    if issubclass(mistake, _Wrong):  # one edit of a conforming plugin: exactly its check fails
        assert failed(results) == [check]


def test_a_failure_names_the_check_and_shows_the_logs_only_then(examples, tmp_path, server):
    with pytest.raises(ConformanceError) as info:
        assert_conformance("wrong", tmp_path, extra_plugins={"wrong": IgnoresMaxBytes(examples["acme_stream"])},
                           server=server)
    message = str(info.value)
    assert "- max_bytes_aborts:" in message and "failed 1 of" in message
    assert "logged:" in message and "streaming_resume_decision" in message  # the failed check's events
    passed = [r for r in info.value.results if r.passed]
    assert passed and all(not r.logs for r in passed)


# -- job_key ------------------------------------------------------------------------------


class HashKeyed:
    """Keys by Python's hash(), which differs between processes."""

    @hookimpl
    def job_key(self, ctx):
        return JobKey(key=hashlib.sha256(str(hash(ctx.job.url)).encode()).hexdigest(), scheme="hash-v1")


class FileKeyed:
    """Reads a salt file on every call."""

    def __init__(self, salt):
        self.salt = salt

    @hookimpl
    def job_key(self, ctx):
        with open(self.salt, "rb") as fh:
            return JobKey(key=hashlib.sha256(fh.read() + ctx.job.url.encode()).hexdigest(), scheme="salted-v1")


class DnsKeyed:
    """Resolves the host (network I/O) to key the job."""

    @hookimpl
    def job_key(self, ctx):
        socket.getaddrinfo("localhost", 80)
        return JobKey(key=hashlib.sha256(ctx.job.url.encode()).hexdigest(), scheme="dns-v1")


class UpperKeyed:
    @hookimpl
    def job_key(self, ctx):
        return JobKey(key=hashlib.sha256(ctx.job.url.encode()).hexdigest().upper(), scheme="upper-v1")


def test_a_key_that_differs_in_another_process_fails_determinism(tmp_path, server):
    results = run_conformance("hashed", tmp_path, extra_plugins={"hashed": HashKeyed()}, server=server)
    assert failed(results) == ["job_key_deterministic"]
    assert "another process" in {r.name: r for r in results}["job_key_deterministic"].detail


@pytest.mark.parametrize("plugin", ["file", "dns"])
def test_a_key_that_does_io_fails_the_no_io_check(plugin, tmp_path, server):
    salt = tmp_path / "salt"
    salt.write_bytes(b"pepper")
    obj = FileKeyed(str(salt)) if plugin == "file" else DnsKeyed()
    results = {r.name: r for r in run_conformance(plugin, tmp_path, extra_plugins={plugin: obj}, server=server)}
    assert not results["job_key_no_io"].passed
    assert ("open" if plugin == "file" else "socket.getaddrinfo") in results["job_key_no_io"].detail
    assert results["job_key_deterministic"].passed


def test_a_key_that_is_not_lowercase_hex_fails_the_form_check(tmp_path, server):
    results = run_conformance("upper", tmp_path, extra_plugins={"upper": UpperKeyed()}, server=server)
    assert "job_key_well_formed" in failed(results)


def test_the_builtin_job_keys_run_in_another_process(tmp_path, server):
    results = run_conformance("streaming", tmp_path, checks=list(JOB_KEY_CHECKS), server=server)
    assert [r.name for r in results] == list(JOB_KEY_CHECKS) and all(r.passed for r in results), results


# -- one failure for what stops every check ------------------------------------------------


def test_a_name_clash_is_one_failure(examples, tmp_path, server):
    results = run_conformance("streaming", tmp_path, extra_plugins={"streaming": examples["acme_stream"]}, server=server)
    assert len(results) == 1 and results[0].name == "plugin_loads" and not results[0].passed
    assert "two plugins are named 'streaming'" in results[0].detail


def test_a_plugin_implementing_no_hook_is_one_failure(tmp_path, server):
    results = run_conformance("empty", tmp_path, extra_plugins={"empty": object()}, server=server)
    assert [(r.name, r.passed) for r in results] == [("plugin_loads", False)]
    assert "implements none of job_key, resume_decision, stream_io, finalize" in results[0].detail


def test_checks_a_plugin_does_not_implement_are_skipped_when_asked_for(examples, tmp_path, server):
    results = run_conformance("acme", tmp_path, extra_plugins={"acme": examples["acme_fetch"]}, server=server,
                              checks=["job_key_no_io", "full_download"])
    assert [(r.name, r.passed, r.skipped) for r in results] == [("job_key_no_io", True, False), ("full_download", True, True)]
    assert set(CHECKS) == set(JOB_KEY_CHECKS) | set(TRANSFER_CHECKS)


def test_the_checks_print_nothing(tmp_path):
    script = textwrap.dedent(f"""
        from contentdownload.testing.conformance import assert_conformance
        assert_conformance("streaming", {str(tmp_path)!r})
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
    assert done.returncode == 0, done.stderr
    assert done.stdout == "ok\n" and done.stderr == ""
