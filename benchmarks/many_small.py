"""Many small files: files per second of `contentdownload run` against `wget -i`, `aria2c -i -j 8`, `curl -Z`.

    python benchmarks/many_small.py [--files 2000] [--size 51200] [--workers 8] [--repeat 3] [--cases] [--base DIR]

The corpus is served over loopback by nginx when it is installed (so the server is not
what is measured), else by the package's test server in its own process. Each client
downloads the whole list into an empty folder; the clients take turns (interleaved
repeats), and the ratio is the median of the per-repeat ratios against `wget -i`. The CPU
milliseconds per file (user + system of the client and its children) are printed too.
``--cases`` runs the two standard cases, 2,000 x 50 KB and 10,000 x 1 KB, instead of
one. Target: contentdownload (default settings) >= 1.0x `wget -i`. ``--transport sync`` (worker
threads through requests) is measured too, to show what the event-loop lane buys.
``--base DIR`` adds ``contentdownload~base``: the same run with the code of another checkout
(its ``core/`` and ``plugins/``), so a change is measured against what it changes, side by side.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TARGET = 1.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server on port {port} did not start")


def start_server(root: Path, work: Path) -> tuple[subprocess.Popen, str, str]:
    """nginx when installed, else ``python -m contentdownload.testing.server``; returns (process, base URL, name)."""
    port = free_port()
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx:
        conf = work / "nginx.conf"
        (work / "nginx-logs").mkdir(exist_ok=True)
        user = "user root;" if os.geteuid() == 0 else ""
        conf.write_text(f"""
{user}
worker_processes 2; daemon off; error_log {work}/nginx-logs/error.log; pid {work}/nginx.pid;
events {{ worker_connections 1024; }}
http {{ access_log off; sendfile on; tcp_nopush on; keepalive_requests 100000;
  client_body_temp_path {work}/nginx-logs; proxy_temp_path {work}/nginx-logs; fastcgi_temp_path {work}/nginx-logs;
  uwsgi_temp_path {work}/nginx-logs; scgi_temp_path {work}/nginx-logs;
  server {{ listen 127.0.0.1:{port}; root {root}; }} }}
""")
        proc = subprocess.Popen([nginx, "-c", str(conf), "-p", str(work)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        name = "nginx"
    else:
        proc = subprocess.Popen([sys.executable, "-m", "contentdownload.testing.server", "--root", str(root), "--port", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        name = "contentdownload.testing.server"
    wait_port(port)
    return proc, f"http://127.0.0.1:{port}", name


def timed(cmd: list[str], cwd: Path, code: Path | None = None) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system, the client with its children) of one run of ``cmd``
    (``code``: the checkout whose ``core/`` and ``plugins/`` it imports first)."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        env = dict(os.environ)
        if code is not None:
            env["PYTHONPATH"] = os.pathsep.join([str(code / "core"), str(code / "plugins"), env.get("PYTHONPATH", "")])
        if env.get("PYTHONPATH"):  # absolute, so the client imports this checkout from the benchmark's folder too
            env["PYTHONPATH"] = os.pathsep.join(str(Path(p).resolve()) for p in env["PYTHONPATH"].split(os.pathsep) if p)
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        elapsed = time.perf_counter() - started
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {err.read()[-500:].decode(errors='replace')}")
    return elapsed, usage.ru_utime + usage.ru_stime


def clients_for(urls: Path, workers: int, base_code: Path | None = None) -> dict[str, Any]:
    run = [sys.executable, "-m", "contentdownload", "run", str(urls), "--no-progress", "--out"]
    clients: dict[str, Any] = {
        "contentdownload": lambda out: [*run, str(out)],
        "contentdownload --transport sync": lambda out: [sys.executable, "-m", "contentdownload", "run", str(urls), "--out", str(out),
                                                         "--no-progress", "--transport", "sync"],
    }
    if base_code is not None:
        clients["contentdownload~base"] = lambda out: [*run, str(out)]
    if shutil.which("wget"):
        clients["wget -i"] = lambda out: ["wget", "-q", "-i", str(urls), "-P", str(out)]
    if shutil.which("aria2c"):
        clients[f"aria2c -j {workers}"] = lambda out: ["aria2c", "-q", "-i", str(urls), "-d", str(out), "-j", str(workers),
                                                        "--file-allocation=none", "--auto-file-renaming=false"]
    if shutil.which("curl") and "--parallel" in subprocess.run(["curl", "--help", "all"], capture_output=True, text=True).stdout:
        clients[f"curl -Z --parallel-max {workers}"] = lambda out: ["curl", "-s", "-Z", "--parallel-max", str(workers), "--remote-name-all",
                                                                     "--output-dir", str(out), *urls.read_text().split()]
    return clients


def run_case(files: int, size: int, workers: int, repeat: int, base_code: Path | None = None) -> float | None:
    """One case: every client ``repeat`` times, interleaved; prints the table, returns the median ratio to wget."""
    with tempfile.TemporaryDirectory(prefix="cd-bench-") as tmp:
        work = Path(tmp)
        root = work / "www"
        root.mkdir()
        for i in range(files):
            (root / f"f{i:05d}.bin").write_bytes(os.urandom(size))
        server, base, server_name = start_server(root, work)
        try:
            urls = work / "urls.txt"
            urls.write_text("".join(f"{base}/f{i:05d}.bin\n" for i in range(files)))
            clients = clients_for(urls, workers, base_code)
            times: dict[str, list[tuple[float, float]]] = {name: [] for name in clients}
            for r in range(repeat):
                for name, make in clients.items():  # interleaved, so machine noise hits every client alike
                    out = work / f"out-{r}-{'-'.join(name.split()).replace('/', '')}"
                    out.mkdir()
                    times[name].append(timed(make(out), work, base_code if name.endswith("~base") else None))
                    got = sum(1 for p in out.iterdir() if p.suffix == ".bin")
                    if got != files:
                        raise RuntimeError(f"{name} downloaded {got} of {files} files")
                    shutil.rmtree(out)
        finally:
            server.terminate()
            server.wait(timeout=10)
    print(f"{files} files x {size} B over loopback ({server_name}), median of {repeat}")
    print(f"{'client':<30} {'files/s':>9} {'CPU ms/file':>12} {'ratio':>7}")
    wget = times.get("wget -i")
    for name, t in times.items():
        rate = files / statistics.median(w for w, _ in t)
        cpu = 1000.0 * statistics.median(c for _, c in t) / files
        ratio = f"{statistics.median(w0 / w for (w, _), (w0, _) in zip(t, wget)):.2f}" if wget else "-"
        print(f"{name:<30} {rate:>9.1f} {cpu:>12.3f} {ratio:>7}")
    if not wget:
        print("wget is not installed: no ratio")
        return None
    ratio = statistics.median(w0 / w for (w, _), (w0, _) in zip(times["contentdownload"], wget))
    print(f"contentdownload / wget -i = {ratio:.2f} (target >= {TARGET}): {'PASS' if ratio >= TARGET else 'FAIL'}")
    if "contentdownload~base" in times:
        change = statistics.median(b / w for (w, _), (b, _) in zip(times["contentdownload"], times["contentdownload~base"]))
        print(f"contentdownload vs contentdownload~base: {change:.2f}x the speed (median of the rounds' ratios)")
    return ratio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--size", type=int, default=50 * 1024)
    parser.add_argument("--workers", type=int, default=8, help="parallel transfers of aria2c and curl")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cases", action="store_true", help="run 2,000 x 50 KB and 10,000 x 1 KB")
    parser.add_argument("--base", type=Path, default=None, help="another checkout, run as contentdownload~base")
    args = parser.parse_args(argv)
    cases = [(2000, 50 * 1024), (10000, 1024)] if args.cases else [(args.files, args.size)]
    base = args.base.resolve() if args.base else None
    ratios = [run_case(files, size, args.workers, args.repeat, base) for files, size in cases]
    return 0 if all(r is None or r >= TARGET for r in ratios) else 1


if __name__ == "__main__":
    sys.exit(main())
