"""The library API: Downloader.download from programs and threads."""

from __future__ import annotations

import hashlib
import os
import threading

from contentdownload import Downloader, Job
from contentdownload.testing.server import Fault
from contentdownload.transfer.validators import resume_start


def test_download_then_again_makes_no_request(server, tmp_path):
    data = b"%PDF-1.7\n" + os.urandom(300_000)
    url = server.add_file("/doc.pdf", data)
    with Downloader(environ={}) as dl:
        first = dl.download(url, tmp_path / "out")
        assert first.outcome == "downloaded" and first.path.read_bytes() == data
        assert first.sha256 == hashlib.sha256(data).hexdigest()
        assert first.plugins == {"job_key": "streaming", "resume_decision": "streaming", "stream_io": "streaming", "finalize": "streaming"}
        assert not any(first.fallbacks.values())
        server.reset_stats()
        again = dl.download(url, tmp_path / "out")
    assert again.outcome == "skipped" and server.stats("/doc.pdf").requests == 0


def test_interrupted_transfer_resumes_within_one_call(server, tmp_path):
    data = os.urandom(2_000_000)
    url = server.add_file("/big.bin", data)
    server.add_fault("/big.bin", Fault.cut_after(700_000))
    with Downloader(environ={}, backoff_factor=0) as dl:
        result = dl.download(Job(urls=(url,), sha256=hashlib.sha256(data).hexdigest()), tmp_path / "out")
    assert result.outcome == "resumed" and result.resumed_from > 0
    assert result.path.read_bytes() == data
    assert server.stats("/big.bin").ranges[-1] == f"bytes={resume_start(result.resumed_from)}-"  # with the overlap


def test_candidates_are_tried_in_order(server, tmp_path):
    server.add_status("/dead.pdf", 404)
    good = server.add_file("/mirror.pdf", b"%PDF-1.4 mirror bytes")
    with Downloader(environ={}) as dl:
        result = dl.download(Job(urls=(server.url("/dead.pdf"), good)), tmp_path / "out")
    assert result.outcome == "downloaded" and result.url == good
    assert result.path.read_bytes() == b"%PDF-1.4 mirror bytes"


def test_checksum_mismatch_fails_and_nothing_lands(server, tmp_path):
    url = server.add_file("/doc.pdf", b"actual bytes")
    with Downloader(environ={}) as dl:
        result = dl.download(Job(urls=(url,), sha256="0" * 64), tmp_path / "out")
    assert result.outcome == "failed" and result.reason == "sha256_mismatch"
    assert not (tmp_path / "out" / "doc.pdf").exists()


def test_streaming_off_goes_through_legacy(server, tmp_path):
    url = server.add_file("/doc.pdf", b"%PDF-1.7\n" + b"x" * 50_000)
    with Downloader(environ={"DOCSTOKG_ENABLE_STREAMING": "0"}) as dl:
        result = dl.download(url, tmp_path / "out")
    assert result.outcome == "downloaded"
    assert result.plugins["stream_io"] == "legacy" and result.plugins["finalize"] == "legacy"


def test_threads_share_a_downloader(server, tmp_path):
    blobs = {f"/t/{i}.bin": os.urandom(20_000 + i) for i in range(24)}
    urls = [server.add_file(p, d) for p, d in blobs.items()]
    results = []
    with Downloader(environ={}) as dl:
        def fetch(u):
            results.append(dl.download(u, tmp_path / "out"))

        threads = [threading.Thread(target=fetch, args=(u,)) for u in urls + urls[:6]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(results) == 30 and all(r.ok for r in results)
    for p, d in blobs.items():
        assert (tmp_path / "out" / p.rsplit("/", 1)[1]).read_bytes() == d
        assert server.stats(p).full_bodies == 1


def test_options_are_checked_as_the_cli_checks_them(tmp_path):
    import pytest

    from contentdownload.errors import UsageError

    with pytest.raises(UsageError, match="unknown option workerz; did you mean 'workers'"):
        Downloader(workerz=3)
    with pytest.raises(ValueError, match="^timeout must be greater than 0, not -1$"):
        Downloader(timeout=-1)
    with pytest.raises(UsageError, match="^headers must be a list of 'Name: value' strings"):
        Downloader(headers=["no colon here"])
    with pytest.raises(UsageError, match="--cookie-jar: no such file"):
        Downloader(cookie_jar=str(tmp_path / "missing.txt"))


def test_request_options_reach_the_wire_and_nothing_extra_is_created(server, tmp_path):
    import pytest

    from contentdownload.errors import UsageError

    url = server.add_file("/lib.pdf", b"library bytes")
    with Downloader(headers=["X-Lib: yes"], user_agent="lib/1", cookies=["k=v"]) as dl:
        result = dl.download(url, tmp_path / "dest")
        with pytest.raises(UsageError, match="malformed URL"):
            dl.download("http://[::1", tmp_path / "dest")
    assert result.ok and (tmp_path / "dest" / "lib.pdf").read_bytes() == b"library bytes"
    record = next(r for r in server.requests if r.path == "/lib.pdf")
    assert (record.headers["X-Lib"], record.headers["User-Agent"], record.headers["Cookie"]) == ("yes", "lib/1", "k=v")
    assert not (tmp_path / "dest" / "logs").exists()  # no empty folders in the destination
