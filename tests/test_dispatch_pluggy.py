"""Dispatch goes through pluggy: hook wrappers, call monitoring, the hook API version, specname collisions."""

from __future__ import annotations

import json
import os

import pytest

from contentdownload.hooks.model import ASYNC_HOOKS, HOOKS, Job, JobKeyContext
from contentdownload.hooks.specs import HOOKSPEC_VERSION
from contentdownload.machinery.runtime import Runtime

from helpers import make_distribution, run_cli

TRACER = """
import os
from contentdownload import hookimpl

def _wrap(hook):
    def wrapper(ctx):
        result = yield
        with open(os.environ["TRACE_FILE"], "a") as f:
            f.write(f"{hook} {type(ctx).__name__} {type(result).__name__}\\n")
        return result
    wrapper.__name__ = hook
    return hookimpl(wrapper=True)(wrapper)

job_key = _wrap("job_key")
resume_decision = _wrap("resume_decision")
stream_io = _wrap("stream_io")
stream_io_async = _wrap("stream_io_async")
finalize = _wrap("finalize")
finalize_async = _wrap("finalize_async")
"""

FUTURE = """
from contentdownload import JobKey, hookimpl

CONTENTDOWNLOAD_HOOKSPEC = 99

@hookimpl
def job_key(ctx):
    return JobKey(key="future", scheme="future-v1")
"""

TWICE = """
from contentdownload import hookimpl

@hookimpl(specname="job_key")
def first_key(ctx):
    return None

@hookimpl(specname="job_key")
def second_key(ctx):
    return None
"""


def _env(*roots, **extra) -> dict:
    inherited = [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {"PYTHONPATH": os.pathsep.join([*map(str, roots), *inherited]), **extra}


def _run(server, tmp_path, name: str, env: dict) -> dict:
    jobs = tmp_path / "urls.txt"
    jobs.write_text("".join(server.url(f"/{n}.bin") + "\n" for n in ("a", "b", "c")))
    out = tmp_path / name
    proc = run_cli("run", str(jobs), "--out", str(out), "--no-progress", env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    return {r["path"]: (r["outcome"], r["sha256"], r["plugins"], r["fallbacks"]) for r in rows}


@pytest.mark.slow
def test_tracer_wrapper_sees_every_call_and_changes_no_result(server, tmp_path):
    for n, size in (("a", 3000), ("b", 70_000), ("c", 1)):
        server.add_file(f"/{n}.bin", n.encode() * size)
    root = make_distribution(tmp_path / "site", "acme-tracer", {"acme_tracer": TRACER})
    trace = tmp_path / "trace.txt"
    plain = _run(server, tmp_path, "plain", _env())
    traced = _run(server, tmp_path, "traced", _env(root, TRACE_FILE=str(trace)))
    assert traced == plain and len(plain) == 3
    assert all(outcome == "downloaded" for outcome, *_ in plain.values())
    calls = [line.split() for line in trace.read_text().splitlines()]
    for hook, result in (("job_key", "JobKey"), ("resume_decision", "ResumeDecision")):
        assert [c[2] for c in calls if c[0] == hook] == [result] * 3, hook
    # On the event-loop lane a transfer is asked of stream_io_async first, and a complete one's promotion of
    # finalize_async (their results: the coroutines); every one handed over to a thread (none of these three)
    # would be a stream_io or finalize call too.
    for hook in ("stream_io", "finalize"):
        assert [c[2] for c in calls if c[0] == f"{hook}_async"] == ["coroutine"] * 3, hook
        assert [c[2] for c in calls if c[0] == hook] == [], hook
    # A plugin that only wraps a hook is listed with its hooks but never asked as a chain member.
    listed = {p["name"]: p for p in json.loads(run_cli("plugins", "list", "--json", env=_env(root), cwd=tmp_path).stdout)["plugins"]}
    assert listed["acme_tracer"]["status"] == "active" and set(listed["acme_tracer"]["hooks"]) == {*HOOKS, *ASYNC_HOOKS}


def test_wrapper_only_plugin_is_not_a_chain_member(third_party):
    third_party("acme-tracer", {"acme_tracer": TRACER})
    rt = Runtime(environ={})
    assert not any(rt.plugins.implements("acme_tracer", hook) for hook in HOOKS)
    assert all("acme_tracer" not in rt.policy.select(hook).chain for hook in HOOKS)


def test_hookcall_monitoring_sees_dispatched_calls():
    rt = Runtime(environ={})
    seen: list[tuple[str, str, object]] = []
    undo = rt.plugins.pm.add_hookcall_monitoring(
        lambda hook, impls, kwargs: seen.append(("before", hook, [i.plugin_name for i in impls])),
        lambda outcome, hook, impls, kwargs: seen.append(("after", hook, outcome.get_result())),
    )
    try:
        answer = rt.dispatcher.call(rt.policy.select("job_key"), JobKeyContext(job=Job("http://example.com/a.pdf"), relative_path="a.pdf"))
    finally:
        undo()
    assert seen == [("before", "job_key", ["streaming"]), ("after", "job_key", answer.result)]


def test_plugin_needing_a_newer_hook_api_is_skipped(server, tmp_path):
    assert HOOKSPEC_VERSION < 99
    root = make_distribution(tmp_path / "site", "acme-future", {"acme_future": FUTURE})
    proc = run_cli("plugins", "list", "--json", env=_env(root), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    info = {p["name"]: p for p in json.loads(proc.stdout)["plugins"]}["acme_future"]
    reason = f"needs hook API 99, this host has {HOOKSPEC_VERSION}"
    assert (info["status"], info["error"], info["hooks"]) == ("skipped", reason, [])
    text = run_cli("plugins", "list", env=_env(root), cwd=tmp_path).stdout
    assert f"acme_future: skipped: {reason}" in text
    server.add_file("/a.bin", b"a" * 100)
    (tmp_path / "urls.txt").write_text(server.url("/a.bin") + "\n")
    run = run_cli("run", str(tmp_path / "urls.txt"), "--out", str(tmp_path / "out"), "--no-progress", env=_env(root), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "out" / "a.bin").read_bytes() == b"a" * 100


def test_two_implementations_of_one_hook_fail_the_plugin(third_party):
    third_party("acme-twice", {"acme_twice": TWICE})
    info = Runtime(environ={}).plugins.infos["acme_twice"]
    assert info.status == "failed"
    assert "2 implementations of job_key (first_key, second_key, via specname)" in info.error


GENERATOR = """
from contentdownload import hookimpl

@hookimpl
def job_key(ctx):
    yield
"""


def test_generator_answer_without_wrapper_fails_the_plugin(third_party):
    third_party("acme-gen", {"acme_gen": GENERATOR})
    info = Runtime(environ={}).plugins.infos["acme_gen"]
    assert info.status == "failed" and "generator or coroutine without wrapper=True" in info.error
