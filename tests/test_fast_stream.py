"""The streaming plugin's ``stream_io_async`` over real loopback sockets, against its synchronous ``stream_io``.

Every hostile case of the test server goes once through the event-loop engine
(:meth:`Dispatcher.call_async`) and once through ``stream_io`` on an identical
fresh job; both then go through the streaming ``finalize``. Outcome, reason, size,
SHA-256 and the files left in staging and at the final path must be the same.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from contentdownload.errors import Cancelled
from contentdownload.hooks.model import Effects, FinalizeContext, Job, JobKey, ResumeDecision, StagePaths, StreamContext, TransferOptions
from contentdownload.machinery.config import EMPTY
from contentdownload.machinery.runtime import Runtime
from contentdownload.testing.server import Fault
from contentdownload.transfer.engine import Engine, new_event_loop
from contentdownload.transfer.http import HttpClient
from contentdownload_streaming import finalize as streaming_finalize
from contentdownload_streaming import stream as streaming_stream

OPTIONS = TransferOptions(chunk_size=16 << 10, checkpoint_bytes=1 << 20, timeout=(5.0, 1.0))
PDF = b"%PDF-1.4\n" + os.urandom(30_000)


def b64sha(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


class Side:
    """One way of running a job: its folders, its HTTP client, the job's context."""

    def __init__(self, root: Path, http: HttpClient):
        self.root, self.http = root, http
        self.sent: list[str] = []  # URLs sent through requests
        get = http.get
        http.get = lambda url, *a, **kw: (self.sent.append(url), get(url, *a, **kw))[1]
        (root / "out").mkdir(parents=True)
        (root / "staging").mkdir()

    def context(self, url: str, name: str, job: Job | None = None, options: TransferOptions = OPTIONS, **kwargs) -> StreamContext:
        key = hashlib.sha256(name.encode()).hexdigest()
        paths = StagePaths.for_key(self.root / "out" / name, self.root / "staging", key, root=self.root / "out")
        return StreamContext(job=job or Job(urls=(url,)), job_key=JobKey(key=key, scheme="test"), url=url, paths=paths,
                             decision=ResumeDecision(mode="fresh", reason="test"), http=self.http, options=options,
                             effects=Effects(), **kwargs)

    def outcome(self, ctx: StreamContext, result) -> dict:
        """What the job ends as after the streaming finalize, and what is left on disk."""
        final = None
        if result.status == "complete":
            final = streaming_finalize.finalize(FinalizeContext(job=ctx.job, job_key=ctx.job_key, paths=ctx.paths, stream=result,
                                                                options=ctx.options))
        files = {p.name.replace(ctx.job_key.key, "KEY"): _content(p) for p in sorted(self.root.rglob("*")) if p.is_file()}
        return {
            "status": result.status, "reason": result.reason, "http_status": result.http_status,
            "bytes_written": result.bytes_written, "total_size": result.total_size, "sha256": result.sha256,
            "resumed_from": result.resumed_from, "server_digests": result.server_digests, "verified_by": result.verified_by,
            "content_type": result.content_type, "etag": result.etag, "last_modified": result.last_modified,
            "final_url": result.final_url, "effects": ctx.effects.bytes_written,
            "finalize": None if final is None else (final.ok, final.reason, final.size, final.sha256),
            "files": files,
        }


def _content(path: Path):
    """A file's SHA-256; a sidecar's fields but the time it was written."""
    if path.suffix == ".json":
        return {k: v for k, v in json.loads(path.read_text()).items() if k != "updated"}
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def loop():
    loop = new_event_loop()
    executor = ThreadPoolExecutor(4)
    loop.set_default_executor(executor)
    yield loop
    loop.close()
    executor.shutdown()


@pytest.fixture
def runtime():
    return Runtime(config=EMPTY, environ={})


class Async:
    """The event-loop side: an engine on the client, the stream_io chain asked through ``call_async``."""

    def __init__(self, loop, runtime, side: Side):
        self.loop, self.runtime, self.side = loop, runtime, side
        side.http.engine = side.http.new_engine(per_host=4)  # as the lane builds it: the client's timeouts and headers

    def run(self, ctx: StreamContext):
        selection = self.runtime.policy.select("stream_io")
        to_thread = lambda fn, arg: self.loop.run_in_executor(None, fn, arg)  # noqa: E731
        return self.loop.run_until_complete(self.runtime.dispatcher.call_async(selection, ctx, to_thread=to_thread))


def both(tmp_path, loop, runtime, server, url: str, name: str, arm=lambda: None, **context):
    """Run the job through the engine and through ``stream_io`` (the server's faults armed anew for each).

    Each outcome also says whether the engine's side sent anything through requests.
    """
    outcomes = []
    for kind in ("async", "sync"):
        with HttpClient(timeout=OPTIONS.timeout, retries=0) as http:
            side = Side(tmp_path / kind, http)
            ctx = side.context(url, name, **context)
            server.clear_faults()
            arm()
            if kind == "async":
                result = Async(loop, runtime, side).run(ctx).result
            else:
                result = streaming_stream.stream_io(ctx)
            outcomes.append({**side.outcome(ctx, result), "through requests": bool(side.sent)})
    return outcomes



BODY = os.urandom(80_000)
SMALL = os.urandom(5_000)
BIG = os.urandom(1_500_000)  # past one checkpoint: stream_io's
HUGE = os.urandom((9 << 20) + 4321)  # hashed and written by threads of their own, checkpoints started by the writer


def _lying_digest(server):
    return server.add_file("/lies.pdf", PDF, headers={"Repr-Digest": f"sha-256=:{b64sha(b'x')}:"}), {}


#: Fields a reset may leave different (the bytes in flight are lost), and that a fault changing the validators changes per request.
NOT_FILES = ("files", "bytes_written", "total_size", "effects")
VALIDATORS = ("etag", "last_modified")

CASES = {
    # name: (serve(server) -> (url, context kwargs), faults to arm before each run, fields not compared)
    "ok": (lambda s: (s.add_file("/ok.pdf", PDF, content_type="application/pdf"), {}), (), ()),
    "small": (lambda s: (s.add_file("/small.bin", SMALL), {}), (), ()),
    "empty": (lambda s: (s.add_file("/empty.bin", b""), {}), (), ()),
    "no validators": (lambda s: (s.add_file("/plain.bin", BODY, no_etag=True, no_last_modified=True), {}), (), ()),
    "weak etag": (lambda s: (s.add_file("/weak.bin", BODY, weak_etag=True), {}), (), ()),
    "html for a pdf": (lambda s: (s.add_file("/page.pdf", b"<!doctype html><html><body>sign in</body></html>"), {}), (), ()),
    "lying repr-digest": (_lying_digest, (), ()),
    "matching digests": (lambda s: (s.add_file("/digests.bin", BODY, repr_digest=True, content_digest=True), {}), (), ()),
    "lying content-digest": (lambda s: (s.add_file("/cd.bin", BODY), {}),
                             (Fault.add_headers({"Content-Digest": f"sha-256=:{b64sha(b'other')}:"}),), ()),
    "cut": (lambda s: (s.add_file("/cut.bin", BODY), {}), (Fault.cut_after(20_000),), ()),
    "cut small": (lambda s: (s.add_file("/cutsmall.bin", SMALL), {}), (Fault.cut_after(1_000),), ()),
    "cut before the body": (lambda s: (s.add_file("/cut0.bin", BODY), {}), (Fault.cut_after(0),), ()),
    "reset": (lambda s: (s.add_file("/reset.bin", BODY), {}), (Fault.cut_after(20_000, reset=True),), NOT_FILES),
    "short body": (lambda s: (s.add_file("/short.bin", BODY), {}), (Fault.short_body(100),), ()),
    "stall": (lambda s: (s.add_file("/stall.bin", BODY), {}), (Fault.stall(3.0, after=10_000, close=True),), ()),
    "too slow": (lambda s: (s.add_file("/drip.bin", BODY),
                            {"options": TransferOptions(chunk_size=16 << 10, checkpoint_bytes=1 << 20, timeout=(5.0, 5.0),
                                                        low_speed_limit=50_000, low_speed_time=0.3)}),
                 (Fault.drip(5_000, after=1_000),), NOT_FILES),
    "delay": (lambda s: (s.add_file("/delay.bin", SMALL), {}), (Fault.delay(0.1),), ()),
    "content changed": (lambda s: (s.add_file("/changed.bin", SMALL), {}), (Fault.change_content(BODY),), VALIDATORS),
    "etag changed": (lambda s: (s.add_file("/etag.bin", SMALL), {}), (Fault.change_etag(),), VALIDATORS),
    "range ignored": (lambda s: (s.add_file("/ignored.bin", SMALL), {}), (Fault.ignore_range(),), ()),
    "signed": (lambda s: (s.require_signature("/signed.bin", b"k") or s.add_file("/signed.bin", SMALL) and s.signed_url("/signed.bin", b"k"),
                          {}), (), ()),
    "signature refused": (lambda s: (s.require_signature("/unsigned.bin", b"k") or s.add_file("/unsigned.bin", SMALL), {}), (), ()),
    "headers never come": (lambda s: (s.add_file("/closed.bin", SMALL), {}), (Fault.close_before_headers(),), ()),
    "two lengths": (lambda s: (s.add_file("/lengths.bin", SMALL), {}), (Fault.add_headers({"Content-Length": "17"}),), ()),
    "206 never asked for": (lambda s: (s.add_file("/range.bin", BODY), {}), (Fault.wrong_content_range(5),), ()),
    "gzip announced": (lambda s: (s.add_file("/coded.bin", SMALL), {}), (Fault.add_headers({"Content-Encoding": "gzip"}),), ()),
    "404": (lambda s: (s.add_status("/gone.pdf", 404), {}), (), ()),
    "410": (lambda s: (s.add_status("/gone410.pdf", 410), {}), (), ()),
    "503 retry-after": (lambda s: (s.add_file("/busy.bin", SMALL), {}), (Fault.status(503, retry_after=7),), ()),
    "429": (lambda s: (s.add_file("/many.bin", SMALL), {}), (Fault.status(429, retry_after=3),), ()),
    "500": (lambda s: (s.add_status("/broken.bin", 500), {}), (), ()),
    "redirect": (lambda s: (s.url(s.add_redirect("/moved.bin", s.add_file("/target.bin", BODY)) and "/moved.bin"), {}), (), ()),
    "unsafe redirect": (lambda s: (s.url(s.add_redirect("/away.pdf", "ftp://files.example/away.pdf") and "/away.pdf"), {}), (), ()),
    "size mismatch": (lambda s: (s.add_file("/sized.bin", SMALL), {"job": Job(urls=(s.url("/sized.bin"),), size=4_999)}), (), ()),
    "size given": (lambda s: (s.add_file("/sized-ok.bin", SMALL), {"job": Job(urls=(s.url("/sized-ok.bin"),), size=5_000)}), (), ()),
    "too large": (lambda s: (s.add_file("/large.bin", BODY),
                             {"options": TransferOptions(chunk_size=16 << 10, checkpoint_bytes=1 << 20, timeout=(5.0, 1.0),
                                                         max_bytes=50_000)}), (), ()),
    "past one checkpoint": (lambda s: (s.add_file("/big.bin", BIG), {}), (), ()),
    "huge": (lambda s: (s.add_file("/huge.bin", HUGE), {}), (), ()),
    "huge cut": (lambda s: (s.add_file("/hugecut.bin", HUGE), {}), (Fault.cut_after((8 << 20) + 777),), ()),
}


#: The cases the engine answers itself; the others go to stream_io after its response (or its failure).
ENGINE_ANSWERS = {"ok", "small", "empty", "no validators", "weak etag", "html for a pdf", "lying repr-digest", "matching digests",
                  "lying content-digest", "cut", "cut small", "cut before the body", "reset", "short body", "stall", "too slow",
                  "delay", "size given", "etag changed", "content changed", "range ignored", "signed",
                  "past one checkpoint", "huge", "huge cut", "signature refused", "404", "410"}  # the last three: a final failure, no body read


def _comparable(outcome: dict, ignore: tuple[str, ...]) -> dict:
    return {name: value for name, value in outcome.items() if name not in (*ignore, "through requests")}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_hostile_cases_end_alike_through_the_engine_and_requests(tmp_path, loop, runtime, server, case):
    serve, faults, ignore = CASES[case]
    url, context = serve(server)

    def arm():
        path = "/" + url.split("/", 3)[3]
        for fault in faults:  # twice: the engine's request may be answered, then stream_io's sent
            server.add_fault(path, fault, times=2)

    fast, slow = both(tmp_path, loop, runtime, server, url, "file" + os.path.splitext(url)[1], arm, **context)
    assert _comparable(fast, ignore) == _comparable(slow, ignore)
    assert fast["through requests"] is (case not in ENGINE_ANSWERS)


def test_a_regular_200_is_served_by_the_engine_alone(tmp_path, loop, runtime, server):
    url = server.add_file("/one.pdf", PDF)
    with HttpClient(timeout=OPTIONS.timeout, retries=0) as http:
        side = Side(tmp_path / "a", http)
        ctx = side.context(url, "one.pdf")
        answer = Async(loop, runtime, side).run(ctx)
        assert answer.plugin == "streaming" and answer.result.status == "complete"
        assert side.sent == [] and server.stats("/one.pdf").requests == 1
        assert server.requests[0].headers.get("User-Agent") == http.user_agent
        assert server.requests[0].headers.get("Accept-Encoding") == "identity"
        assert server.requests[0].headers.get("Want-Repr-Digest")
    stats = runtime.telemetry.snapshot()
    assert stats["stream_io"]["plugins"]["streaming"]["answered"] == stats["stream_io"]["total"]["calls"] == 1


def test_a_302_is_fetched_through_stream_io(tmp_path, loop, runtime, server):
    target = server.add_file("/there.bin", BODY)
    server.add_redirect("/here.bin", target)
    with HttpClient(timeout=OPTIONS.timeout, retries=0) as http:
        side = Side(tmp_path / "a", http)
        ctx = side.context(server.url("/here.bin"), "here.bin")
        result = Async(loop, runtime, side).run(ctx).result
    assert result.status == "complete" and result.final_url == target and result.sha256 == hashlib.sha256(BODY).hexdigest()
    assert side.sent == [server.url("/here.bin")]
    assert server.stats("/here.bin").requests == 2 and server.stats("/there.bin").requests == 1


def test_cancelled_from_progress_propagates_and_keeps_the_part(tmp_path, loop, runtime, server):
    url = server.add_file("/cancel.bin", BODY)
    server.throttle(100_000)  # several blocks
    calls = []

    def progress(n):
        calls.append(n)
        raise Cancelled("stop")

    with HttpClient(timeout=OPTIONS.timeout, retries=0) as http:
        side = Side(tmp_path / "a", http)
        ctx = side.context(url, "cancel.bin", progress=progress)
        with pytest.raises(Cancelled):
            Async(loop, runtime, side).run(ctx)
    assert calls and ctx.paths.part.stat().st_size == ctx.effects.bytes_written == calls[0]
    assert json.loads(ctx.paths.sidecar.read_text())["committed"] == calls[0]
    assert not ctx.paths.final.exists()


def test_a_full_disk_met_by_the_writer_thread_is_a_disk_error_and_keeps_the_bytes_written(tmp_path, loop, runtime, server,
                                                                                          monkeypatch):
    from contentdownload.errors import DiskError
    from contentdownload.transfer import blocks

    url = server.add_file("/full.bin", HUGE)
    real_write, written = os.write, [0]

    def write(fd, data):
        if written[0] >= 5 << 20:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = real_write(fd, data)
        written[0] += n
        return n

    with HttpClient(timeout=OPTIONS.timeout, retries=0) as http:
        side = Side(tmp_path / "a", http)
        ctx = side.context(url, "full.bin")
        monkeypatch.setattr(blocks.os, "write", write)
        with pytest.raises(DiskError) as raised:
            Async(loop, runtime, side).run(ctx)
        monkeypatch.undo()
    assert raised.value.reason == "disk_full"
    assert ctx.paths.part.stat().st_size == written[0] and ctx.paths.part.read_bytes() == HUGE[:written[0]]
    assert json.loads(ctx.paths.sidecar.read_text())["committed"] <= written[0]  # never more than the file holds
    assert not ctx.paths.final.exists()


@pytest.mark.parametrize("setting", ["cookies", "host_rate", "limit_rate", "proxy", "env proxy", "userinfo", "netrc", "scheme"])
def test_the_engine_is_not_offered_where_only_requests_does_it(tmp_path, monkeypatch, server, setting):
    url = server.url("/x.bin")
    kwargs = {"cookies": {"cookies": __import__("requests").cookies.RequestsCookieJar()}, "host_rate": {"host_rate": 2.0},
              "limit_rate": {"limit_rate": 1000}, "proxy": {"proxies": {"http": "http://proxy.example:3128"}}}.get(setting, {})
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    if setting == "env proxy":
        monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")
    if setting == "userinfo":
        url = url.replace("://", "://user:secret@")
    if setting == "netrc":
        (tmp_path / ".netrc").write_text(f"machine {server.host} login user password secret\n")
    if setting == "scheme":
        url = "ftp://files.example/x.bin"
    with HttpClient(**kwargs) as http:
        assert http.engine_for(url) is None  # no engine yet
        http.engine = Engine(per_host=1, connect_timeout=1, read_timeout=1, ssl_context=None, default_headers={})
        assert http.engine_for(url) is None
        assert http.engine_for(server.url("/x.bin")) is (None if setting in ("cookies", "host_rate", "limit_rate", "proxy", "env proxy", "netrc") else http.engine)


def test_no_proxy_gives_the_engine_back(monkeypatch, server):
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", server.host)
    with HttpClient() as http:
        http.engine = Engine(per_host=1, connect_timeout=1, read_timeout=1, ssl_context=None, default_headers={})
        assert http.engine_for(server.url("/x.bin")) is http.engine


def test_a_host_paused_by_retry_after_goes_through_requests(server):
    with HttpClient() as http:
        http.engine = Engine(per_host=1, connect_timeout=1, read_timeout=1, ssl_context=None, default_headers={})
        assert http.engine_for(server.url("/x.bin")) is http.engine
        http.pacer.pause(server.host, 30)
        assert http.engine_for(server.url("/x.bin")) is None


def test_a_store_given_up_on_during_the_body_stops_the_run_not_the_attempt(tmp_path, loop, runtime, server):
    """The store's error (an OSError too) raised by the block's progress call is not a transport error to retry."""
    from contentdownload.errors import StoreUnavailableError

    server.add_file("/big", b"x" * (256 << 10))
    with HttpClient(timeout=OPTIONS.timeout, retries=0) as http:
        side = Side(tmp_path / "a", http)

        def progress(n):
            raise StoreUnavailableError("the job store is away")

        with pytest.raises(StoreUnavailableError):
            Async(loop, runtime, side).run(side.context(server.url("/big"), "big", progress=progress))
