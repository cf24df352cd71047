"""Single-file throughput over loopback: contentdownload (the CLI, the synchronous pipeline) against curl, wget and aria2c.

    python benchmarks/throughput.py                    # 1 GiB, 5 repeats
    python benchmarks/throughput.py --size 256M --repeat 3
    python benchmarks/throughput.py --server loopback  # the package's server instead of nginx
    python benchmarks/throughput.py --clients cli-none@256K,cli-none@1M,cli-none@4M,curl
    python benchmarks/throughput.py --clients cli-none,cli-batch,curl --base ../other-checkout  # before/after

The file is served by nginx when it is installed (sendfile, one worker), else by
``python -m contentdownload.testing.server --root DIR`` in its own process, so the server
never shares the client's interpreter. Every client runs in its own process, one after
the other, rounds interleaved; between runs the output is removed, the page cache written
back (``sync``) and the disk given ``--settle`` seconds, so no run pays for the previous
one's dirty pages.

Clients (``NAME@SIZE`` runs a client with that ``chunk_size``, the block a body is read
into; ``NAME~base`` runs a contentdownload client with the code of the ``--base``
checkout, its ``core`` and ``plugins`` first on ``PYTHONPATH``, so two versions take turns
in one run):

- ``cli-none``, ``cli-batch``, ``cli-file``: ``python -m contentdownload run URL -P DIR
  --durability LEVEL -q --no-progress`` timed from outside: what users run, the whole
  product (start-up, planning, the job store, the event-loop lane, the part store,
  SHA-256, the manifest); ``batch`` is the default durability, ``none`` no fsync at all;
- ``streaming``: :class:`contentdownload.jobs.pipeline.Pipeline` with the streaming plugin
  pinned for every transfer hook: the part store's ``durable`` mode (checkpoints,
  writeback started while receiving, fsync of the part before the rename and of the
  folder after), the default; the time runs from the request to the finished, renamed
  file, SHA-256 included;
- ``legacy``: the same with the legacy plugin: the ``plain`` part store (no fsync, no
  sidecar), i.e. durability off, SHA-256 still computed;
- ``cli``: ``python -m contentdownload get URL -o FILE -q`` timed from outside;
- ``requests``: a plain ``requests`` loop, ``iter_content(1 MiB)``, write and SHA-256;
- ``curl -o`` and ``wget -O`` when installed (they do not hash; curl reports its own
  ``time_total``, wget is timed from outside); ``aria2c -x1`` when installed, else
  skipped with a note.

Each output's SHA-256 is checked after the run (outside the timing). Peak RSS is the
child's ``ru_maxrss`` (``os.wait4``), CPU its user + system time (the Python clients'
include interpreter start-up). The table gives medians, MiB/s, the median over the rounds
of the ratio of curl's time to the client's in the same round, and the best run of each
(less disturbed by other load on the machine). For the CLI clients, ``1 byte s`` is the
same command's time for a one-byte file in the same round (start-up, planning, the job
store, the records: what the run costs besides the body), and ``body vs curl`` the ratio
of curl's time to the rest. The clients run from compiled byte code (``PYTHONPYCACHEPREFIX``
in the work folder, even where ``PYTHONDONTWRITEBYTECODE`` is set), as an installed
package does. Targets: ``cli-none`` >= 1.0x curl,
``cli-batch`` (the default) >= 0.9x, peak RSS < 100 MB.

Measured (1 GiB from nginx, 2 cores shared with two other heavy workloads, so single runs
vary by 2x; 5 interleaved rounds, medians of ratios to curl -o):

- ``cli-none`` 0.61x, ``cli-batch`` 0.66x, wget 0.83x; against the code before blocks were
  received straight from the socket and written by a thread of their own (``~base``),
  ``cli-batch`` ran 1.26x as fast, ``cli-none`` 0.89x (its CPU the same, 3.7 s). Peak RSS
  60 MB. Of a CLI run, 0.5 to 0.7 s is what a one-byte file costs too (interpreter start,
  imports, planning, the job store, the records); without it the body runs at 0.74x
  (none) and 0.77x (batch) of curl's whole time.
- Chunk size, on the event loop: a ``cli-none`` run took 2.7 s of CPU with 256 KiB blocks,
  3.5 s with 1 MiB blocks (``cli-none@1M``; larger blocks fall out of the CPU caches between the socket
  copy, the write and the hash), so the default stays 256 KiB.
- Where the time goes (py-spy, ``--durability none``): the loop thread is in ``read``
  (the socket copy) and the writes about evenly, the hash thread is idle most of the
  time; with 64 KiB ``bytes`` per read the loop also blocked on the hash queue and
  spent a fifth of its samples in ``data_received``, both gone with reused blocks. curl
  itself is CPU-bound in the kernel here (1.7 s of system time per GiB), so on two
  busy cores a client that also hashes can match it only when the write, the hash and
  the socket copy run on separate cores.
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
TINY_NAME = "tiny.bin"  # one byte: what a CLI run costs besides the body
BLOCK = 1 << 20


# -- the child side -----------------------------------------------------------------------


def _pipeline_client(plugin: str, url: str, out: Path, chunk: int | None = None) -> dict:
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
        chunk = chunk or int(os.environ.get("CONTENTDOWNLOAD_BENCH_CHUNK") or TransferOptions().chunk_size)
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
    name, _, size = client.partition("@")
    before = resource.getrusage(resource.RUSAGE_SELF)
    report = _requests_client(url, target) if name == "requests" else _pipeline_client(name, url, target, parse_size(size) if size else None)
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


def run_child(argv: list[str], env: dict[str, str] | None = None) -> tuple[str, int, float, int, float]:
    """Run ``argv``; returns (stdout, exit code, wall seconds, peak RSS in bytes, CPU seconds) of that child alone."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stdout, stderr = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        print(f"  {argv[0]} failed ({proc.returncode}): {stderr.strip()[-500:]}", file=sys.stderr)
    rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return stdout, proc.returncode, wall, rss, usage.ru_utime + usage.ru_stime


def one_run(client: str, url: str, out: Path, base: Path | None = None) -> tuple[float, int, float]:
    """Time one client; returns (seconds, peak RSS bytes, CPU seconds of the whole process). Raises on a failed download."""
    name = client.partition("~")[0].partition("@")[0]
    env = client_env(client, base)
    if client == "curl":
        stdout, code, _, rss, cpu = run_child(["curl", "-sS", "--fail", "-o", str(out), "-w", "%{time_total}", url])
        seconds = float(stdout.strip()) if code == 0 else float("nan")
    elif client == "wget":
        _, code, seconds, rss, cpu = run_child(["wget", "-q", "-O", str(out), url])
    elif client == "aria2c":
        _, code, seconds, rss, cpu = run_child(["aria2c", "-q", "-x1", "--allow-overwrite=true", "-d", str(out.parent), "-o", out.name, url])
    elif name == "cli":
        _, code, seconds, rss, cpu = run_child([sys.executable, "-m", "contentdownload", "get", url, "-o", str(out), "-q"], env)
    elif name in CLI_LEVELS:
        level = name.removeprefix("cli-")
        _, code, seconds, rss, cpu = run_child([sys.executable, "-m", "contentdownload", "run", url, "-P", str(out.parent / name),
                                                "--durability", level, "-q", "--no-progress"], env)
        (out.parent / name / url.rsplit("/", 1)[-1]).rename(out)
    else:
        stdout, code, _, rss, cpu = run_child([sys.executable, __file__, "--child", client.partition("~")[0], url, str(out)], env)
        seconds = json.loads(stdout.strip().splitlines()[-1])["elapsed"] if code == 0 else float("nan")
    if code != 0:
        raise RuntimeError(f"{client} exited with {code}")
    return seconds, rss, cpu


TOOLS = ("curl", "wget", "aria2c")
CLI_LEVELS = ("cli-none", "cli-batch", "cli-file")


def client_env(client: str, base: Path | None) -> dict[str, str]:
    """The environment of a contentdownload client: ``~base`` takes the code of the ``base`` checkout, ``@SIZE`` a chunk size."""
    env = dict(os.environ)
    spec, _, tree = client.partition("~")
    if tree:
        if base is None:
            raise SystemExit(f"{client}: give --base DIR")
        env["PYTHONPATH"] = os.pathsep.join([str(base / "core"), str(base / "plugins"), env.get("PYTHONPATH", "")])
    _, _, size = spec.partition("@")
    if size:
        env["CONTENTDOWNLOAD_CHUNK_SIZE"] = str(parse_size(size))
    return env


def pick_clients(names: str) -> list[str]:
    """The clients asked for that can run here; a missing tool is skipped with a note."""
    clients = []
    for name in filter(None, names.split(",")):
        if name in TOOLS and not shutil.which(name):
            print(f"note: {name} is not installed: skipped", flush=True)
            continue
        clients.append(name)
    return clients


def run_rounds(clients: list[str], url: str, work: Path, expected: str, repeat: int, settle: float,
               base: Path | None = None) -> tuple[dict, dict, dict, dict]:
    """Every client once per round, rounds interleaved; (times, peak RSS, CPU, a CLI's time for one byte) per client."""
    outdir = work / "out"
    times: dict[str, list[float]] = {c: [] for c in clients}
    rss: dict[str, int] = {c: 0 for c in clients}
    cpu: dict[str, list[float]] = {c: [] for c in clients}
    startup: dict[str, list[float]] = {c: [] for c in clients if is_cli(c)}
    one_run("curl" if "curl" in clients else clients[0], url, work / "warmup.bin")  # page cache warm
    (work / "warmup.bin").unlink(missing_ok=True)
    for client in startup:  # byte-code compiled once, as an installed package has it
        one_byte(client, url, outdir, base)
    for round_no in range(repeat):
        for client in clients:
            shutil.rmtree(outdir, ignore_errors=True)
            outdir.mkdir(parents=True)
            out = outdir / f"{client.replace('@', '-').replace('~', '-')}.bin"
            os.sync()
            time.sleep(settle)  # let the disk finish what the previous run left (e.g. discards)
            seconds, peak, used = one_run(client, url, out, base)
            got = sha256_file(out)
            if got != expected:
                raise SystemExit(f"{client} wrote wrong bytes (sha256 {got})")
            times[client].append(seconds)
            rss[client] = max(rss[client], peak)
            cpu[client].append(used)
            if client in startup:
                startup[client].append(one_byte(client, url, outdir, base))
            print(f"  round {round_no + 1} {client:<16} {seconds:7.3f} s", flush=True)
    shutil.rmtree(outdir, ignore_errors=True)
    return times, rss, cpu, startup


def is_cli(client: str) -> bool:
    return client.partition("~")[0].partition("@")[0] in (*CLI_LEVELS, "cli")


def one_byte(client: str, url: str, outdir: Path, base: Path | None) -> float:
    """The seconds ``client`` takes for a one-byte file from the same server, into a folder of its own."""
    folder = outdir / "one-byte"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return one_run(client, url.rsplit("/", 1)[0] + "/" + TINY_NAME, folder / TINY_NAME, base)[0]


def ratio_to_curl(times: dict[str, list[float]], client: str) -> float | None:
    """The median over the rounds of curl's time divided by the client's in the same round."""
    if "curl" not in times:
        return None
    return statistics.median(c / t for c, t in zip(times["curl"], times[client]))


def report(size: int, times: dict, rss: dict, cpu: dict, startup: dict) -> None:
    print()
    print(f"{'client':<16} {'median s':>9} {'MiB/s':>8} {'vs curl':>8} {'best s':>7} {'peak RSS MB':>12} {'CPU s':>6} "
          f"{'1 byte s':>8} {'body vs curl':>12}  runs (s)")
    for client, runs in times.items():
        median = statistics.median(runs)
        ratio = ratio_to_curl(times, client)
        start, body = "-", "-"
        if client in startup and "curl" in times:  # the time besides start-up, planning and records, against curl's
            start = f"{statistics.median(startup[client]):.2f}"
            body = f"{statistics.median(c / max(t - s, 1e-6) for c, t, s in zip(times['curl'], runs, startup[client])):.2f}x"
        print(f"{client:<16} {median:9.3f} {size / 2**20 / median:8.1f} {f'{ratio:.2f}x' if ratio else '-':>8} {min(runs):7.3f} "
              f"{rss[client] / 1e6:12.1f} {statistics.median(cpu[client]):6.2f} {start:>8} {body:>12}  {' '.join(f'{t:.2f}' for t in runs)}")
    print()
    targets = (("cli-none", "the CLI, --durability none, SHA-256", 1.0), ("cli-batch", "the CLI, the default durability, SHA-256", 0.9))
    for client in times:
        target = next(((what, value) for name, what, value in targets if client.partition("@")[0] == name), None)
        ratio = ratio_to_curl(times, client)
        if target is not None and ratio is not None:
            verdict = "met" if ratio >= target[1] else "MISSED"
            print(f"{client:<14} vs curl -o: {ratio:.2f}x median of ratios ({target[0]}; target >= {target[1]}x: {verdict}); "
                  f"peak RSS {rss[client] / 1e6:.1f} MB (target < 100 MB)")
    if any("~" in client for client in times):
        for client in (c for c in times if "~" not in c and f"{c}~base" in times):
            change = statistics.median(b / t for b, t in zip(times[f"{client}~base"], times[client]))
            print(f"{client:<14} vs {client}~base: {change:.2f}x the speed (median of the rounds' ratios)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G", help="payload size, e.g. 1G, 256M (default 1G)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per client (default 5)")
    parser.add_argument("--server", choices=("auto", "nginx", "loopback"), default="auto")
    parser.add_argument("--clients", default="cli-none,cli-batch,streaming,legacy,curl,wget,aria2c",
                        help="comma-separated; NAME@SIZE gives a client that chunk_size, NAME~base the --base checkout's code")
    parser.add_argument("--base", type=Path, default=None,
                        help="another checkout of contentdownload (its core/ and plugins/) for the NAME~base clients")
    parser.add_argument("--workdir", type=Path, default=None, help="where the payload and outputs go (default: a temp folder)")
    parser.add_argument("--settle", type=float, default=2.0,
                        help="seconds to wait after the write-back before each run (default 2)")
    parser.add_argument("--chunk-size", default=None,
                        help="chunk size of the pipeline clients (default: TransferOptions' 256 KiB), e.g. 256K")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    parser.add_argument("--child", nargs=3, metavar=("CLIENT", "URL", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(*args.child)

    size = parse_size(args.size)
    if args.chunk_size:
        os.environ["CONTENTDOWNLOAD_BENCH_CHUNK"] = str(parse_size(args.chunk_size))
    kind = args.server if args.server != "auto" else ("nginx" if shutil.which("nginx") else "loopback")
    clients = pick_clients(args.clients)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="contentdownload-bench-"))
    serve = work / "serve"
    serve.mkdir(parents=True, exist_ok=True)
    for folder in (work, serve):
        folder.chmod(0o755)  # nginx workers run as an unprivileged user
    expected = make_payload(serve / FILE_NAME, size)
    (serve / TINY_NAME).write_bytes(b"x")
    (serve / TINY_NAME).chmod(0o644)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)  # the clients run from compiled byte code, as an installed package does
    os.environ.setdefault("PYTHONPYCACHEPREFIX", str(work / "pycache"))
    server = Server(kind, serve, work).start()
    print(f"{size / 2**20:.0f} MiB over loopback from {kind}; {args.repeat} runs per client; {os.cpu_count()} CPUs", flush=True)
    try:
        times, rss, cpu, startup = run_rounds(clients, f"{server.base_url}/{FILE_NAME}", work, expected, args.repeat, args.settle,
                                     args.base.resolve() if args.base else None)
    finally:
        server.stop()
    report(size, times, rss, cpu, startup)
    if args.json:
        print(json.dumps({"size": size, "server": kind, "times": times, "peak_rss": rss, "cpu": cpu, "one_byte": startup}, indent=2))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
