"""A throwaway PostgreSQL server for tests and benchmarks, from the machine's ``initdb``/``pg_ctl``.

::

    with TemporaryPostgres() as pg:
        store = open_store(pg.dsn)

The cluster lives in a temporary folder (data, log and unix socket), listens on
127.0.0.1 only on a free port, trusts local connections and runs with ``fsync=off``:
fast, and gone when stopped. PostgreSQL refuses to run as root; when the current user is
root the server runs as the ``postgres`` system user, which then owns the folder.

pytest fixtures (import them into a test module to use them)::

    from contentdownload.testing.pg import postgres_dsn, fresh_postgres_dsn  # noqa: F401

- ``postgres_dsn`` (session): one server for the whole session, and the URL of a
  database made for the session. Skips only when ``initdb``/``pg_ctl`` are not installed.
- ``fresh_postgres_dsn`` (function): the URL of a new, empty database on that server,
  dropped after the test, so tests do not see each other's rows.
"""

from __future__ import annotations

import atexit
import glob
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "TemporaryPostgres",
    "PostgresNotAvailable",
    "find_binaries",
    "postgres_dsn",
    "fresh_postgres_dsn",
    "create_database",
    "drop_database",
]

SKIP_REASON = "PostgreSQL binaries initdb/pg_ctl not found on PATH"
SERVICE_USER = "postgres"


class PostgresNotAvailable(RuntimeError):
    """``initdb``/``pg_ctl`` are not installed, or the server could not be started."""


def find_binaries() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl``: from ``PATH``, else the newest ``/usr/lib/postgresql/*/bin``."""

    def version(path: str) -> tuple[int, ...]:
        found = re.search(r"postgresql/([\d.]+)/bin", path)
        return tuple(int(p) for p in found.group(1).split(".") if p) if found else (0,)

    candidates: list[str] = []
    for name in ("initdb", "pg_ctl"):
        found = shutil.which(name)
        if found:
            candidates += [os.path.dirname(found), os.path.dirname(os.path.realpath(found))]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
    for folder in candidates:
        if all(os.access(os.path.join(folder, name), os.X_OK) for name in ("initdb", "pg_ctl")):
            return Path(folder)
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TemporaryPostgres:
    """A PostgreSQL cluster in a temporary folder; ``start()`` it, use ``dsn``, ``stop()`` it.

    ``settings`` are extra server settings (``-c name=value``) on top of the test-friendly
    defaults. ``base_dir`` is where the temporary folder is made (default: the system's).
    """

    def __init__(self, *, bin_dir: str | Path | None = None, base_dir: str | Path | None = None,
                 settings: dict[str, Any] | None = None, start_timeout: float = 60.0):
        found = Path(bin_dir) if bin_dir else find_binaries()
        if found is None:
            raise PostgresNotAvailable(SKIP_REASON)
        self.bin_dir = found
        self.base_dir = base_dir
        self.start_timeout = start_timeout
        self.settings = {
            "listen_addresses": "127.0.0.1",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
            "shared_buffers": "64MB",
            "log_min_messages": "warning",
        }
        self.settings.update({k: str(v) for k, v in (settings or {}).items()})
        self.user = "postgres"
        self.port: int | None = None
        self.root: Path | None = None
        self._run_as: tuple[int, int] | None = None
        self._started = False

    # -- paths ------------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        assert self.root is not None
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        assert self.root is not None
        return self.root / "sock"

    @property
    def log_file(self) -> Path:
        assert self.root is not None
        return self.root / "server.log"

    @property
    def dsn(self) -> str:
        """``postgresql://postgres@127.0.0.1:PORT/postgres`` (the maintenance database)."""
        if not self._started:
            raise PostgresNotAvailable("the server is not running: call start() first")
        return self.url("postgres")

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    # -- processes ----------------------------------------------------------------------

    def _run(self, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
        kwargs: dict[str, Any] = {}
        if self._run_as is not None:
            kwargs.update(user=self._run_as[0], group=self._run_as[1], extra_groups=[])
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        if self._run_as is not None:
            env["HOME"] = str(self.root)
        return subprocess.run(
            list(args), cwd=self.root, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout, **kwargs,
        )

    def _prepare_root(self) -> None:
        base = self.base_dir
        if base is None and os.geteuid() == 0:
            base = "/tmp"  # the service user must be able to reach the folder
        self.root = Path(tempfile.mkdtemp(prefix="cdpg-", dir=base))
        self.socket_dir.mkdir()
        if os.geteuid() == 0:
            import pwd

            try:
                entry = pwd.getpwnam(SERVICE_USER)
            except KeyError:
                raise PostgresNotAvailable(
                    f"PostgreSQL refuses to run as root and there is no {SERVICE_USER!r} system user to run it as"
                ) from None
            self._run_as = (entry.pw_uid, entry.pw_gid)
            for path in (self.root, self.socket_dir):
                os.chown(path, entry.pw_uid, entry.pw_gid)
            os.chmod(self.root, 0o700)

    def start(self) -> "TemporaryPostgres":
        if self._started:
            return self
        self._prepare_root()
        try:
            done = self._run(
                str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", self.user, "--auth=trust",
                "--encoding=UTF8", "--no-locale", "--no-sync", timeout=self.start_timeout,
            )
            if done.returncode != 0:
                raise PostgresNotAvailable(f"initdb failed: {done.stdout.strip()[-2000:]}")
            last = ""
            for _ in range(5):
                self.port = _free_port()
                options = [f"-p {self.port}", f"-k {self.socket_dir}"] + [f"-c {k}={v}" for k, v in self.settings.items()]
                done = self._run(
                    str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_file),
                    "-w", "-t", str(int(self.start_timeout)), "-o", " ".join(options), "start",
                    timeout=self.start_timeout + 10,
                )
                if done.returncode == 0:
                    self._started = True
                    atexit.register(self.stop)
                    self._wait_ready()
                    return self
                last = self._log_tail() or done.stdout
                if "could not bind" not in last and "already in use" not in last:
                    break
            raise PostgresNotAvailable(f"pg_ctl start failed: {last.strip()[-2000:]}")
        except BaseException:
            self._cleanup()
            raise

    def ctl(self, *args: str) -> None:
        """Run ``pg_ctl`` on this cluster (``ctl("restart", "-m", "fast")``, ``ctl("stop")``, ``ctl("start")``)."""
        done = self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_file), "-w",
                         *args, timeout=self.start_timeout + 10)
        if done.returncode != 0:
            raise PostgresNotAvailable(f"pg_ctl {' '.join(args)} failed: {done.stdout.strip()[-2000:]}")

    def _wait_ready(self) -> None:
        import psycopg

        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                with psycopg.connect(self.dsn, connect_timeout=5):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def _log_tail(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the server (immediately: nothing in it is worth a clean shutdown) and remove its folder."""
        if self._started:
            self._started = False
            try:
                self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "immediate", "-w", "stop", timeout=60)
            except (OSError, subprocess.SubprocessError):
                pass
            try:
                atexit.unregister(self.stop)
            except Exception:  # pragma: no cover
                pass
        self._cleanup()

    def _cleanup(self) -> None:
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def __enter__(self) -> "TemporaryPostgres":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- databases ----------------------------------------------------------------------

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database (a fresh name unless given) and return its URL."""
        return create_database(self.dsn, name)

    def drop_database(self, name_or_url: str) -> None:
        drop_database(self.dsn, name_or_url)


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


def create_database(url: str, name: str | None = None) -> str:
    """Create an empty database on the server of ``url``; return the URL that points at it."""
    import psycopg
    from psycopg import sql

    name = name or f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return _with_database(url, name)


def drop_database(url: str, name_or_url: str) -> None:
    """Drop a database, disconnecting whoever is still connected to it."""
    import psycopg
    from psycopg import sql

    name = urlsplit(name_or_url).path.lstrip("/") if "://" in name_or_url else name_or_url
    with psycopg.connect(_with_database(url, "postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


# -- pytest fixtures ------------------------------------------------------------------

try:
    import pytest
except ImportError:  # pragma: no cover - the helper works without pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.fixture(scope="session")
    def postgres_dsn() -> Iterator[str]:
        """A PostgreSQL server started once per test session; the URL of the session's database."""
        if find_binaries() is None:
            pytest.skip(SKIP_REASON)
        with TemporaryPostgres() as server:
            yield server.create_database("contentdownload_session")

    @pytest.fixture
    def fresh_postgres_dsn(postgres_dsn: str) -> Iterator[str]:
        """The URL of a new, empty database on the session's server, dropped after the test."""
        url = create_database(postgres_dsn)
        try:
            yield url
        finally:
            drop_database(postgres_dsn, url)
