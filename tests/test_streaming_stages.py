"""The streaming plugin's transfer stages over real loopback sockets, case by case of SPEC section 3.

Each test asserts the final bytes (and their SHA-256) and what went over the wire.
"""

from __future__ import annotations

import json
import os
import random
import threading
import tracemalloc

import pytest
from structlog.testing import capture_logs

from contentdownload.clock import boot_id
from contentdownload.errors import Cancelled, LeaseLostError
from contentdownload.hooks.model import Job, Lease, TransferOptions
from contentdownload.testing.conformance import TransferRig, sha256_hex
from contentdownload.transfer.validators import resume_start
from contentdownload.testing.server import Fault
from contentdownload.transfer.parts import PartStore, Sidecar, url_identity

CHUNK = 64 << 10


@pytest.fixture
def rig(tmp_path):
    with TransferRig("streaming", tmp_path / "rig", retries=4) as r:
        yield r


def one_shot(tmp_path, **kwargs) -> TransferRig:
    """A rig whose pipeline makes exactly one attempt, to look at the disk between attempts."""
    kwargs.setdefault("retries", 0)
    return TransferRig("streaming", tmp_path / "rig", **kwargs)


def payload(seed: int, size: int = 400_000) -> bytes:
    return random.Random(seed).randbytes(size)


def header(record, name):
    return record.headers.get(name)


# -- resume --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_cut_then_resume_sends_range_from_exactly_the_committed_part_size(tmp_path, server, seed):
    data = payload(seed)
    cut = random.Random(seed).randrange(1, len(data) - 1)
    url = server.add_file("/doc.bin", data)
    server.add_fault("/doc.bin", Fault.cut_after(cut))
    with one_shot(tmp_path) as rig:
        first = rig.run(Job(urls=(url,)), "doc.bin")
        assert first.outcome == "failed" and first.reason == "short_body"
        paths = rig.paths("doc.bin")
        assert not paths.final.exists()
        part_size = paths.part.stat().st_size
        assert PartStore.for_paths(paths).load_sidecar(paths).committed == part_size
        assert cut - CHUNK <= part_size <= cut

        second = rig.run(Job(urls=(url,)), "doc.bin")
    assert second.outcome == "resumed" and second.resumed_from == part_size
    assert paths.final.read_bytes() == data and second.sha256 == sha256_hex(data)
    stats = server.stats("/doc.bin")
    assert stats.ranges == [None, f"bytes={resume_start(part_size)}-"]
    assert stats.statuses == [200, 206]
    assert len(data) <= stats.body_bytes <= len(data) + CHUNK
    resume_request = server.requests[1]
    assert header(resume_request, "If-Range") == server.etag("/doc.bin")
    assert header(resume_request, "Accept-Encoding") == "identity"
    assert not paths.part.exists() and not paths.sidecar.exists()


def test_cut_and_resume_within_one_run(rig, server):
    data = payload(4)
    url = server.add_file("/one-run.bin", data)
    server.add_fault("/one-run.bin", Fault.cut_after(123_457))
    result = rig.run(Job(urls=(url,)), "one-run.bin")
    assert result.outcome == "resumed" and result.decisions == ("fresh", "resume")
    assert rig.paths("one-run.bin").final.read_bytes() == data
    stats = server.stats("/one-run.bin")
    assert stats.ranges == [None, f"bytes={resume_start(result.resumed_from)}-"]
    overlap = result.resumed_from - resume_start(result.resumed_from)
    assert stats.body_bytes == len(data) + overlap and result.bytes_downloaded == len(data)


def test_full_body_to_a_range_request_restarts_the_part(rig, server):
    data = payload(5)
    url = server.add_file("/ignored.bin", data)
    server.add_fault("/ignored.bin", Fault.cut_after(150_000))
    server.add_fault("/ignored.bin", Fault.ignore_range())
    result = rig.run(Job(urls=(url,)), "ignored.bin")
    assert result.outcome == "downloaded" and result.resumed_from == 0
    assert rig.paths("ignored.bin").final.read_bytes() == data and result.sha256 == sha256_hex(data)
    stats = server.stats("/ignored.bin")
    assert stats.statuses == [200, 200] and stats.ranges == [None, f"bytes={resume_start(150_000)}-"]
    assert stats.body_bytes == 150_000 + len(data)


def test_a_changed_etag_discards_the_part(rig, server):
    data = payload(6)
    url = server.add_file("/changing.bin", data)
    old_etag = server.etag("/changing.bin")
    server.add_fault("/changing.bin", Fault.cut_after(200_000))
    server.add_fault("/changing.bin", Fault.change_etag())
    result = rig.run(Job(urls=(url,)), "changing.bin")
    assert result.outcome == "downloaded"
    assert rig.paths("changing.bin").final.read_bytes() == data
    stats = server.stats("/changing.bin")
    assert stats.statuses == [200, 200]
    assert header(server.requests[1], "If-Range") == old_etag  # If-Range mismatch: the server sent it all
    assert result.etag == server.etag("/changing.bin") != old_etag


def test_changed_content_behind_a_new_etag_is_fetched_whole(rig, server):
    old, new = payload(7), payload(8, 350_000)
    url = server.add_file("/replaced.bin", old)
    server.add_fault("/replaced.bin", Fault.cut_after(100_000))
    server.add_fault("/replaced.bin", Fault.change_content(new))
    result = rig.run(Job(urls=(url,)), "replaced.bin")
    assert result.outcome == "downloaded" and result.sha256 == sha256_hex(new)
    assert rig.paths("replaced.bin").final.read_bytes() == new


def test_a_wrong_content_range_is_rejected_and_nothing_of_it_written(rig, server):
    data = payload(9)
    url = server.add_file("/shifted.bin", data)
    server.add_fault("/shifted.bin", Fault.cut_after(100_000))
    server.add_fault("/shifted.bin", Fault.wrong_content_range(7))
    result = rig.run(Job(urls=(url,)), "shifted.bin")
    assert result.outcome == "downloaded"
    assert rig.paths("shifted.bin").final.read_bytes() == data and result.sha256 == sha256_hex(data)
    stats = server.stats("/shifted.bin")
    assert stats.statuses == [200, 206, 200]
    assert stats.ranges == [None, f"bytes={resume_start(100_000)}-", None]
    assert result.bytes_downloaded == 100_000 + len(data)


def test_a_short_body_is_not_finalized_and_is_resumed_next_attempt(tmp_path, server):
    data = payload(10)
    url = server.add_file("/short.bin", data)
    server.add_fault("/short.bin", Fault.short_body(1000))
    with one_shot(tmp_path) as rig:
        first = rig.run(Job(urls=(url,)), "short.bin")
        paths = rig.paths("short.bin")
        assert first.outcome == "failed" and first.reason == "short_body"
        assert not paths.final.exists()
        assert paths.part.stat().st_size == len(data) - 1000
        second = rig.run(Job(urls=(url,)), "short.bin")
    assert second.outcome == "resumed" and paths.final.read_bytes() == data
    assert server.stats("/short.bin").ranges == [None, f"bytes={resume_start(len(data) - 1000)}-"]


def test_a_part_longer_than_its_committed_count_is_cut_back(tmp_path, server):
    data = payload(11)
    url = server.add_file("/crashed.bin", data)
    with one_shot(tmp_path) as rig:
        paths = rig.paths("crashed.bin")
        paths.part.write_bytes(data[:120_000] + b"\0" * 5000)  # bytes after the last checkpoint: untrusted
        PartStore.for_paths(paths).save_sidecar(paths, Sidecar(url=url_identity(url), committed=120_000,
                                                      etag=server.etag("/crashed.bin"), expected_total=len(data)))
        result = rig.run(Job(urls=(url,)), "crashed.bin")
    assert result.outcome == "resumed" and result.decisions == ("resume",)
    assert server.stats("/crashed.bin").ranges == [f"bytes={resume_start(120_000)}-"]
    assert paths.final.read_bytes() == data


def test_a_part_killed_before_its_first_checkpoint_resumes_from_its_length_in_the_same_boot(tmp_path, server):
    """``kill -9`` keeps the page cache: a part this boot wrote is resumed from its length even with nothing fsynced yet."""
    data = payload(12)
    url = server.add_file("/killed.bin", data)
    with one_shot(tmp_path) as rig:
        paths = rig.paths("killed.bin")
        paths.part.write_bytes(data[:150_000])
        PartStore.for_paths(paths).save_sidecar(paths, Sidecar(url=url_identity(url), committed=0, boot_id=boot_id(),
                                                      etag=server.etag("/killed.bin"), expected_total=len(data)))
        result = rig.run(Job(urls=(url,)), "killed.bin")
    assert result.outcome == "resumed" and result.decisions == ("resume",)
    assert server.stats("/killed.bin").ranges == [f"bytes={resume_start(150_000)}-"]
    assert paths.final.read_bytes() == data


@pytest.mark.parametrize(
    "sidecar_text, reason",
    [(None, "no_sidecar"), ("{not json", "corrupt_sidecar"), (json.dumps({"version": 1, "url": "http://x/", "committed": 10}), "different_url")],
)
def test_an_unusable_part_is_discarded(tmp_path, server, sidecar_text, reason):
    data = payload(12)
    url = server.add_file("/unusable.bin", data)
    with one_shot(tmp_path) as rig, capture_logs() as logs:
        paths = rig.paths("unusable.bin")
        paths.part.write_bytes(b"garbage" * 1000)
        if sidecar_text is not None:
            paths.sidecar.write_text(sidecar_text)
        result = rig.run(Job(urls=(url,)), "unusable.bin")
    assert result.outcome == "downloaded" and result.decisions == ("discard",)
    assert paths.final.read_bytes() == data
    assert server.stats("/unusable.bin").ranges == [None]
    decision = next(e for e in logs if e["event"] == "streaming_resume_decision")
    assert decision["mode"] == "discard" and decision["reason"] == reason and decision["url"] == url


# -- validators ----------------------------------------------------------------------------


def test_a_weak_etag_never_lets_a_date_stand_in_and_the_overlap_alone_allows_the_resume(rig, server):
    data = payload(13)
    url = server.add_file("/weak.bin", data, weak_etag=True)
    server.add_fault("/weak.bin", Fault.cut_after(100_000))
    result = rig.run(Job(urls=(url,)), "weak.bin")
    assert result.outcome == "resumed"
    assert rig.paths("weak.bin").final.read_bytes() == data
    resume = server.requests[1]
    assert header(resume, "If-Range") is None  # RFC 9110 13.1.5: no weak tag, and no date beside a tag
    assert resume.range == f"bytes={resume_start(result.resumed_from)}-"
    assert server.stats("/weak.bin").statuses == [200, 206]


def test_a_weak_etag_alone_resumes_through_the_overlap_check(rig, server):
    data = payload(14)
    url = server.add_file("/weak-only.bin", data, weak_etag=True, no_last_modified=True)
    server.add_fault("/weak-only.bin", Fault.cut_after(100_000))
    with capture_logs() as logs:
        result = rig.run(Job(urls=(url,)), "weak-only.bin")
    assert result.outcome == "resumed" and result.decisions == ("fresh", "resume")
    assert rig.paths("weak-only.bin").final.read_bytes() == data
    assert header(server.requests[1], "If-Range") is None
    reasons = [e["reason"] for e in logs if e["event"] == "streaming_resume_decision"]
    assert reasons[-1] == "part_with_overlap_only"


def test_304_keeps_the_file_and_reads_no_body(rig, server):
    data = payload(15)
    url = server.add_file("/cached.bin", data)
    first = rig.run(Job(urls=(url,)), "cached.bin")
    final = rig.paths("cached.bin").final
    mtime = final.stat().st_mtime_ns
    server.reset_stats()
    second = rig.run(Job(urls=(url,)), "cached.bin", record=rig.record_of(first),
                     options=TransferOptions(revalidate=True))
    assert second.outcome == "not_modified" and second.decisions == ("revalidate",)
    assert second.sha256 == sha256_hex(data) and second.size == len(data) and second.path == final
    stats = server.stats("/cached.bin")
    assert stats.statuses == [304] and stats.body_bytes == 0 and stats.conditional == 1
    assert header(server.requests[0], "If-None-Match") == server.etag("/cached.bin")
    assert final.read_bytes() == data and final.stat().st_mtime_ns == mtime


def test_revalidation_answered_200_replaces_the_file(rig, server):
    old, new = payload(16), payload(17)
    url = server.add_file("/updated.bin", old)
    first = rig.run(Job(urls=(url,)), "updated.bin")
    server.set_content("/updated.bin", new)
    second = rig.run(Job(urls=(url,)), "updated.bin", record=rig.record_of(first))
    assert second.outcome == "downloaded" and second.decisions == ("revalidate",)
    assert rig.paths("updated.bin").final.read_bytes() == new


def test_412_drops_validators_and_fetches_fresh(rig, server):
    data = payload(18)
    url = server.add_file("/precondition.bin", data)
    server.add_fault("/precondition.bin", Fault.cut_after(90_000))
    server.add_fault("/precondition.bin", Fault.status(412, body=b"<html>precondition failed</html>"))
    result = rig.run(Job(urls=(url,)), "precondition.bin")
    assert result.outcome == "downloaded" and result.decisions == ("fresh", "resume", "fresh")
    assert rig.paths("precondition.bin").final.read_bytes() == data
    stats = server.stats("/precondition.bin")
    assert stats.statuses == [200, 412, 200]
    last = server.requests[2]
    assert all(header(last, h) is None for h in ("Range", "If-Range", "If-None-Match", "If-Modified-Since"))


def test_a_part_that_holds_the_whole_file_is_finalized_after_the_overlap_check(tmp_path, server):
    data = payload(19)
    url = server.add_file("/whole.bin", data)
    with one_shot(tmp_path) as rig:
        paths = rig.paths("whole.bin")
        paths.part.write_bytes(data)
        PartStore.for_paths(paths).save_sidecar(paths, Sidecar(url=url_identity(url), committed=len(data),
                                                      etag=server.etag("/whole.bin"), expected_total=len(data)))
        result = rig.run(Job(urls=(url,), sha256=sha256_hex(data)), "whole.bin")
    assert result.outcome == "resumed" and result.bytes_downloaded == 0
    assert server.stats("/whole.bin").statuses == [206]  # only the overlap came back
    assert paths.final.read_bytes() == data and result.sha256 == sha256_hex(data)


def test_a_part_longer_than_the_file_is_dropped_and_the_file_fetched_whole(rig, server):
    data = payload(20)
    url = server.add_file("/shrunk.bin", data)
    paths = rig.paths("shrunk.bin")
    paths.part.write_bytes(b"x" * (len(data) + 10))
    PartStore.for_paths(paths).save_sidecar(paths, Sidecar(url=url_identity(url), committed=len(data) + 10,
                                                  etag=server.etag("/shrunk.bin"), expected_total=len(data) + 20))
    result = rig.run(Job(urls=(url,)), "shrunk.bin")
    assert result.outcome == "downloaded"
    assert server.stats("/shrunk.bin").statuses == [206, 200]  # another total than the part recorded
    assert paths.final.read_bytes() == data


# -- statuses ------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [404, 410, 403, 401, 400])
def test_an_error_body_never_lands(rig, server, status):
    marker = f"<html>ERROR PAGE {status}</html>".encode()
    url = server.add_status(f"/err{status}", status, body=marker)
    result = rig.run(Job(urls=(url,)), f"err{status}.pdf")
    assert result.outcome == "failed" and result.reason == f"http_{status}" and result.http_status == status
    assert server.stats(f"/err{status}").requests == 1  # no retry
    assert not rig.paths(f"err{status}.pdf").final.exists()
    assert not any(marker in p.read_bytes() for p in rig.root.rglob("*") if p.is_file())


def test_an_error_on_resume_keeps_no_error_bytes(rig, server):
    data = payload(21)
    url = server.add_file("/vanishing.bin", data)
    server.add_fault("/vanishing.bin", Fault.cut_after(50_000))
    server.add_fault("/vanishing.bin", Fault.status(404, body=b"<html>GONE NOW</html>"))
    result = rig.run(Job(urls=(url,)), "vanishing.bin")
    assert result.outcome == "failed" and result.reason == "http_404"
    part = rig.paths("vanishing.bin").part
    assert not rig.paths("vanishing.bin").final.exists()
    assert part.read_bytes() == data[:50_000]  # kept as it was, without the error page


def test_503_retry_after_is_honoured_by_the_client(tmp_path, server):
    data = payload(22, 20_000)
    url = server.add_file("/busy.bin", data)
    server.add_fault("/busy.bin", Fault.status(503, retry_after=1))
    with TransferRig("streaming", tmp_path / "rig", http_retries=2) as rig:
        result = rig.run(Job(urls=(url,)), "busy.bin")
    assert result.outcome == "downloaded" and result.attempts == 2  # the client sent it twice
    first, second = server.requests
    assert (first.status, second.status) == (503, 200) and second.time - first.time >= 0.9
    assert rig.paths("busy.bin").final.read_bytes() == data


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_is_honoured_by_the_pipeline(tmp_path, server, status):
    data = payload(23, 20_000)
    url = server.add_file("/limited.bin", data)
    server.add_fault("/limited.bin", Fault.status(status, retry_after=2))
    waits: list[float] = []
    with TransferRig("streaming", tmp_path / "rig", http_retries=0, sleep=waits.append) as rig:
        result = rig.run(Job(urls=(url,)), "limited.bin")
    assert result.outcome == "downloaded" and result.attempts == 2
    assert waits == [2.0]
    assert server.stats("/limited.bin").statuses == [status, 200]


def test_a_5xx_without_retry_after_backs_off_and_retries(tmp_path, server):
    data = payload(24, 20_000)
    url = server.add_file("/flaky.bin", data)
    server.add_fault("/flaky.bin", Fault.status(502), times=2)
    waits: list[float] = []
    with TransferRig("streaming", tmp_path / "rig", http_retries=0, backoff_factor=0.5, sleep=waits.append) as rig:
        result = rig.run(Job(urls=(url,)), "flaky.bin")
    assert result.outcome == "downloaded" and result.attempts == 3
    assert waits == [1.0]  # urllib3's backoff: no wait before the first retry, then factor * 2
    assert server.stats("/flaky.bin").statuses == [502, 502, 200]


# -- encodings and limits ------------------------------------------------------------------


def test_gzip_yields_the_decoded_bytes(rig, server):
    data = b"%PDF-1.7 " + b"compressible text " * 20_000
    url = server.add_file("/doc.pdf", data, gzip="always")
    result = rig.run(Job(urls=(url,), size=len(data), sha256=sha256_hex(data)), "doc.pdf")
    assert result.outcome == "downloaded" and result.size == len(data)
    assert rig.paths("doc.pdf").final.read_bytes() == data
    assert result.etag == server.etag("/doc.pdf", gzip=True)  # the gzip variant was served
    assert header(server.requests[0], "Accept-Encoding") == "identity"  # it compressed anyway
    assert server.stats("/doc.pdf").body_bytes < len(data) // 10


def test_a_cut_compressed_transfer_is_not_resumed(rig, server):
    data = bytes(random.Random(25).choices(b"abcdefgh ", k=600_000))
    url = server.add_file("/text.txt", data, gzip="always")
    server.add_fault("/text.txt", Fault.cut_after(30_000))
    with capture_logs() as logs:
        result = rig.run(Job(urls=(url,)), "text.txt")
    assert result.outcome == "downloaded" and result.decisions == ("fresh", "discard")
    assert rig.paths("text.txt").final.read_bytes() == data
    assert server.stats("/text.txt").ranges == [None, None]
    assert [e["reason"] for e in logs if e["event"] == "streaming_resume_decision"][-1] == "encoded_content"


def test_max_bytes_aborts_on_the_announced_length(rig, server):
    data = payload(26)
    url = server.add_file("/huge.bin", data)
    result = rig.run(Job(urls=(url,)), "huge.bin", options=TransferOptions(max_bytes=100_000))
    assert result.outcome == "failed" and result.reason == "too_large"
    assert not rig.paths("huge.bin").final.exists() and not rig.leftovers("huge.bin")
    assert server.stats("/huge.bin").requests == 1


def test_max_bytes_aborts_a_decoded_body_that_grows_past_it(rig, server):
    data = b"z" * 2_000_000  # a few KiB on the wire, 2 MB decoded
    url = server.add_file("/bomb.txt", data, gzip="always")
    result = rig.run(Job(urls=(url,)), "bomb.txt", options=TransferOptions(max_bytes=500_000, chunk_size=CHUNK))
    assert result.outcome == "failed" and result.reason == "too_large"
    assert not rig.paths("bomb.txt").final.exists() and not rig.leftovers("bomb.txt")


@pytest.mark.parametrize("location", ["file:///etc/passwd", "ftp://127.0.0.1/pub/file.pdf"])
def test_redirect_to_another_scheme_is_refused(rig, server, location):
    url = server.add_redirect("/moved.pdf", location)
    result = rig.run(Job(urls=(url,)), "moved.pdf")
    assert result.outcome == "failed" and result.reason == "unsafe_redirect"
    assert server.stats("/moved.pdf").requests == 1
    assert not any(p.is_file() for p in rig.out.rglob("*"))


def test_a_redirect_to_http_is_followed_and_recorded(rig, server):
    data = payload(27, 10_000)
    target = server.add_file("/real.bin", data)
    url = server.add_redirect("/alias.bin", "/real.bin")
    result = rig.run(Job(urls=(url,)), "alias.bin")
    assert result.outcome == "downloaded" and result.final_url == target and result.url == url
    assert rig.paths("alias.bin").final.read_bytes() == data


@pytest.mark.parametrize("field", ["sha256", "size"])
def test_an_expected_checksum_or_size_mismatch_is_not_finalized(rig, server, field):
    data = payload(28)
    url = server.add_file("/checked.bin", data)
    job = Job(urls=(url,), sha256="ab" * 32) if field == "sha256" else Job(urls=(url,), size=len(data) - 1)
    result = rig.run(job, "checked.bin")
    assert result.outcome == "failed" and result.reason == f"{field}_mismatch"
    assert not rig.paths("checked.bin").final.exists() and not rig.leftovers("checked.bin")


def test_a_matching_checksum_and_size_are_finalized(rig, server):
    data = payload(29)
    url = server.add_file("/good.bin", data)
    result = rig.run(Job(urls=(url,), sha256=sha256_hex(data).upper(), size=len(data)), "good.bin")
    assert result.outcome == "downloaded" and result.sha256 == sha256_hex(data)


# -- durability, leases, cancellation, memory ------------------------------------------------


class RecordingLease(Lease):
    def __init__(self, paths, lose_at_finalize: bool = False):
        self.paths, self.lose = paths, lose_at_finalize
        self.heartbeats = 0
        self.asserted_with: list[tuple[bool, bool]] = []

    def heartbeat(self) -> None:
        self.heartbeats += 1

    def assert_held(self) -> None:
        self.asserted_with.append((self.paths.part.exists(), self.paths.final.exists()))
        if self.lose:
            raise LeaseLostError("taken over")


def test_checkpoints_heartbeat_and_the_lease_is_asserted_right_before_the_rename(tmp_path, server):
    data = payload(30, 1_500_000)
    url = server.add_file("/durable.bin", data)
    options = TransferOptions(chunk_size=CHUNK, checkpoint_bytes=256 << 10)
    with TransferRig("streaming", tmp_path / "rig", options=options) as rig:
        lease = RecordingLease(rig.paths("durable.bin"))
        result = rig.run(Job(urls=(url,)), "durable.bin", lease=lease)
    assert result.outcome == "downloaded"
    assert lease.heartbeats >= len(data) // (256 << 10)
    assert lease.asserted_with == [(True, False)]


def test_a_lost_lease_stops_the_rename(tmp_path, server):
    data = payload(31)
    url = server.add_file("/fenced.bin", data)
    with one_shot(tmp_path) as rig:
        lease = RecordingLease(rig.paths("fenced.bin"), lose_at_finalize=True)
        with pytest.raises(LeaseLostError):
            rig.run(Job(urls=(url,)), "fenced.bin", lease=lease)
        paths = rig.paths("fenced.bin")
    assert not paths.final.exists() and paths.part.read_bytes() == data


def test_cancel_stops_between_chunks_and_keeps_a_resumable_part(tmp_path, server):
    data = payload(32, 1_000_000)
    url = server.add_file("/cancelled.bin", data)
    cancel = threading.Event()
    seen = []

    def progress(n):
        seen.append(n)
        if sum(seen) >= 300_000:
            cancel.set()

    with one_shot(tmp_path, retries=2) as rig:
        with pytest.raises(Cancelled):
            rig.run(Job(urls=(url,)), "cancelled.bin", cancel=cancel, progress=progress)
        paths = rig.paths("cancelled.bin")
        committed = PartStore.for_paths(paths).load_sidecar(paths).committed
        assert committed == paths.part.stat().st_size >= 300_000 and not paths.final.exists()
        result = rig.run(Job(urls=(url,)), "cancelled.bin")
    assert result.outcome == "resumed" and result.resumed_from == committed
    assert paths.final.read_bytes() == data
    assert server.stats("/cancelled.bin").ranges[-1] == f"bytes={resume_start(committed)}-"


def test_memory_does_not_grow_with_the_file(tmp_path, server):
    url, sha = server.add_large_file("/large.bin", 48 << 20, seed=3)
    options = TransferOptions(chunk_size=1 << 20, checkpoint_bytes=16 << 20)
    with TransferRig("streaming", tmp_path / "rig", options=options) as rig:
        tracemalloc.start()
        try:
            result = rig.run(Job(urls=(url,)), "large.bin")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert result.outcome == "downloaded" and result.sha256 == sha
    assert peak < 8 << 20, f"peak traced memory {peak / 2**20:.1f} MiB for a 48 MiB file"


def test_every_decision_is_logged_with_mode_reason_and_url(rig, server):
    data = payload(33)
    url = server.add_file("/logged.bin", data)
    server.add_fault("/logged.bin", Fault.cut_after(1000))
    with capture_logs() as logs:
        rig.run(Job(urls=(url,)), "logged.bin")
    events = [e for e in logs if e["event"] == "streaming_resume_decision"]
    assert [(e["mode"], e["reason"]) for e in events] == [("fresh", "no_part"), ("resume", "part_with_strong_etag")]
    assert all(e["url"] == url for e in events)
    assert [e["log_level"] for e in events] == ["debug", "info"]  # a new job's plain start is DEBUG, a resume INFO


def test_a_206_for_another_representation_is_rejected(tmp_path, server):
    from contentdownload.transfer.http import HttpClient
    from contentdownload.hooks.model import JobKey, ResumeDecision, StreamContext
    from contentdownload_streaming.stream import stream_io

    data = payload(34)
    url = server.add_file("/other-rep.bin", data)
    with one_shot(tmp_path) as rig, HttpClient(retries=0) as http:
        paths = rig.paths("other-rep.bin")
        paths.part.write_bytes(data[:70_000])
        # Resumed on the date, but the part was written under another ETag than the one served.
        decision = ResumeDecision(
            mode="resume", reason="test", offset=70_000, etag='"written-under-another"',
            headers=(("Range", "bytes=70000-"), ("If-Range", server.last_modified("/other-rep.bin"))),
        )
        ctx = StreamContext(job=Job(urls=(url,)), job_key=JobKey(key="k", scheme="t"), url=url, paths=paths, decision=decision, http=http)
        result = stream_io(ctx)
    assert result.status == "retry" and result.reason == "validator_changed" and result.http_status == 206
    assert result.bytes_written == 0 and ctx.effects.bytes_written == 0
    assert not paths.part.exists()


def test_a_read_timeout_mid_body_keeps_the_part_and_resumes(tmp_path, server):
    data = payload(35)
    url = server.add_file("/stalled.bin", data)
    server.add_fault("/stalled.bin", Fault.stall(2.0, after=150_000, close=True))
    with TransferRig("streaming", tmp_path / "rig", timeout=(5.0, 0.3), retries=2) as rig:
        result = rig.run(Job(urls=(url,)), "stalled.bin")
    # A read cut short by the timeout loses at most the chunk it was filling.
    assert result.outcome == "resumed" and 150_000 - CHUNK <= result.resumed_from <= 150_000
    assert rig.paths("stalled.bin").final.read_bytes() == data
    assert server.stats("/stalled.bin").ranges == [None, f"bytes={resume_start(result.resumed_from)}-"]


def test_a_connection_reset_mid_body_is_resumed(rig, server):
    data = payload(36)
    url = server.add_file("/reset.bin", data)
    server.add_fault("/reset.bin", Fault.cut_after(200_000, reset=True))
    result = rig.run(Job(urls=(url,)), "reset.bin")
    assert result.outcome in ("resumed", "downloaded")
    assert rig.paths("reset.bin").final.read_bytes() == data and result.sha256 == sha256_hex(data)
    ranges = server.stats("/reset.bin").ranges
    assert len(ranges) == 2 and (ranges[1] is None or int(ranges[1][6:-1]) <= 200_000)


def test_a_content_coding_that_cannot_be_decoded_is_never_saved(rig, server):
    url = server.add_status("/packed.bin", 200, body=b"\x1f\x9d compressed bytes", headers={"Content-Encoding": "compress"})
    result = rig.run(Job(urls=(url,)), "packed.bin")
    assert result.outcome == "failed" and result.reason == "unsupported_encoding"
    assert not rig.paths("packed.bin").final.exists() and not rig.leftovers("packed.bin")


def test_a_resume_decision_without_a_validator_never_splices_two_versions(server, tmp_path):
    """A third-party decision that asks for a range with no validator gets the whole file instead."""
    from contentdownload import Downloader, ResumeDecision, hookimpl

    class Careless:
        @hookimpl
        def resume_decision(self, ctx):
            part = ctx.paths.part
            if part.exists() and part.stat().st_size:
                return ResumeDecision(mode="resume", reason="careless", offset=part.stat().st_size)
            return ResumeDecision(mode="fresh", reason="careless")

    old, new = os.urandom(400_000), os.urandom(400_000)
    url = server.add_file("/v.bin", old, no_etag=True, no_last_modified=True)
    server.add_fault("/v.bin", Fault.cut_after(150_000))
    server.add_fault("/v.bin", Fault.change_content(new))
    with Downloader(environ={}, plugins={"careless": Careless()}, pins={"resume_decision": "careless"}, backoff_factor=0) as dl:
        result = dl.download(url, tmp_path / "out")
    assert result.outcome == "downloaded" and result.path.read_bytes() == new
    assert server.stats("/v.bin").ranges[-1] is None
