"""Single-file throughput over loopback: the streaming and legacy pipelines against requests, curl and wget.

    python benchmarks/throughput.py                    # 1 GiB, 5 repeats
    python benchmarks/throughput.py --size 256M --repeat 3
    python benchmarks/throughput.py --server loopback  # the package's server instead of nginx

The file is served by nginx when it is installed (sendfile, one worker), else by
``python -m contentdownload.testing.server --root DIR`` in its own process, so the server
never shares the client's interpreter. Every client runs in its own process, one after
the other, rounds interleaved; between runs the output is removed, the page cache written
back (``sync``) and the disk given ``--settle`` seconds, so no run pays for the previous
one's dirty pages.

Clients:

- ``streaming`` / ``legacy``: :class:`contentdownload.jobs.pipeline.Pipeline` with that plugin
  pinned for every transfer hook; the time runs from the request to the finished,
  renamed file (streaming includes its fsyncs of the part and the folder);
- ``requests``: a plain ``requests`` loop, ``iter_content(1 MiB)``, write and SHA-256;
- ``curl -o`` and ``wget -O`` when installed (they do not hash; curl reports its own
  ``time_total``, wget is timed from outside).

Each output's SHA-256 is checked after the run (outside the timing). Peak RSS is the
child's ``ru_maxrss`` (``os.wait4``), CPU its user + system time (the Python clients'
include interpreter start-up). The table gives medians, MiB/s and the ratio of
throughput to curl's in the same run, and the best run of each (less disturbed by other
load on the machine); the targets are streaming >= 0.8x curl (while
hashing), >= 1.0x the requests loop, and peak RSS < 100 MB.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from contentdownload.transfer.files import sha256_file

FILE_NAME = "payload.bin"
BLOCK = 1 << 20


# -- the child side -----------------------------------------------------------------------


def _pipeline_client(plugin: str, url: str, out: Path) -> dict:
    from contentdownload.machinery.config import EMPTY
    from contentdownload.machinery.flags import FlagLayer
    from contentdownload.transfer.http import HttpClient
    from contentdownload.hooks.model import Job, JobKey, StagePaths, TransferOptions
    from contentdownload.jobs.pipeline import Pipeline
    from contentdownload.machinery.runtime import Runtime

    pins = {hook: plugin for hook in ("resume_decision", "stream_io", "finalize")}
    runtime = Runtime(cli=FlagLayer(source="cli", pins=pins), config=EMPTY, environ={})
    staging = out.parent / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(url.encode()).hexdigest()
    paths = StagePaths.for_key(out, staging, key)
    with HttpClient(timeout=(10.0, 60.0), retries=0) as http:
        chunk = int(os.environ.get("CONTENTDOWNLOAD_BENCH_CHUNK") or TransferOptions().chunk_size)
        pipeline = Pipeline(runtime, http, TransferOptions(chunk_size=chunk), retries=0)
        started = time.perf_counter()
        result = pipeline.run(Job(urls=(url,)), JobKey(key=key, scheme="bench"), paths, runtime.policy.plan(key))
        elapsed = time.perf_counter() - started
    if result.outcome not in ("downloaded", "resumed"):
        raise SystemExit(f"{plugin}: {result.outcome} {result.reason}")
    return {"elapsed": elapsed, "sha256": result.sha256}


def _requests_client(url: str, out: Path) -> dict:
    import requests

    digest = hashlib.sha256()
    started = time.perf_counter()
    with requests.get(url, stream=True, timeout=(10, 60)) as response, open(out, "wb") as fh:
        response.raise_for_status()
        for chunk in response.iter_content(BLOCK):
            fh.write(chunk)
            digest.update(chunk)
    return {"elapsed": time.perf_counter() - started, "sha256": digest.hexdigest()}


def child_main(client: str, url: str, out: str) -> int:
    """Run one client once and print its timing as JSON (called in a subprocess)."""
    import resource

    target = Path(out)
    before = resource.getrusage(resource.RUSAGE_SELF)
    report = _requests_client(url, target) if client == "requests" else _pipeline_client(client, url, target)
    after = resource.getrusage(resource.RUSAGE_SELF)
    report.update(user=after.ru_utime - before.ru_utime, sys=after.ru_stime - before.ru_stime,
                  minflt=after.ru_minflt - before.ru_minflt)
    print(json.dumps(report))
    return 0


# -- the parent side ----------------------------------------------------------------------


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def make_payload(path: Path, size: int) -> str:
    """Write ``size`` pseudo-random bytes; returns their SHA-256 (reuses a file of the right size)."""
    marker = path.with_suffix(".sha256")
    if path.exists() and path.stat().st_size == size and marker.exists():
        return marker.read_text().strip()
    digest = hashlib.sha256()
    block = os.urandom(BLOCK)
    with open(path, "wb") as fh:
        written, i = 0, 0
        while written < size:
            data = (i.to_bytes(8, "big") + block[8:])[: size - written]
            fh.write(data)
            digest.update(data)
            written += len(data)
            i += 1
    path.chmod(0o644)
    marker.write_text(digest.hexdigest())
    return digest.hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """nginx or the package's loopback server, in its own process."""

    def __init__(self, kind: str, root: Path, work: Path):
        self.kind, self.root, self.work = kind, root, work
        self.proc: subprocess.Popen | None = None
        self.base_url = ""

    def start(self) -> "Server":
        if self.kind == "nginx":
            port = free_port()
            conf = self.work / "nginx.conf"
            temp = self.work / "nginx-temp"
            temp.mkdir(exist_ok=True)
            conf.write_text(textwrap.dedent(f"""\
                worker_processes 1;
                daemon off;
                pid {self.work / 'nginx.pid'};
                error_log {self.work / 'nginx-error.log'};
                events {{ worker_connections 64; }}
                http {{
                  access_log off;
                  sendfile on;
                  tcp_nopush on;
                  client_body_temp_path {temp}; proxy_temp_path {temp}; fastcgi_temp_path {temp};
                  uwsgi_temp_path {temp}; scgi_temp_path {temp};
                  server {{ listen 127.0.0.1:{port}; root {self.root}; }}
                }}
            """))
            self.proc = subprocess.Popen([shutil.which("nginx") or "nginx", "-c", str(conf), "-p", str(self.work)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.base_url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    time.sleep(0.05)
            else:
                raise SystemExit("nginx did not start; see " + str(self.work / "nginx-error.log"))
        else:
            self.proc = subprocess.Popen([sys.executable, "-m", "contentdownload.testing.server", "--root", str(self.root)],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            assert self.proc.stdout is not None
            self.base_url = self.proc.stdout.readline().strip()
            if not self.base_url.startswith("http"):
                raise SystemExit("the loopback server did not start")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM if self.kind != "nginx" else signal.SIGQUIT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run_child(argv: list[str]) -> tuple[str, int, float, int, float]:
    """Run ``argv``; returns (stdout, exit code, wall seconds, peak RSS in bytes, CPU seconds) of that child alone."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        print(f"  {argv[0]} failed ({proc.returncode}): {stderr.strip()[-500:]}", file=sys.stderr)
    rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return stdout, proc.returncode, wall, rss, usage.ru_utime + usage.ru_stime


def one_run(client: str, url: str, out: Path) -> tuple[float, int, float]:
    """Time one client; returns (seconds, peak RSS bytes, CPU seconds of the whole process). Raises on a failed download."""
    if client == "curl":
        stdout, code, _, rss, cpu = run_child(["curl", "-sS", "--fail", "-o", str(out), "-w", "%{time_total}", url])
        seconds = float(stdout.strip()) if code == 0 else float("nan")
    elif client == "wget":
        _, code, seconds, rss, cpu = run_child(["wget", "-q", "-O", str(out), url])
    else:
        stdout, code, _, rss, cpu = run_child([sys.executable, __file__, "--child", client, url, str(out)])
        seconds = json.loads(stdout.strip().splitlines()[-1])["elapsed"] if code == 0 else float("nan")
    if code != 0:
        raise RuntimeError(f"{client} exited with {code}")
    return seconds, rss, cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G", help="payload size, e.g. 1G, 256M (default 1G)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per client (default 5)")
    parser.add_argument("--server", choices=("auto", "nginx", "loopback"), default="auto")
    parser.add_argument("--clients", default="streaming,legacy,requests,curl,wget")
    parser.add_argument("--workdir", type=Path, default=None, help="where the payload and outputs go (default: a temp folder)")
    parser.add_argument("--settle", type=float, default=2.0,
                        help="seconds to wait after the write-back before each run (default 2)")
    parser.add_argument("--chunk-size", default=None,
                        help="chunk size of the pipeline clients (default: TransferOptions' 1 MiB), e.g. 256K")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    parser.add_argument("--child", nargs=3, metavar=("CLIENT", "URL", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(*args.child)

    size = parse_size(args.size)
    if args.chunk_size:
        os.environ["CONTENTDOWNLOAD_BENCH_CHUNK"] = str(parse_size(args.chunk_size))
    kind = args.server if args.server != "auto" else ("nginx" if shutil.which("nginx") else "loopback")
    clients = [c for c in args.clients.split(",") if c and (c not in ("curl", "wget") or shutil.which(c))]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="contentdownload-bench-"))
    serve, outdir = work / "serve", work / "out"
    serve.mkdir(parents=True, exist_ok=True)
    for folder in (work, serve):
        folder.chmod(0o755)  # nginx workers run as an unprivileged user
    expected = make_payload(serve / FILE_NAME, size)
    server = Server(kind, serve, work).start()
    url = f"{server.base_url}/{FILE_NAME}"
    times: dict[str, list[float]] = {c: [] for c in clients}
    rss: dict[str, int] = {c: 0 for c in clients}
    cpu: dict[str, list[float]] = {c: [] for c in clients}
    print(f"{size / 2**20:.0f} MiB over loopback from {kind}; {args.repeat} runs per client; {os.cpu_count()} CPUs", flush=True)
    try:
        one_run("curl" if "curl" in clients else clients[0], url, work / "warmup.bin")  # page cache warm
        (work / "warmup.bin").unlink(missing_ok=True)
        for round_no in range(args.repeat):
            for client in clients:
                shutil.rmtree(outdir, ignore_errors=True)
                outdir.mkdir(parents=True)
                out = outdir / f"{client}.bin"
                os.sync()
                time.sleep(args.settle)  # let the disk finish what the previous run left (e.g. discards)
                seconds, peak, used = one_run(client, url, out)
                got = sha256_file(out)
                if got != expected:
                    raise SystemExit(f"{client} wrote wrong bytes (sha256 {got})")
                times[client].append(seconds)
                rss[client] = max(rss[client], peak)
                cpu[client].append(used)
                print(f"  round {round_no + 1} {client:<10} {seconds:7.3f} s", flush=True)
    finally:
        server.stop()
        shutil.rmtree(outdir, ignore_errors=True)

    medians = {c: statistics.median(v) for c, v in times.items()}
    base = medians.get("curl")
    print()
    best = {c: min(v) for c, v in times.items()}
    print(f"{'client':<10} {'median s':>9} {'MiB/s':>8} {'vs curl':>8} {'best s':>7} {'vs curl':>8} {'peak RSS MB':>12} {'CPU s':>6}  runs (s)")
    for client in clients:
        m = medians[client]
        ratio = f"{base / m:.2f}x" if base else "-"
        best_ratio = f"{best['curl'] / best[client]:.2f}x" if base else "-"
        runs = " ".join(f"{t:.2f}" for t in times[client])
        used = statistics.median(cpu[client])
        print(f"{client:<10} {m:9.3f} {size / 2**20 / m:8.1f} {ratio:>8} {best[client]:7.3f} {best_ratio:>8} "
              f"{rss[client] / 1e6:12.1f} {used:6.2f}  {runs}")
    if "streaming" in medians:
        s = medians["streaming"]
        print()
        if base:
            print(f"streaming vs curl:     {base / s:.2f}x median, {best['curl'] / best['streaming']:.2f}x best "
                  "(target >= 0.8x; streaming also hashes and fsyncs)")
        if "requests" in medians:
            print(f"streaming vs requests: {medians['requests'] / s:.2f}x median, {best['requests'] / best['streaming']:.2f}x best "
                  "(target >= 1.0x)")
        print(f"streaming peak RSS:    {rss['streaming'] / 1e6:.1f} MB (target < 100 MB)")
    if args.json:
        print(json.dumps({"size": size, "server": kind, "times": times, "medians": medians, "peak_rss": rss, "cpu": cpu}, indent=2))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
