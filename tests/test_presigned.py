"""Presigned URLs: killed mid-file, signed again, run again: one file per object, the part
resumed (no second full download), and no signature in any file of the output folder.

Against an S3-compatible server (moto's, behind a counting proxy that can hold a body
mid-way) and against the package's loopback server checking its own signatures."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest

from contentdownload.testing.server import Fault
from helpers import cli_env

BIG = 24 << 20
HOLD_AT = 18 << 20  # the body is held here (past the first checkpoint, at 16 MiB) until the run is killed
SMALL = ("a.pdf", "b.pdf")


def _start_run(jobs: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "contentdownload", "run", str(jobs), "--out", str(out), "--no-progress",
                             "--retries", "0"], env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _committed(staging: Path) -> int:
    """The most bytes a part's sidecar in ``staging`` calls committed (0 when none says so yet)."""
    best = 0
    for sidecar in staging.glob("*.part.json"):
        try:
            best = max(best, int(json.loads(sidecar.read_text()).get("committed") or 0))
        except (OSError, ValueError):
            continue
    return best


def _kill_when_committed(proc: subprocess.Popen, out: Path, size: int) -> None:
    """SIGKILL the run once a part's sidecar has committed ``size`` bytes (polled; the deadline only guards a hang)."""
    staging, deadline = out / ".contentdownload" / "staging", time.monotonic() + 120
    while _committed(staging) < size:
        assert proc.poll() is None, f"the run ended before the part grew: {proc.communicate()}"
        assert time.monotonic() < deadline, "the part never grew"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _signature_values(urls: list[str]) -> set[str]:
    found = set()
    for url in urls:
        for name, value in re.findall(r"[?&](X-Amz-Signature|X-Amz-Credential|Signature|AWSAccessKeyId)=([^&]+)", url):
            found |= {value, unquote(value)}
    return found


def _check_outcome(tmp_path: Path, out: Path, big: bytes, signatures: set[str], streams: list[str]) -> None:
    names = sorted(p.name for p in out.iterdir() if p.is_file() and not p.name.startswith("manifest"))
    assert names == sorted(["big.pdf", *SMALL])  # one file per object: no big-<hash>.pdf beside big.pdf
    assert (out / "big.pdf").read_bytes() == big
    assert not list((out / ".contentdownload" / "staging").glob("*.part*"))
    written = b"\n".join([p.read_bytes() for p in out.rglob("*") if p.is_file()] + [s.encode() for s in streams])
    for value in signatures:
        assert value.encode() not in written, value


def _kill_resign_rerun(tmp_path: Path, sign, release) -> tuple[list[str], Path]:
    """Run on freshly signed URLs, kill mid-file, sign again, run again to the end; the URLs of both signings."""
    out, jobs = tmp_path / "out", tmp_path / "jobs.txt"
    first = sign(300)
    jobs.write_text("".join(u + "\n" for u in first))
    proc = _start_run(jobs, out)
    _kill_when_committed(proc, out, 16 << 20)
    release()
    second = sign(600)  # new expiry: new signatures
    assert first != second
    jobs.write_text("".join(u + "\n" for u in second))
    again = _start_run(jobs, out)
    stdout, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr
    return [*first, *second, stdout, stderr], out


# -- the package's loopback server, checking its own signatures ---------------------------------


def test_presigned_urls_resigned_after_a_kill_resume_on_the_loopback_server(server, tmp_path):
    secret = b"loopback-signing-secret"
    big = b"%PDF-1.7\n" + os.urandom(BIG - 9)
    server.add_file("/bucket/big.pdf", big, content_type="application/pdf")
    for name in SMALL:
        server.add_file(f"/bucket/{name}", b"%PDF-1.4\n" + os.urandom(3000), content_type="application/pdf")
    for path in ("/bucket/big.pdf", *(f"/bucket/{n}" for n in SMALL)):
        server.require_signature(path, secret)
    server.add_fault("/bucket/big.pdf", Fault.stall(120, after=HOLD_AT, close=True))
    unsigned = server.url("/bucket/a.pdf")
    sign = lambda ttl: [server.signed_url(p, secret, ttl) for p in ("/bucket/big.pdf", *(f"/bucket/{n}" for n in SMALL))]

    def release():
        server.clear_faults("/bucket/big.pdf")
        server.reset_stats()

    urls, out = _kill_resign_rerun(tmp_path, sign, release)
    stats = server.stats("/bucket/big.pdf")
    assert stats.requests >= 1 and stats.full_bodies == 0, stats  # no second full download
    assert all(r and int(r.split("=")[1].split("-")[0]) > 0 for r in stats.ranges), stats.ranges
    assert stats.body_bytes < BIG - (16 << 20)
    _check_outcome(tmp_path, out, big, _signature_values(urls[:-2]), urls[-2:])
    import urllib.request, urllib.error
    with pytest.raises(urllib.error.HTTPError, match="403"):  # the check is real: unsigned is refused
        urllib.request.urlopen(unsigned, timeout=10)


# -- an S3-compatible server (moto), behind a counting proxy ------------------------------------


class _Proxy(ThreadingHTTPServer):
    """Forwards GETs to ``upstream`` keeping the Host header (SigV4 signs it); records each request's
    path, Range and body bytes; holds the body of ``hold_path`` after ``hold_at`` bytes until released."""

    daemon_threads = True

    def __init__(self, upstream: tuple[str, int], hold_path: str):
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream, self.hold_path = upstream, hold_path
        self.released = threading.Event()
        self.log: list[dict] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        proxy: _Proxy = self.server  # type: ignore[assignment]
        entry = {"path": self.path.split("?")[0], "range": self.headers.get("Range"), "bytes": 0, "status": None}
        proxy.log.append(entry)
        conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
        conn.request("GET", self.path, headers={k: v for k, v in self.headers.items() if k.lower() != "connection"})
        resp = conn.getresponse()
        entry["status"] = resp.status
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("connection", "transfer-encoding", "server", "date"):
                self.send_header(k, v)
        self.send_header("Connection", "close")
        self.end_headers()
        hold = entry["path"] == proxy.hold_path and not proxy.released.is_set()
        try:
            while chunk := resp.read(64 << 10):
                if hold and entry["bytes"] + len(chunk) > HOLD_AT:
                    chunk = chunk[: HOLD_AT - entry["bytes"]]
                    self.wfile.write(chunk)
                    entry["bytes"] += len(chunk)
                    self.wfile.flush()
                    proxy.released.wait(120)
                    return  # the client was killed meanwhile
                self.wfile.write(chunk)
                entry["bytes"] += len(chunk)
        except OSError:
            pass
        finally:
            conn.close()
            self.close_connection = True


@pytest.fixture
def moto_s3():
    try:
        import boto3
        from botocore.config import Config
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        pytest.skip(f"moto server cannot start: {exc}")
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    try:
        moto.start()
    except Exception as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"moto server cannot start: {exc}")
    host, port = moto.get_host_and_port()
    creds = {"aws_access_key_id": "AKIAMOTOTESTKEY00001", "aws_secret_access_key": "moto-secret", "region_name": "us-east-1"}
    config = Config(signature_version="s3v4", s3={"addressing_style": "path"})
    client = lambda endpoint: boto3.client("s3", endpoint_url=endpoint, config=config, **creds)
    try:
        yield (host, port), client
    finally:
        moto.stop()


def test_presigned_urls_resigned_after_a_kill_resume_against_an_s3_server(moto_s3, tmp_path):
    upstream, client = moto_s3
    s3 = client(f"http://{upstream[0]}:{upstream[1]}")
    s3.create_bucket(Bucket="papers")
    big = b"%PDF-1.7\n" + os.urandom(BIG - 9)
    s3.put_object(Bucket="papers", Key="big.pdf", Body=big, ContentType="application/pdf")
    for name in SMALL:
        s3.put_object(Bucket="papers", Key=name, Body=b"%PDF-1.4\n" + os.urandom(3000), ContentType="application/pdf")
    proxy = _Proxy(upstream, "/papers/big.pdf")
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        signer = client(proxy.url)
        sign = lambda ttl: [signer.generate_presigned_url("get_object", Params={"Bucket": "papers", "Key": k}, ExpiresIn=ttl)
                            for k in ("big.pdf", *SMALL)]
        first_round = len(proxy.log)

        def release():
            nonlocal first_round
            proxy.released.set()
            first_round = len(proxy.log)

        urls, out = _kill_resign_rerun(tmp_path, sign, release)
        assert all("X-Amz-Signature=" in u for u in urls[:-2])
        rerun = [e for e in proxy.log[first_round:] if e["path"] == "/papers/big.pdf"]
        assert rerun and all(e["status"] == 206 and e["range"] and int(e["range"].split("=")[1].split("-")[0]) > 0 for e in rerun), rerun
        assert sum(e["bytes"] for e in rerun) < BIG - (16 << 20)  # no second full download
        _check_outcome(tmp_path, out, big, _signature_values(urls[:-2]), urls[-2:])
    finally:
        proxy.shutdown()
        proxy.server_close()
