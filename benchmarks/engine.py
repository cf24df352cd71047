"""The event-loop transport: files per second and CPU ms per file of one process fetching many small files.

    python benchmarks/engine.py [--files 2000] [--size 51200] [--tasks 8] [--repeat 3]

The corpus is served over loopback by nginx when installed, else by the package's test
server in its own process (``many_small.start_server``). Each client fetches every file
with ``--tasks`` concurrent transfers over keep-alive connections and throws the bodies
away, except ``stream_io_async``, which runs the streaming plugin's hook on fresh jobs
(parts written, hashed and closed; nothing promoted). Clients take turns (interleaved
repeats); medians are printed. CPU is this process's (user + system, all threads).

- ``engine uvloop``: :class:`contentdownload.transfer.engine.Engine` (httptools) on uvloop
- ``engine asyncio``: the same engine on asyncio's own loop
- ``h11 asyncio``: h11 over asyncio streams, when h11 is installed
- ``aiohttp``: when installed
- ``requests threads``: a ``requests`` session per thread, one thread per transfer (the synchronous path's transport)
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from many_small import start_server  # noqa: E402

from contentdownload.transfer.engine import Engine, new_event_loop  # noqa: E402


def _engine(loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> Callable[[list[str], int, Path], None]:
    def fetch(urls: list[str], tasks: int, work: Path) -> None:
        async def main() -> None:
            engine = Engine(per_host=tasks, connect_timeout=10, read_timeout=30, ssl_context=None,
                            default_headers={"Accept-Encoding": "identity"})
            queue = iter(urls)

            async def worker() -> None:
                for url in queue:
                    exchange = await engine.open(url, {})
                    async for _ in exchange.chunks():
                        pass

            await asyncio.gather(*(worker() for _ in range(tasks)))
            await engine.aclose()

        loop = loop_factory()
        try:
            loop.run_until_complete(main())
        finally:
            loop.close()

    return fetch


def _h11(urls: list[str], tasks: int, work: Path) -> None:
    import h11
    from urllib.parse import urlsplit

    async def worker(queue: Any) -> None:
        reader = writer = conn = None
        for url in queue:
            parts = urlsplit(url)
            if conn is None or conn.our_state is h11.MUST_CLOSE:
                reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
                conn = h11.Connection(h11.CLIENT)
            else:
                conn.start_next_cycle()
            writer.write(conn.send(h11.Request(method="GET", target=parts.path, headers=[("Host", parts.netloc),
                                                                                        ("Accept-Encoding", "identity")])))
            writer.write(conn.send(h11.EndOfMessage()))
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(256 << 10))
                elif isinstance(event, h11.EndOfMessage):
                    break
        if writer is not None:
            writer.close()

    async def main() -> None:
        queue = iter(urls)
        await asyncio.gather(*(worker(queue) for _ in range(tasks)))

    asyncio.run(main())


def _aiohttp(urls: list[str], tasks: int, work: Path) -> None:
    import aiohttp

    async def main() -> None:
        queue = iter(urls)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit_per_host=tasks), auto_decompress=False) as session:
            async def worker() -> None:
                for url in queue:
                    async with session.get(url) as response:
                        async for _ in response.content.iter_chunked(256 << 10):
                            pass

            await asyncio.gather(*(worker() for _ in range(tasks)))

    asyncio.run(main())


def _requests(urls: list[str], tasks: int, work: Path) -> None:
    import requests

    local = threading.local()

    def one(url: str) -> None:
        session = getattr(local, "session", None) or setattr(local, "session", requests.Session()) or local.session
        with session.get(url, stream=True, headers={"Accept-Encoding": "identity"}) as response:
            for _ in response.iter_content(64 << 10):
                pass

    with ThreadPoolExecutor(tasks) as pool:
        list(pool.map(one, urls))


class _StreamIoAsync:
    """The streaming plugin's hook through the dispatcher, on uvloop, writing each body to a part (set up before timing)."""

    def __init__(self) -> None:
        from contentdownload.hooks.model import Job, JobKey, ResumeDecision, StagePaths, StreamContext
        from contentdownload.machinery.config import EMPTY
        from contentdownload.machinery.runtime import Runtime
        from contentdownload.transfer.http import HttpClient

        self.model = (Job, JobKey, StagePaths, StreamContext)
        self.runtime = Runtime(config=EMPTY, environ={})
        self.selection = self.runtime.policy.select("stream_io")
        self.http = HttpClient()
        self.decision = ResumeDecision(mode="fresh", reason="benchmark")

    def __call__(self, urls: list[str], tasks: int, work: Path) -> None:
        Job, JobKey, StagePaths, StreamContext = self.model
        staging, out = work / "staging", work / "out"
        staging.mkdir(exist_ok=True)
        out.mkdir(exist_ok=True)

        async def main() -> None:
            self.http.engine = Engine(per_host=tasks, connect_timeout=10, read_timeout=30, ssl_context=None, default_headers={})
            queue = iter(urls)

            async def worker() -> None:
                for url in queue:
                    key = hashlib.sha256(url.encode()).hexdigest()
                    paths = StagePaths.for_key(out / key, staging, key, root=out)
                    ctx = StreamContext(job=Job(urls=(url,)), job_key=JobKey(key=key, scheme="bench"), url=url, paths=paths,
                                        decision=self.decision, http=self.http)
                    answer = await self.runtime.dispatcher.call_async(self.selection, ctx, to_thread=asyncio.to_thread)
                    if answer.result.status != "complete":
                        raise RuntimeError(f"{url}: {answer.result.reason}")
                    paths.part.unlink()

            await asyncio.gather(*(worker() for _ in range(tasks)))
            await self.http.engine.aclose()

        loop = new_event_loop()
        try:
            loop.run_until_complete(main())
        finally:
            loop.close()


def clients() -> dict[str, Callable[[list[str], int, Path], None]]:
    found: dict[str, Callable[[list[str], int, Path], None]] = {}
    try:
        import uvloop
    except ImportError:
        pass
    else:
        found["engine uvloop"] = _engine(uvloop.new_event_loop)
    found["engine asyncio"] = _engine(asyncio.new_event_loop)
    for name, module, fn in (("h11 asyncio", "h11", _h11), ("aiohttp", "aiohttp", _aiohttp)):
        try:
            __import__(module)
        except ImportError:
            print(f"({module} is not installed: no {name!r} row)")
        else:
            found[name] = fn
    found["requests threads"] = _requests
    found["stream_io_async uvloop"] = _StreamIoAsync()
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--size", type=int, default=50 * 1024)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cd-engine-bench-") as tmp:
        work = Path(tmp)
        root = work / "www"
        root.mkdir()
        for i in range(args.files):
            (root / f"f{i:05d}.bin").write_bytes(os.urandom(args.size))
        server, base, server_name = start_server(root, work)
        urls = [f"{base}/f{i:05d}.bin" for i in range(args.files)]
        found = clients()
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in found}
        try:
            for _ in range(args.repeat):
                for name, fetch in found.items():  # interleaved, so machine noise hits every client alike
                    wall, cpu = time.perf_counter(), time.process_time()
                    fetch(urls, args.tasks, work)
                    times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
        finally:
            server.terminate()
            server.wait(timeout=10)
    print(f"{args.files} files x {args.size} B over loopback ({server_name}), {args.tasks} concurrent, median of {args.repeat}")
    print(f"{'client':<26} {'files/s':>9} {'CPU ms/file':>12}")
    for name, t in times.items():
        print(f"{name:<26} {args.files / statistics.median(w for w, _ in t):>9.0f} {1000 * statistics.median(c for _, c in t) / args.files:>12.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
