"""``Dispatcher.call_async``: a stage's chain asked on the event loop, with call's fallbacks and telemetry."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from contentdownload import hookimpl
from contentdownload.hooks.model import (Effects, FinalizeContext, FinalizeResult, Job, JobKey, ResumeDecision, StagePaths,
                                         StreamContext, StreamResult)
from contentdownload.machinery.config import EMPTY
from contentdownload.machinery.dispatch import StageFailed
from contentdownload.machinery.policy import Selection
from contentdownload.machinery.runtime import Runtime
from contentdownload.transfer.http import HttpClient

SYNC_ONLY = """
import threading
from contentdownload import StreamResult, hookimpl

@hookimpl
def stream_io(ctx):
    return StreamResult(status="failed", reason="acme-sync:" + threading.current_thread().name, url=ctx.url)
"""


def result(reason: str) -> StreamResult:
    return StreamResult(status="failed", reason=reason, url="http://h/x")


class AsyncAnswer:
    @hookimpl
    def stream_io_async(self, ctx):
        async def run():
            await asyncio.sleep(0)
            return result("async:" + threading.current_thread().name)
        return run()

    @hookimpl
    def stream_io(self, ctx):
        raise AssertionError("the synchronous impl must not run")


class SyncInstead:
    @hookimpl
    def stream_io_async(self, ctx):
        return None

    @hookimpl
    def stream_io(self, ctx):
        return result("sync:" + threading.current_thread().name)


class AsyncRaises:
    def __init__(self, write: int = 0):
        self.write = write

    @hookimpl
    async def stream_io_async(self, ctx):
        ctx.effects.wrote(self.write)
        raise RuntimeError("exploded")

    @hookimpl
    def stream_io(self, ctx):
        raise AssertionError("not asked")


class AsyncGenerator:
    @hookimpl
    async def stream_io_async(self, ctx):
        yield None


def context(tmp_path: Path) -> StreamContext:
    paths = StagePaths.for_key(tmp_path / "out" / "x", tmp_path / "staging", "k" * 64, root=tmp_path / "out")
    return StreamContext(job=Job(urls=("http://h/x",)), job_key=JobKey(key="k" * 64, scheme="t"), url="http://h/x", paths=paths,
                         decision=ResumeDecision(mode="fresh", reason="t"), http=HttpClient(), effects=Effects())


def ask(runtime: Runtime, chain: tuple[str, ...], ctx: StreamContext):
    selection = Selection(hook="stream_io", chain=chain, source="cli", detail="test")
    threads = []

    async def to_thread(fn, arg):
        threads.append(fn)
        return await asyncio.to_thread(fn, arg)

    async def main():
        threading.current_thread().name = "the-loop"
        return await runtime.dispatcher.call_async(selection, ctx, to_thread=to_thread)

    name = threading.current_thread().name
    try:
        return asyncio.run(main()), threads
    finally:
        threading.current_thread().name = name


def plugins(**extra) -> Runtime:
    return Runtime(config=EMPTY, environ={}, extra_plugins=extra)


def counts(runtime: Runtime, plugin: str) -> dict:
    return runtime.telemetry.snapshot()["stream_io"]["plugins"][plugin]


def test_an_async_answer_is_awaited_on_the_loop_and_counted_as_a_stream_io_answer(tmp_path):
    runtime = plugins(fast=AsyncAnswer())
    answer, threads = ask(runtime, ("fast", "legacy"), context(tmp_path))
    assert answer.plugin == "fast" and not answer.fallback and answer.result.reason == "async:the-loop"
    assert threads == []
    stats = counts(runtime, "fast")
    assert (stats["calls"], stats["answered"], stats["errors"], stats["fallbacks"]) == (1, 1, 0, 0)


def test_none_runs_that_plugin_s_own_stream_io_in_a_thread(tmp_path):
    runtime = plugins(slow=SyncInstead())
    answer, threads = ask(runtime, ("slow", "legacy"), context(tmp_path))
    assert answer.plugin == "slow" and answer.result.reason.startswith("sync:") and answer.result.reason != "sync:the-loop"
    assert len(threads) == 1
    assert counts(runtime, "slow")["answered"] == 1


def test_a_raising_async_impl_falls_back_while_nothing_was_written(tmp_path):
    runtime = plugins(broken=AsyncRaises(), slow=SyncInstead())
    answer, _ = ask(runtime, ("broken", "slow"), context(tmp_path))
    assert answer.plugin == "slow" and answer.fallback
    assert counts(runtime, "broken")["errors"] == 1 and counts(runtime, "slow")["fallbacks"] == 1


def test_a_raising_async_impl_after_writing_is_a_stage_failure(tmp_path):
    runtime = plugins(broken=AsyncRaises(write=10), slow=SyncInstead())
    with pytest.raises(StageFailed) as raised:
        ask(runtime, ("broken", "slow"), context(tmp_path))
    assert raised.value.plugin == "broken" and raised.value.effects.bytes_written == 10


def test_a_third_party_plugin_with_only_stream_io_works_through_call_async(tmp_path, third_party):
    third_party("acme-sync", {"acme_sync": SYNC_ONLY})
    runtime = Runtime(config=EMPTY, environ={})
    assert runtime.plugins.infos["acme_sync"].status == "active"
    answer, threads = ask(runtime, ("acme_sync", "legacy"), context(tmp_path))
    assert answer.plugin == "acme_sync" and answer.result.reason.startswith("acme-sync:")
    assert answer.result.reason != "acme-sync:the-loop" and len(threads) == 1
    assert counts(runtime, "acme_sync")["answered"] == 1


def test_call_async_asks_only_a_stage_with_an_asynchronous_form(tmp_path):
    runtime = plugins()
    with pytest.raises(ValueError):
        asyncio.run(runtime.dispatcher.call_async(Selection(hook="resume_decision", chain=("legacy",), source="cli", detail="t"),
                                                         context(tmp_path), to_thread=asyncio.to_thread))


def test_a_coroutine_function_may_implement_stream_io_async_but_an_async_generator_may_not():
    runtime = Runtime(config=EMPTY, environ={}, extra_plugins={"gen": AsyncGenerator(), "broken": AsyncRaises()})
    assert runtime.plugins.infos["broken"].status == "active"
    assert runtime.plugins.infos["gen"].status == "failed" and "generator" in runtime.plugins.infos["gen"].error


class FinalizeInstead:
    """``finalize_async`` declines (``None``): its own ``finalize`` answers, in a thread."""

    @hookimpl
    def finalize_async(self, ctx):
        return None

    @hookimpl
    def finalize(self, ctx):
        return FinalizeResult(ok=False, reason="sync:" + threading.current_thread().name)


class FinalizeRaises:
    """``finalize_async`` raises, before (or after, ``renamed``) its rename."""

    def __init__(self, renamed: bool = False):
        self.renamed = renamed

    @hookimpl
    async def finalize_async(self, ctx):
        if self.renamed:
            ctx.effects.mark_renamed()
        raise RuntimeError("exploded")


def finalize_context(tmp_path: Path) -> FinalizeContext:
    stream = StreamResult(status="complete", url="http://h/x", total_size=1, sha256="0" * 64)
    paths = StagePaths.for_key(tmp_path / "out" / "x", tmp_path / "staging", "k" * 64, root=tmp_path / "out")
    return FinalizeContext(job=Job(urls=("http://h/x",)), job_key=JobKey(key="k" * 64, scheme="t"), paths=paths, stream=stream,
                           effects=Effects())


def ask_finalize(runtime: Runtime, chain: tuple[str, ...], ctx: FinalizeContext):
    selection = Selection(hook="finalize", chain=chain, source="cli", detail="test")
    return asyncio.run(runtime.dispatcher.call_async(selection, ctx, to_thread=asyncio.to_thread))


def test_finalize_async_declining_runs_that_plugin_s_own_finalize_in_a_thread(tmp_path):
    runtime = plugins(slow=FinalizeInstead())
    answer = ask_finalize(runtime, ("slow", "legacy"), finalize_context(tmp_path))
    assert answer.plugin == "slow" and not answer.fallback
    assert answer.result.reason.startswith("sync:") and answer.result.reason != f"sync:{threading.current_thread().name}"
    assert runtime.telemetry.snapshot()["finalize"]["plugins"]["slow"]["answered"] == 1


def test_finalize_async_raising_before_the_rename_falls_back_after_it_fails_the_stage(tmp_path):
    runtime = plugins(broken=FinalizeRaises(), slow=FinalizeInstead())
    answer = ask_finalize(runtime, ("broken", "slow"), finalize_context(tmp_path))
    assert answer.plugin == "slow" and answer.fallback
    runtime = plugins(broken=FinalizeRaises(renamed=True), slow=FinalizeInstead())
    with pytest.raises(StageFailed) as raised:
        ask_finalize(runtime, ("broken", "slow"), finalize_context(tmp_path))
    assert raised.value.hook == "finalize" and raised.value.plugin == "broken"
