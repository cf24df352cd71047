"""Real third-party HTTP servers for tests: nginx from the machine's packages, on loopback.

``.ci/run`` installs them (Debian's ``nginx-light``); elsewhere the tests that need one skip,
saying which binary is missing. Each server runs from a config written into a temporary
folder, listens on a free loopback port, logs the body bytes it sent per request, and is
stopped when the test ends.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

NGINX_CONF = """
daemon off;
master_process off;
user root;
error_log {prefix}/error.log warn;
pid {prefix}/nginx.pid;
events {{ worker_connections 256; }}
http {{
    types {{ application/pdf pdf; application/octet-stream bin; text/html html; }}
    default_type application/octet-stream;
    log_format bytes '$request_uri $status $body_bytes_sent "$http_range"';
    access_log {prefix}/access.log bytes;
    client_body_temp_path {prefix}/tmp; proxy_temp_path {prefix}/tmp; fastcgi_temp_path {prefix}/tmp;
    uwsgi_temp_path {prefix}/tmp; scgi_temp_path {prefix}/tmp;
    sendfile on;
    {extra}
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
"""


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Nginx:
    """A running nginx serving ``root``; ``extra`` is more configuration for its ``http`` block."""

    def __init__(self, prefix: Path, root: Path, extra: str = ""):
        self.prefix, self.root, self.port = prefix, root, free_port()
        (prefix / "tmp").mkdir(parents=True, exist_ok=True)
        root.mkdir(parents=True, exist_ok=True)
        conf = prefix / "nginx.conf"
        conf.write_text(NGINX_CONF.format(prefix=prefix, port=self.port, root=root, extra=extra))
        self.process = subprocess.Popen([nginx_binary() or "nginx", "-c", str(conf), "-p", str(prefix)], stderr=subprocess.PIPE)
        self._wait_listening()

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited: {self.process.stderr.read().decode(errors='replace')}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("nginx did not start listening")

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def body_bytes(self, name: str) -> int:
        """Body bytes nginx sent for ``/name``, over every request (from its access log)."""
        total = 0
        for line in (self.prefix / "access.log").read_text().splitlines():
            uri, _status, sent, *_ = line.split(" ")
            if uri == f"/{name}":
                total += int(sent)
        return total

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def nginx_factory(tmp_path):
    """Start nginx servers: ``nginx_factory(extra_config)`` -> :class:`Nginx`; skips where nginx is absent."""
    if nginx_binary() is None:
        pytest.skip("nginx is not installed (Debian: apt-get install nginx-light; .ci/run installs it)")
    started: list[Nginx] = []

    def start(extra: str = "") -> Nginx:
        server = Nginx(tmp_path / f"nginx{len(started)}", tmp_path / "www", extra)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
