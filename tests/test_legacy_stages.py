"""The legacy plugin's transfer stages, and the env flag that rolls the product back to them."""

from __future__ import annotations

import os
import random

import pytest

from contentdownload.errors import LeaseLostError
from contentdownload.hooks.model import Job, Lease, PriorRecord, TransferOptions
from contentdownload.testing.conformance import TransferRig, sha256_hex
from contentdownload.testing.server import Fault
from contentdownload.transfer.parts import PartStore, Sidecar, url_identity

LEGACY_EVERYWHERE = {"resume_decision": "legacy", "stream_io": "legacy", "finalize": "legacy"}
STREAMING_EVERYWHERE = {"resume_decision": "streaming", "stream_io": "streaming", "finalize": "streaming"}


@pytest.fixture
def rig(tmp_path):
    with TransferRig("legacy", tmp_path / "rig", retries=4) as r:
        yield r


def payload(seed: int, size: int = 300_000) -> bytes:
    return random.Random(seed).randbytes(size)


def test_legacy_never_resumes_but_ends_correct(rig, server):
    data = payload(1)
    url = server.add_file("/doc.bin", data)
    server.add_fault("/doc.bin", Fault.cut_after(120_000))
    result = rig.run(Job(urls=(url,)), "doc.bin")
    assert result.outcome == "downloaded" and result.resumed_from == 0
    assert result.decisions == ("fresh", "discard")
    assert rig.paths("doc.bin").final.read_bytes() == data and result.sha256 == sha256_hex(data)
    stats = server.stats("/doc.bin")
    assert stats.ranges == [None, None] and stats.statuses == [200, 200]
    assert stats.body_bytes == 120_000 + len(data)


def test_legacy_ignores_a_resumable_streaming_part(rig, server):
    data = payload(2)
    url = server.add_file("/left.bin", data)
    paths = rig.paths("left.bin")
    paths.part.write_bytes(data[:100_000])
    PartStore.for_paths(paths).save_sidecar(paths, Sidecar(url=url_identity(url), committed=100_000,
                                                  etag=server.etag("/left.bin"), expected_total=len(data)))
    result = rig.run(Job(urls=(url,)), "left.bin")
    assert result.decisions == ("discard",) and result.outcome == "downloaded"
    assert server.stats("/left.bin").ranges == [None]
    assert paths.final.read_bytes() == data and not paths.sidecar.exists()


def test_a_short_body_is_not_finalized_and_restarts_from_zero(tmp_path, server):
    data = payload(3)
    url = server.add_file("/short.bin", data)
    server.add_fault("/short.bin", Fault.short_body(500))
    with TransferRig("legacy", tmp_path / "rig", retries=0) as rig:
        first = rig.run(Job(urls=(url,)), "short.bin")
        assert first.outcome == "failed" and first.reason == "short_body"
        assert not rig.paths("short.bin").final.exists()
        second = rig.run(Job(urls=(url,)), "short.bin")
    assert second.outcome == "downloaded" and rig.paths("short.bin").final.read_bytes() == data
    assert server.stats("/short.bin").ranges == [None, None]


def test_conditional_request_with_a_verified_record(rig, server):
    data = payload(4)
    url = server.add_file("/kept.bin", data)
    first = rig.run(Job(urls=(url,)), "kept.bin")
    server.reset_stats()
    second = rig.run(Job(urls=(url,)), "kept.bin", record=rig.record_of(first), options=TransferOptions(revalidate=True))
    assert second.outcome == "not_modified" and second.decisions == ("revalidate",)
    stats = server.stats("/kept.bin")
    assert stats.statuses == [304] and stats.body_bytes == 0 and stats.conditional == 1
    assert rig.paths("kept.bin").final.read_bytes() == data


@pytest.mark.parametrize("flaw", ["no_sha256", "no_size", "no_path", "file_changed_same_size"])
def test_no_conditional_request_without_a_full_matching_record(rig, server, flaw):
    data = payload(5)
    url = server.add_file("/unsure.bin", data)
    first = rig.run(Job(urls=(url,)), "unsure.bin")
    record = rig.record_of(first)
    final = rig.paths("unsure.bin").final
    if flaw == "no_sha256":
        record = PriorRecord(path=record.path, size=record.size, etag=record.etag, last_modified=record.last_modified)
    elif flaw == "no_size":
        record = PriorRecord(path=record.path, sha256=record.sha256, etag=record.etag)
    elif flaw == "no_path":
        record = PriorRecord(size=record.size, sha256=record.sha256, etag=record.etag)
    else:
        final.write_bytes(b"X" + data[1:])  # same size and (likely) mtime resolution: only the hash tells
        os.utime(final, ns=(record.mtime_ns, record.mtime_ns))
    server.reset_stats()
    second = rig.run(Job(urls=(url,)), "unsure.bin", record=record)
    assert second.decisions == ("fresh",) and second.outcome == "downloaded"
    stats = server.stats("/unsure.bin")
    assert stats.conditional == 0 and stats.statuses == [200]
    assert final.read_bytes() == data


@pytest.mark.parametrize("status", [404, 410, 403])
def test_an_error_body_never_lands(rig, server, status):
    marker = f"<html>LEGACY ERROR {status}</html>".encode()
    url = server.add_status(f"/e{status}", status, body=marker)
    result = rig.run(Job(urls=(url,)), f"e{status}.pdf")
    assert result.outcome == "failed" and result.reason == f"http_{status}"
    assert not rig.paths(f"e{status}.pdf").final.exists()
    assert not any(marker in p.read_bytes() for p in rig.root.rglob("*") if p.is_file())


def test_412_goes_fresh_without_validators(rig, server):
    data = payload(6)
    url = server.add_file("/pre.bin", data)
    first = rig.run(Job(urls=(url,)), "pre.bin")
    server.reset_stats()
    server.add_fault("/pre.bin", Fault.status(412))
    second = rig.run(Job(urls=(url,)), "pre.bin", record=rig.record_of(first))
    assert second.decisions == ("revalidate", "fresh") and second.outcome == "downloaded"
    assert server.stats("/pre.bin").statuses == [412, 200]
    assert server.requests[1].headers.get("If-None-Match") is None


def test_503_is_retried(rig, server):
    data = payload(7, 30_000)
    url = server.add_file("/busy.bin", data)
    server.add_fault("/busy.bin", Fault.status(503, retry_after=0))
    result = rig.run(Job(urls=(url,)), "busy.bin")
    assert result.outcome == "downloaded" and server.stats("/busy.bin").statuses == [503, 200]
    assert rig.paths("busy.bin").final.read_bytes() == data


def test_gzip_is_decoded(rig, server):
    data = b"legacy text " * 30_000
    url = server.add_file("/t.txt", data, gzip="always")
    result = rig.run(Job(urls=(url,), size=len(data)), "t.txt")
    assert result.outcome == "downloaded" and rig.paths("t.txt").final.read_bytes() == data
    assert result.etag == server.etag("/t.txt", gzip=True)


def test_max_bytes_and_checksum_mismatch_are_never_finalized(rig, server):
    data = payload(8)
    url = server.add_file("/limit.bin", data)
    too_big = rig.run(Job(urls=(url,)), "limit.bin", options=TransferOptions(max_bytes=1000))
    assert too_big.outcome == "failed" and too_big.reason == "too_large"
    wrong = rig.run(Job(urls=(url,), sha256="1" * 64), "limit.bin")
    assert wrong.outcome == "failed" and wrong.reason == "sha256_mismatch"
    assert not rig.paths("limit.bin").final.exists() and not rig.leftovers("limit.bin")


def test_redirect_to_file_is_refused(rig, server):
    url = server.add_redirect("/r.pdf", "file:///etc/passwd")
    result = rig.run(Job(urls=(url,)), "r.pdf")
    assert result.outcome == "failed" and result.reason == "unsafe_redirect"


def test_legacy_renames_without_fsync_and_streaming_fsyncs(tmp_path, server, monkeypatch):
    data = payload(9)
    url = server.add_file("/sync.bin", data)
    calls = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd))[1])
    with TransferRig("legacy", tmp_path / "legacy") as rig:
        assert rig.run(Job(urls=(url,)), "sync.bin").outcome == "downloaded"
    assert calls == []
    with TransferRig("streaming", tmp_path / "streaming") as rig:
        assert rig.run(Job(urls=(url,)), "sync.bin").outcome == "downloaded"
    assert len(calls) >= 2  # the part, then the folder


def test_legacy_asserts_the_lease_before_the_rename(tmp_path, server):
    data = payload(10)
    url = server.add_file("/lease.bin", data)

    class Lost(Lease):
        def assert_held(self):
            raise LeaseLostError("taken over")

    with TransferRig("legacy", tmp_path / "rig") as rig:
        with pytest.raises(LeaseLostError):
            rig.run(Job(urls=(url,)), "lease.bin", lease=Lost())
        assert not rig.paths("lease.bin").final.exists()


# -- the rollback flag ---------------------------------------------------------------------


def _scenario(name, server):
    """Set up one scenario; returns (url, expected bytes or None for a failure, expected reason)."""
    data = payload(hash(name) % 1000)
    path = f"/flag-{name}"
    if name == "cut":
        url = server.add_file(path, data)
        server.add_fault(path, Fault.cut_after(70_000))
    elif name == "short":
        url = server.add_file(path, data)
        server.add_fault(path, Fault.short_body(10))
    elif name == "changed_etag":
        url = server.add_file(path, data)
        server.add_fault(path, Fault.cut_after(70_000))
        server.add_fault(path, Fault.change_etag())
    elif name == "gzip":
        data = b"flag gzip " * 20_000
        url = server.add_file(path, data, gzip="always")
    else:
        url = server.add_status(path, 404, body=b"<html>FLAG 404</html>")
        return url, None, "http_404"
    return url, data, ""


@pytest.mark.parametrize("name", ["cut", "short", "changed_etag", "gzip", "missing"])
@pytest.mark.parametrize(
    "environ, expected",
    [
        ({"DOCSTOKG_ENABLE_STREAMING": "0"}, LEGACY_EVERYWHERE),
        ({"DOCSTOKG_ENABLE_STREAMING_INTEGRATION": "0"}, LEGACY_EVERYWHERE),
        ({"DOCSTOKG_ENABLE_STREAMING": "1"}, STREAMING_EVERYWHERE),
        ({}, STREAMING_EVERYWHERE),
    ],
)
def test_the_streaming_flag_rolls_back_to_legacy_and_stays_correct(tmp_path, server, name, environ, expected):
    url, data, reason = _scenario(name, server)
    with TransferRig(None, tmp_path / "rig", environ=environ, retries=3) as rig:
        result = rig.run(Job(urls=(url,)), f"{name}.bin")
    answered = dict(expected) if data is not None else {h: n for h, n in expected.items() if h != "finalize"}
    assert result.plugins == answered  # a failed transfer never reaches finalize
    assert not any(result.fallbacks.values())
    ranged = any(r is not None for r in server.stats(f"/flag-{name}").ranges)
    if expected == LEGACY_EVERYWHERE:
        assert not ranged  # legacy never sends Range
    elif name in ("cut", "short"):
        assert ranged  # streaming resumes these
    if data is None:
        assert result.outcome == "failed" and result.reason == reason
        assert not rig.paths(f"{name}.bin").final.exists()
    else:
        assert result.outcome in ("downloaded", "resumed")
        assert rig.paths(f"{name}.bin").final.read_bytes() == data and result.sha256 == sha256_hex(data)


def test_a_content_coding_that_cannot_be_decoded_is_never_saved(rig, server):
    url = server.add_status("/packed.bin", 200, body=b"\x1f\x9d compressed bytes", headers={"Content-Encoding": "compress"})
    result = rig.run(Job(urls=(url,)), "packed.bin")
    assert result.outcome == "failed" and result.reason == "unsupported_encoding"
    assert not rig.paths("packed.bin").final.exists() and not rig.leftovers("packed.bin")
