"""Many small files: files per second of `contentdownload run` against `wget -i` and `aria2c -i -j 8`.

    python benchmarks/many_small.py [--files 2000] [--size 51200] [--workers 8] [--repeat 3]

The corpus is served over loopback by nginx when it is installed (so the server is not
what is measured), else by the package's test server in its own process. Each client
downloads the whole list into an empty folder; medians of --repeat runs; ratios against
the faster of wget and aria2c from the same run. Target: contentdownload >= 0.5x.
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

TARGET = 0.5


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


def timed(cmd: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr[-500:]}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--size", type=int, default=50 * 1024)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="cd-bench-") as tmp:
        work = Path(tmp)
        root = work / "www"
        root.mkdir()
        for i in range(args.files):
            (root / f"f{i:05d}.bin").write_bytes(os.urandom(args.size))
        server, base, server_name = start_server(root, work)
        try:
            urls = work / "urls.txt"
            urls.write_text("".join(f"{base}/f{i:05d}.bin\n" for i in range(args.files)))
            clients = {
                "contentdownload": lambda out: [sys.executable, "-m", "contentdownload", "run", str(urls), "--out", str(out),
                                                "--workers", str(args.workers), "--per-host", str(args.workers), "--no-progress",
                                                "--log-level", "WARNING"],
            }
            if shutil.which("wget"):
                clients["wget -i"] = lambda out: ["wget", "-q", "-i", str(urls), "-P", str(out)]
            if shutil.which("aria2c"):
                clients[f"aria2c -j {args.workers}"] = lambda out: ["aria2c", "-q", "-i", str(urls), "-d", str(out), "-j", str(args.workers),
                                                                     "--file-allocation=none", "--auto-file-renaming=false"]
            times: dict[str, list[float]] = {name: [] for name in clients}
            for r in range(args.repeat):
                for name, make in clients.items():  # interleaved, so machine noise hits every client alike
                    out = work / f"out-{r}-{name.split()[0]}"
                    out.mkdir()
                    times[name].append(timed(make(out), work))
                    got = sum(1 for p in out.iterdir() if p.suffix == ".bin")
                    if got != args.files:
                        raise RuntimeError(f"{name} downloaded {got} of {args.files} files")
                    shutil.rmtree(out)
        finally:
            server.terminate()
            server.wait(timeout=10)

    rates = {name: args.files / statistics.median(t) for name, t in times.items()}
    others = [rate for name, rate in rates.items() if name != "contentdownload"]
    best = max(others) if others else None
    print(f"{args.files} files x {args.size} B over loopback ({server_name}), {args.workers} workers, median of {args.repeat}")
    print(f"{'client':<22} {'files/s':>9} {'ratio':>7}")
    for name, rate in rates.items():
        ratio = f"{rate / best:.2f}" if best else "-"
        print(f"{name:<22} {rate:>9.1f} {ratio:>7}")
    if best is None:
        print("neither wget nor aria2c is installed: no ratio")
        return 0
    ratio = rates["contentdownload"] / best
    print(f"contentdownload / fastest other = {ratio:.2f} (target >= {TARGET}): {'PASS' if ratio >= TARGET else 'FAIL'}")
    return 0 if ratio >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
