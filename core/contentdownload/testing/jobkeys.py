"""Conformance checks for ``job_key``: well-formed keys, the same in every process, no I/O.

The plugin is asked for the key of each of :data:`SAMPLE_JOBS` through pluggy, alone (its
hook wrappers included), as the dispatcher asks it:

``job_key_well_formed``
    every answer is ``None`` or a :class:`~contentdownload.hooks.model.JobKey` whose
    ``key`` is a lowercase hex SHA-256 and whose ``scheme`` is not empty.
``job_key_deterministic``
    asked twice, and asked again in another Python process (with another hash seed),
    the plugin gives the same keys.
``job_key_no_io``
    while the plugin answers, nothing opens a file or a socket, resolves a name or
    starts a process (watched with an audit hook, :func:`sys.addaudithook`, for the
    calling thread only; opening Python modules to import them is allowed).

The other process loads the plugin as this one did: an installed plugin by its entry
point, a plugin object given in ``extra_plugins`` by its module's name (a module) or
pickled (an instance of a class defined at module level).
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import re
import subprocess
import sys
import threading
import types
from typing import Any, Callable, Mapping

import attrs

from contentdownload.hooks.model import Job, JobKey, JobKeyContext
from contentdownload.machinery.config import EMPTY
from contentdownload.machinery.runtime import Runtime

__all__ = ["JOB_KEY_CHECKS", "KeyRig", "SAMPLE_JOBS", "key_process_main"]

#: The jobs a ``job_key`` is asked to key, each with its planned relative path.
SAMPLE_JOBS: tuple[JobKeyContext, ...] = tuple(
    JobKeyContext(job=job, relative_path=path)
    for job, path in (
        (Job(urls=("https://example.org/papers/a.pdf",)), "a.pdf"),
        (Job(urls=("HTTP://Example.ORG:80/papers/./a.pdf#page=2",)), "a-1.pdf"),
        (Job(urls=("https://example.org/p?id=7&v=2", "https://mirror.example/p7.pdf"), work_id="W42",
             artifact_id="main"), "W42/main.pdf"),
        (Job(urls=("https://doi.example/10.1000/XYZ-123",), work_id="10.1000/XYZ-123", artifact_id="pdf",
             sha256="ab" * 32, size=1234), "10.1000_XYZ-123.pdf"),
        (Job(urls=("https://bücher.example/straße.pdf",), work_id="10.5555/éé", filename="straße.pdf"), "straße.pdf"),
        (Job(urls=("https://example.org/data.json",), expected_type="json"), "sub/dir/data.json"),
    )
)

_HEX64 = re.compile(r"[0-9a-f]{64}")
#: Audit events that are I/O (a prefix ending in "." covers a family).
_IO_EVENTS = ("open", "socket.", "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
              "os.fork", "os.remove", "os.rename", "os.mkdir", "os.rmdir", "os.truncate", "os.chmod",
              "sqlite3.connect", "urllib.Request", "http.client.connect", "ftplib.connect", "smtplib.connect")
_MODULE_FILES = (".py", ".pyc", ".so", ".pyd", ".pth")


@attrs.frozen
class KeyRig:
    """What a ``job_key`` check needs: the ``plugin``'s name, a ``runtime`` that loaded it, and how it was given."""

    plugin: str
    runtime: Runtime
    extra_plugins: Mapping[str, object] = attrs.field(factory=dict)

    def keys(self) -> list[JobKey | None]:
        """The plugin's answer for each of :data:`SAMPLE_JOBS`."""
        caller = self.runtime.plugins.caller("job_key", self.plugin)
        assert caller is not None, f"{self.plugin!r} does not implement job_key"
        return [caller(ctx=ctx) for ctx in SAMPLE_JOBS]


def _shown(key: JobKey | None) -> list[str | None] | None:
    return None if key is None else [key.key, key.scheme, key.canonical_url]


def check_job_key_well_formed(rig: KeyRig) -> None:
    """Each answer is None or a JobKey with a lowercase hex SHA-256 and a scheme."""
    for ctx, key in zip(SAMPLE_JOBS, rig.keys()):
        if key is None:
            continue
        if not isinstance(key, JobKey):
            raise AssertionError(f"returned {type(key).__name__}, not JobKey, for {ctx.job.url}")
        if not isinstance(key.key, str) or not _HEX64.fullmatch(key.key):
            raise AssertionError(f"key {key.key!r} for {ctx.job.url} is not a lowercase hex SHA-256")
        if not key.scheme:
            raise AssertionError(f"empty scheme for {ctx.job.url}")


# -- the same keys in another process ---------------------------------------------------


def _portable(obj: object) -> dict[str, str]:
    if isinstance(obj, types.ModuleType):
        return {"module": obj.__name__}
    try:
        return {"pickle": base64.b64encode(pickle.dumps(obj)).decode("ascii")}
    except Exception as exc:
        raise AssertionError(f"the plugin object cannot be loaded in another process ({type(exc).__name__}: {exc}); "
                             f"give a module, or an instance of a class defined at module level") from None


def _load_portable(spec: Mapping[str, str]) -> object:
    if "module" in spec:
        import importlib

        return importlib.import_module(spec["module"])
    return pickle.loads(base64.b64decode(spec["pickle"]))


def key_process_main() -> None:
    """The other process: read the plugin's spec (JSON) on stdin, print its keys of the sample jobs (JSON)."""
    spec = json.load(sys.stdin)
    extra = {name: _load_portable(obj) for name, obj in spec["extra"].items()}
    rig = KeyRig(spec["plugin"], Runtime(config=EMPTY, environ={}, extra_plugins=extra), extra)
    json.dump([_shown(k) for k in rig.keys()], sys.stdout)


def _keys_in_another_process(rig: KeyRig) -> list[Any]:
    own = {name: obj for name, obj in rig.extra_plugins.items() if name == rig.plugin}
    spec = {"plugin": rig.plugin, "extra": {name: _portable(obj) for name, obj in own.items()}}
    seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"
    env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": os.pathsep.join(os.path.abspath(p) for p in sys.path if p)}
    code = "from contentdownload.testing.jobkeys import key_process_main; key_process_main()"
    done = subprocess.run([sys.executable, "-c", code], input=json.dumps(spec), capture_output=True, text=True,
                          env=env, timeout=300)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise AssertionError(f"asking the plugin in another process failed: {tail[0]}")
    return json.loads(done.stdout)


def check_job_key_deterministic(rig: KeyRig) -> None:
    """Asked twice here and once in another process (another hash seed), the plugin gives the same keys."""
    first = [_shown(k) for k in rig.keys()]
    second = [_shown(k) for k in rig.keys()]
    for ctx, a, b in zip(SAMPLE_JOBS, first, second):
        if a != b:
            raise AssertionError(f"two calls in one process keyed {ctx.job.url} {a} then {b}")
    for ctx, a, b in zip(SAMPLE_JOBS, first, _keys_in_another_process(rig)):
        if a != b:
            raise AssertionError(f"{ctx.job.url} is keyed {a} here and {b} in another process")


# -- no I/O -----------------------------------------------------------------------------

_watching = threading.local()
_hook_lock = threading.Lock()
_hook_installed = False


def _is_io(event: str, args: tuple[Any, ...]) -> bool:
    if not event.startswith(_IO_EVENTS):
        return False
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])
        mode = args[1] if len(args) > 1 and isinstance(args[1], str) else "r"
        return not (path.endswith(_MODULE_FILES) and "w" not in mode and "a" not in mode and "+" not in mode)
    return True


def _audit(event: str, args: tuple[Any, ...]) -> None:
    seen = getattr(_watching, "events", None)
    if seen is not None and _is_io(event, args):
        seen.append(f"{event}{args[:2]!r}")


def watching_io(call: Callable[[], Any]) -> tuple[Any, list[str]]:
    """Run ``call()``; return its value and the I/O audit events it raised in this thread."""
    global _hook_installed
    with _hook_lock:
        if not _hook_installed:
            sys.addaudithook(_audit)
            _hook_installed = True
    _watching.events = events = []
    try:
        return call(), events
    finally:
        _watching.events = None


def check_job_key_no_io(rig: KeyRig) -> None:
    """Nothing opens a file or a socket, resolves a name or starts a process while the plugin keys jobs."""
    _keys, events = watching_io(rig.keys)
    if events:
        raise AssertionError(f"job_key did I/O: {'; '.join(events[:5])}")


#: The ``job_key`` checks, by name, in the order they run.
JOB_KEY_CHECKS: dict[str, Callable[[KeyRig], None]] = {
    "job_key_well_formed": check_job_key_well_formed,
    "job_key_deterministic": check_job_key_deterministic,
    "job_key_no_io": check_job_key_no_io,
}
