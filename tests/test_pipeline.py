"""Pipeline.run: candidates, attempts, retry accounting, fallbacks, aborts and the JobResult it fills."""

from __future__ import annotations

import os
import random
import threading

import pytest
from structlog.testing import capture_logs

from contentdownload import StreamResult, hookimpl
from contentdownload.machinery.dispatch import Answer
from contentdownload.errors import Cancelled, LeaseLostError, StagingError, StoreError, StoreUnavailableError
from contentdownload.transfer.http import HttpClient
from contentdownload.hooks.model import Job, JobKey, Lease
from contentdownload.jobs.pipeline import Pipeline, backoff_delay, check_same_filesystem
from contentdownload.testing.conformance import TransferRig, sha256_hex
from contentdownload.testing.server import Fault
from contentdownload.transfer.parts import PartStore, Sidecar, url_identity


@pytest.fixture
def rig(tmp_path):
    with TransferRig(None, tmp_path / "rig", retries=3) as r:
        yield r


def payload(seed: int, size: int = 200_000) -> bytes:
    return b"%PDF-1.7\n" + random.Random(seed).randbytes(size - 9)  # documents, as the file names say


# -- candidates ----------------------------------------------------------------------------


def test_candidates_are_tried_in_order_until_one_succeeds(rig, server):
    data = payload(1)
    missing = server.add_status("/mirror1/a.pdf", 404)
    good = server.add_file("/mirror2/a.pdf", data)
    result = rig.run(Job(urls=(missing, good)), "a.pdf")
    assert result.outcome == "downloaded" and result.url == good and result.reason == ""
    assert result.attempts == 2 and result.decisions == ("fresh", "fresh")
    assert rig.paths("a.pdf").final.read_bytes() == data


def test_when_every_candidate_fails_the_last_reason_is_the_jobs(rig, server):
    first = server.add_status("/m1/b.pdf", 404)
    second = server.add_status("/m2/b.pdf", 410)
    result = rig.run(Job(urls=(first, second)), "b.pdf")
    assert result.outcome == "failed" and result.reason == "http_410" and result.url == second
    assert result.http_status == 410


def test_a_part_from_another_candidate_is_discarded(tmp_path, server):
    data = payload(2)
    first = server.add_file("/m1/c.bin", data)
    second = server.add_file("/m2/c.bin", data)
    server.add_fault("/m1/c.bin", Fault.cut_after(50_000))
    with TransferRig("streaming", tmp_path / "rig", retries=0) as rig:
        result = rig.run(Job(urls=(first, second)), "c.bin")
    assert result.outcome == "downloaded" and result.url == second
    assert result.decisions == ("fresh", "discard")
    assert server.stats("/m2/c.bin").ranges == [None]
    assert rig.paths("c.bin").final.read_bytes() == data


def test_paths_can_depend_on_the_candidate(tmp_path, server):
    data = payload(3)
    first = server.add_status("/p1/d.bin", 503)
    second = server.add_file("/p2/d.bin", data)
    with TransferRig("streaming", tmp_path / "rig", retries=0) as rig:
        seen = []

        def paths_for(url):
            seen.append(url)
            return rig.paths("d.bin")

        key = rig.key("d.bin")
        result = rig.pipeline.run(Job(urls=(first, second)), key, paths_for, rig.runtime.policy.plan(key.key))
    assert seen == [first, second] and result.outcome == "downloaded"


# -- retries -------------------------------------------------------------------------------


def test_retries_are_bounded_per_candidate(tmp_path, server):
    data = payload(4)
    url = server.add_file("/always-short.bin", data)
    server.add_fault("/always-short.bin", Fault.short_body(100), times=-1)
    waits = []
    with TransferRig("streaming", tmp_path / "rig", retries=2, backoff_factor=0.25, sleep=waits.append) as rig:
        result = rig.run(Job(urls=(url,)), "always-short.bin")
    assert result.outcome == "failed" and result.reason == "short_body" and result.attempts == 3
    assert waits == [0.5]  # no wait before the first retry, then factor * 2
    assert not rig.paths("always-short.bin").final.exists()


def test_statuses_the_client_retried_are_not_retried_again(tmp_path, server):
    url = server.add_status("/down.bin", 503)
    with TransferRig("streaming", tmp_path / "rig", retries=5, http_retries=2) as rig:
        result = rig.run(Job(urls=(url,)), "down.bin")
    assert result.outcome == "failed" and result.reason == "http_503" and result.attempts == 3  # every request counts
    assert server.stats("/down.bin").requests == 3  # 1 + the client's 2 retries, not 6 * 3


def test_without_client_retries_the_pipeline_retries_statuses(tmp_path, server):
    url = server.add_status("/down2.bin", 500)
    with TransferRig("streaming", tmp_path / "rig", retries=2, http_retries=0) as rig:
        result = rig.run(Job(urls=(url,)), "down2.bin")
    assert result.outcome == "failed" and result.reason == "http_500" and result.attempts == 3
    assert server.stats("/down2.bin").requests == 3


def test_protocol_steps_do_not_use_the_retry_budget(tmp_path, server):
    data = payload(5)
    url = server.add_file("/steps.bin", data)
    with TransferRig("streaming", tmp_path / "rig", retries=0) as rig:
        paths = rig.paths("steps.bin")
        PartStore.for_paths(paths).save_sidecar(paths, Sidecar(url=url_identity(url), committed=len(data) + 5,
                                                      etag=server.etag("/steps.bin"), expected_total=len(data) + 9))
        paths.part.write_bytes(b"y" * (len(data) + 5))
        result = rig.run(Job(urls=(url,)), "steps.bin")
    # The resume asks from the overlap before the offset: a 206 whose total is not the recorded one, then whole.
    assert result.outcome == "downloaded" and server.stats("/steps.bin").statuses == [206, 200]


def test_backoff_delay_follows_urllib3_and_honours_retry_after():
    assert backoff_delay(1, 0.5) == 0.0
    assert backoff_delay(2, 0.5) == 1.0
    assert backoff_delay(3, 0.5) == 2.0
    assert backoff_delay(1, 0.5, retry_after=4) == 4.0
    assert backoff_delay(3, 0.5, retry_after=0.1) == 2.0
    assert backoff_delay(20, 1.0, cap=30) == 30.0
    assert backoff_delay(1, 0.0, retry_after=500, cap=120) == 120.0


def test_waiting_heartbeats_the_lease_and_stops_on_cancel():
    class Counting(Lease):
        beats = 0

        def heartbeat(self):
            Counting.beats += 1

    pipeline = Pipeline(runtime=None, http=HttpClient(), options=None)  # type: ignore[arg-type]
    pipeline.wait(0.6, Counting(), None)
    assert Counting.beats >= 2
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        pipeline.wait(30, Counting(), cancel)


# -- fallbacks and plugin faults -------------------------------------------------------------


class RaisesBeforeWriting:
    @hookimpl
    def stream_io(self, ctx):
        raise RuntimeError("boom before any byte")


class RaisesAfterWriting:
    def __init__(self):
        self.calls = 0

    @hookimpl
    def stream_io(self, ctx):
        self.calls += 1
        if self.calls > 1:
            return None  # decline from then on
        ctx.effects.wrote(5)
        ctx.paths.part.write_bytes(b"junk!")
        raise RuntimeError("boom after writing")


class Declines:
    @hookimpl
    def stream_io(self, ctx):
        return None


def test_a_plugin_raising_in_stream_io_before_writing_falls_back(tmp_path, server):
    data = payload(6)
    url = server.add_file("/fb.bin", data)
    with TransferRig("boom", tmp_path / "rig", extra_plugins={"boom": RaisesBeforeWriting()}, allow_fallback=True) as rig:
        with capture_logs() as logs:
            result = rig.run(Job(urls=(url,)), "fb.bin")
    assert result.outcome == "downloaded"
    assert result.plugins["stream_io"] == "streaming" and result.fallbacks["stream_io"] is True
    assert result.fallbacks["resume_decision"] is False
    assert any("falling back" in e["event"] for e in logs)
    assert rig.paths("fb.bin").final.read_bytes() == data


class StoreAway:
    """A stream_io whose lease heartbeat found the job store gone."""

    def __init__(self, error: Exception):
        self.error = error

    @hookimpl
    def stream_io(self, ctx):
        raise self.error


@pytest.mark.parametrize("error", [StoreUnavailableError("store away past the budget"), StoreError("store refused")])
def test_a_store_failure_inside_a_stage_is_no_plugin_fault_and_never_falls_back(tmp_path, server, error):
    url = server.add_file("/away.bin", payload(8))
    with TransferRig("away", tmp_path / "rig", extra_plugins={"away": StoreAway(error)}, allow_fallback=True) as rig:
        with pytest.raises(type(error)):
            rig.run(Job(urls=(url,)), "away.bin")
    assert server.stats("/away.bin").requests == 0  # legacy was not asked to fetch it instead


def test_a_plugin_raising_after_writing_is_retried_from_the_decision(tmp_path, server):
    data = payload(7)
    url = server.add_file("/sf.bin", data)
    plugin = RaisesAfterWriting()
    with TransferRig("sf", tmp_path / "rig", extra_plugins={"sf": plugin}, allow_fallback=True) as rig:
        with capture_logs() as logs:
            result = rig.run(Job(urls=(url,)), "sf.bin")
    assert result.outcome == "downloaded" and result.attempts == 2 and plugin.calls == 2
    assert result.decisions == ("fresh", "discard")  # the junk part had no sidecar
    assert result.plugins["stream_io"] == "streaming"
    events = [e["event"] for e in logs]
    assert "hook failed after changing the disk, not falling back" in events
    assert not any("plugin sf raised in stream_io, falling back" in e for e in events)
    assert rig.paths("sf.bin").final.read_bytes() == data


def test_no_plugin_answering_fails_the_job(tmp_path, server):
    url = server.add_file("/np.bin", payload(8))
    with TransferRig("decliner", tmp_path / "rig", extra_plugins={"decliner": Declines()}) as rig:
        result = rig.run(Job(urls=(url,)), "np.bin")
    assert result.outcome == "failed" and result.reason == "no_plugin"
    assert server.stats("/np.bin").requests == 0


def test_a_job_abort_from_a_stage_propagates(tmp_path, server):
    url = server.add_file("/abort.bin", payload(9))

    class Aborts:
        @hookimpl
        def stream_io(self, ctx):
            raise LeaseLostError("gone")

    with TransferRig("aborts", tmp_path / "rig", extra_plugins={"aborts": Aborts()}, allow_fallback=True) as rig:
        with pytest.raises(LeaseLostError):
            rig.run(Job(urls=(url,)), "abort.bin")
    assert server.stats("/abort.bin").requests == 0


def test_cancel_before_the_first_attempt(rig, server):
    url = server.add_file("/never.bin", payload(10))
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        rig.run(Job(urls=(url,)), "never.bin", cancel=cancel)
    assert server.stats("/never.bin").requests == 0


# -- the result ------------------------------------------------------------------------------


def test_the_result_names_plugins_validators_and_counts(rig, server):
    data = payload(11)
    url = server.add_file("/full.pdf", data, content_type="application/pdf")
    server.add_fault("/full.pdf", Fault.cut_after(70_000))
    progress, intents = [], []
    key = rig.key("full.pdf")
    answer = Answer(key, "streaming", False)

    def before_finalize(stream: StreamResult):
        intents.append((stream.status, stream.sha256, rig.paths("full.pdf").final.exists()))

    result = rig.run(Job(urls=(url,)), "full.pdf", progress=progress.append, job_key_answer=answer,
                     before_finalize=before_finalize)
    assert result.outcome == "resumed" and result.resumed_from == 70_000
    assert result.plugins == {"job_key": "streaming", "resume_decision": "streaming", "stream_io": "streaming", "finalize": "streaming"}
    assert result.fallbacks == dict.fromkeys(result.plugins, False)
    assert result.job_key == key.key and result.attempts == 2 and result.decisions == ("fresh", "resume")
    assert result.http_status == 206 and result.final_url == url and result.content_type == "application/pdf"
    assert result.etag == server.etag("/full.pdf") and result.last_modified == server.last_modified("/full.pdf")
    assert result.bytes_downloaded == len(data) == sum(progress)
    assert result.size == len(data) and result.sha256 == sha256_hex(data) and result.elapsed_ms > 0
    assert intents == [("complete", sha256_hex(data), False)]


def test_credentials_in_urls_are_not_in_the_result(rig, server):
    data = payload(12, 1000)
    server.add_file("/secret.bin", data)
    url = f"http://user:hunter2@127.0.0.1:{server.port}/secret.bin"
    result = rig.run(Job(urls=(url,)), "secret.bin")
    assert result.outcome == "downloaded"
    assert "hunter2" not in (result.url or "") and "hunter2" not in (result.final_url or "")


def test_check_same_filesystem(tmp_path, monkeypatch):
    a, b = tmp_path / "staging", tmp_path / "out"
    a.mkdir()
    b.mkdir()
    check_same_filesystem(a, b)
    real_stat = os.stat

    class Other:
        def __init__(self, st):
            self.st_dev = st.st_dev + 1

    monkeypatch.setattr(os, "stat", lambda p, *args, **kw: Other(real_stat(p)) if str(p) == str(a) else real_stat(p, *args, **kw))
    with pytest.raises(StagingError):
        check_same_filesystem(a, b)


def test_job_key_type_is_accepted_as_given(rig, server):
    data = payload(13, 5000)
    url = server.add_file("/k.bin", data)
    key = JobKey(key="f" * 64, scheme="custom-v1")
    result = rig.pipeline.run(Job(urls=(url,)), key, rig.paths("k.bin"), rig.runtime.policy.plan(key.key))
    assert result.job_key == "f" * 64 and result.outcome == "downloaded"
