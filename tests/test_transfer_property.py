"""Property: whatever the cut points and fault sequence, the promoted file is the served one, and the
final path never holds anything else at any moment."""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from contentdownload.hooks.model import Job
from contentdownload.transfer import parts
from contentdownload.testing.conformance import TransferRig
from contentdownload.testing.server import Fault, LoopbackServer

_paths = itertools.count()

fault = st.one_of(
    st.tuples(st.just("cut"), st.floats(0.0, 0.999)),
    st.tuples(st.just("cut_reset"), st.floats(0.0, 0.999)),
    st.tuples(st.just("short"), st.integers(1, 5000)),
    st.tuples(st.just("wrong_range"), st.sampled_from([-100, -1, 1, 3, 4096])),
    st.tuples(st.just("status"), st.sampled_from([500, 502, 503, 429, 412, 408])),
    st.tuples(st.just("ignore_range"), st.just(0)),
    st.tuples(st.just("change_etag"), st.just(0)),
    st.tuples(st.just("change_content"), st.integers(20_000, 300_000)),
    st.tuples(st.just("close_before_headers"), st.just(0)),
)


@pytest.fixture(scope="module")
def server():
    with LoopbackServer() as srv:
        yield srv


class FinalWatcher:
    """Polls the final path while the transfer runs and remembers every content it saw there (by SHA-256)."""

    def __init__(self, final: Path):
        self.final = final
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(0.001):
            try:
                content = self.final.read_bytes()
            except FileNotFoundError:
                continue
            self.seen.add(hashlib.sha256(content).hexdigest())

    def __enter__(self) -> "FinalWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _queue(server: LoopbackServer, path: str, size: int, faults, rng: random.Random) -> list[bytes | None]:
    """Queue ``faults`` for ``path``; returns, per fault, the new content it installs (or ``None``)."""
    contents: list[bytes | None] = []
    for kind, value in faults:
        new = None
        if kind in ("cut", "cut_reset"):
            server.add_fault(path, Fault.cut_after(int(size * value), reset=kind == "cut_reset"))
        elif kind == "short":
            server.add_fault(path, Fault.short_body(min(value, size)))
        elif kind == "wrong_range":
            server.add_fault(path, Fault.wrong_content_range(value))
        elif kind == "status":
            server.add_fault(path, Fault.status(value, retry_after=0 if value in (429, 503) else None))
        elif kind == "ignore_range":
            server.add_fault(path, Fault.ignore_range())
        elif kind == "change_etag":
            server.add_fault(path, Fault.change_etag())
        elif kind == "change_content":
            new = rng.randbytes(value)
            server.add_fault(path, Fault.change_content(new))
        else:
            server.add_fault(path, Fault.close_before_headers())
        contents.append(new)
    return contents


def _served_last(server: LoopbackServer, path: str, original: bytes, contents: list[bytes | None]) -> bytes:
    """The content the server serves now: the last change among the faults it applied."""
    applied = len(contents) - len(server.pending_faults(path))
    changes = [c for c in contents[:applied] if c is not None]
    return changes[-1] if changes else original


# PROPERTY_EXAMPLES=500 runs a longer search locally; the suite keeps 25.
@settings(max_examples=int(os.environ.get("PROPERTY_EXAMPLES", "25")), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    plugin=st.sampled_from(["streaming", "legacy"]),
    size=st.integers(1, 400_000),
    seed=st.integers(0, 2**32 - 1),
    faults=st.lists(fault, max_size=6),
)
def test_the_promoted_file_is_the_served_one_and_nothing_else_ever_sits_at_the_final_path(server, plugin, size, seed, faults):
    rng = random.Random(seed)
    data = rng.randbytes(size)
    path = f"/prop/{next(_paths)}.bin"
    url = server.add_file(path, data)
    contents = _queue(server, path, size, faults, rng)
    promoted: list[bytes] = []

    with tempfile.TemporaryDirectory() as tmp, TransferRig(plugin, Path(tmp), retries=len(faults) + 2) as rig:
        final = rig.paths("file.bin").final

        def before_rename(paths):
            if paths.final == final:
                promoted.append(paths.part.read_bytes())

        parts.set_test_hook("before_rename", before_rename)
        try:
            with FinalWatcher(final) as watcher:
                result = rig.run(Job(urls=(url,)), "file.bin")
        finally:
            parts.set_test_hook("before_rename", None)

        expected = _served_last(server, path, data, contents)
        assert result.outcome in ("downloaded", "resumed"), (result.outcome, result.reason, faults)
        assert final.read_bytes() == expected
        assert promoted == [expected]
        assert watcher.seen <= {hashlib.sha256(expected).hexdigest()}
        assert not rig.leftovers("file.bin")
    server.clear_faults(path)


origin_change = st.one_of(
    st.tuples(st.just("cut"), st.floats(0.0, 0.999)),
    st.tuples(st.just("change"), st.just(0)),  # new content, new validators
    st.tuples(st.just("change_quietly"), st.just(0)),  # same size, same validators (mtime/size-derived ETags)
    st.tuples(st.just("ignore_if_range"), st.just(0)),
    st.tuples(st.just("change_etag"), st.just(0)),
)


def _queue_changes(server: LoopbackServer, path: str, size: int, changes, rng: random.Random) -> list[bytes]:
    """Queue origin changes and faults; returns every version the origin may serve."""
    versions = []
    for kind, value in changes:
        if kind == "cut":
            server.add_fault(path, Fault.cut_after(int(size * value)))
        elif kind in ("change", "change_quietly"):
            new = rng.randbytes(size)
            versions.append(new)
            server.add_fault(path, Fault.change_content(new, keep_validators=kind == "change_quietly"))
        elif kind == "ignore_if_range":
            server.add_fault(path, Fault.ignore_if_range())
        else:
            server.add_fault(path, Fault.change_etag())
    return versions


@settings(max_examples=int(os.environ.get("PROPERTY_EXAMPLES", "25")), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    plugin=st.sampled_from(["streaming", "legacy"]),
    size=st.integers(1, 300_000),
    seed=st.integers(0, 2**32 - 1),
    changes=st.lists(origin_change, max_size=6),
    weak=st.booleans(),
)
@example(plugin="streaming", size=200_000, seed=1, changes=[("cut", 0.5), ("change_quietly", 0)], weak=False)
@example(plugin="streaming", size=200_000, seed=2, changes=[("cut", 0.3), ("change_quietly", 0)], weak=True)
@example(plugin="streaming", size=200_000, seed=3, changes=[("cut", 0.5), ("change", 0), ("ignore_if_range", 0)], weak=False)
def test_an_origin_that_changes_under_the_transfer_never_gets_two_versions_spliced(server, plugin, size, seed, changes, weak):
    rng = random.Random(seed)
    data = rng.randbytes(size)
    path = f"/change/{next(_paths)}.bin"
    url = server.add_file(path, data, weak_etag=weak)
    versions = [data, *_queue_changes(server, path, size, changes, rng)]
    with tempfile.TemporaryDirectory() as tmp, TransferRig(plugin, Path(tmp), retries=len(changes) + 2) as rig:
        final = rig.paths("file.bin").final
        result = rig.run(Job(urls=(url,)), "file.bin")
        if result.outcome in ("downloaded", "resumed"):
            assert final.read_bytes() in versions, (result.outcome, changes)
        else:
            assert not final.exists(), (result.outcome, result.reason, changes)
    server.clear_faults(path)
