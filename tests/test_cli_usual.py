"""The usual command line and request options, through the real CLI against the loopback server."""

from __future__ import annotations

import json

from helpers import run_cli

PDF = b"%PDF-1.4 " + bytes(range(256)) * 40


def _cookie_file(path, host: str) -> None:
    path.write_text(
        "# Netscape HTTP Cookie File\n"
        f"{host}\tFALSE\t/\tFALSE\t0\tsession\ts3cr3t-cookie\n"
    )


def test_run_urls_with_header_user_agent_and_cookies_seen_on_the_wire(server, tmp_path):
    a = server.add_file("/a.pdf", PDF)
    b = server.add_file("/b.pdf", PDF[:9] + PDF[9:][::-1])
    jar = tmp_path / "cookies.txt"
    _cookie_file(jar, server.host)
    proc = run_cli("run", a, b, "-P", str(tmp_path / "out"), "--header", "X-Token: abc 123", "--header", "Accept: application/pdf",
                   "--user-agent", "probe/1.0", "--cookie-jar", str(jar), "--cookie", "c2=v2", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)  # JSON and nothing else on stdout
    assert summary["jobs"] == 2 and summary["exit_code"] == 0
    assert (tmp_path / "out" / "a.pdf").read_bytes() == PDF
    assert (tmp_path / "out" / "b.pdf").read_bytes() == PDF[:9] + PDF[9:][::-1]
    assert (tmp_path / "out" / "manifest.metrics.json").stat().st_mode & 0o777 == 0o644
    seen = [r for r in server.requests if r.path in ("/a.pdf", "/b.pdf")]
    assert len(seen) == 2
    for record in seen:
        assert record.headers["X-Token"] == "abc 123"
        assert record.headers["Accept"] == "application/pdf"
        assert record.headers["User-Agent"] == "probe/1.0"
        cookies = {c.strip() for c in record.headers["Cookie"].split(";")}
        assert cookies == {"session=s3cr3t-cookie", "c2=v2"}


def test_run_mixes_url_arguments_and_list_files(server, tmp_path):
    a = server.add_file("/one.pdf", PDF)
    b = server.add_file("/two.pdf", PDF[:500])
    listed = tmp_path / "list.txt"
    listed.write_text(b + "\n")
    proc = run_cli("run", a, str(listed), "--out", str(tmp_path / "out"), "-q")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""  # -q: no progress, no summary
    assert (tmp_path / "out" / "one.pdf").read_bytes() == PDF
    assert (tmp_path / "out" / "two.pdf").read_bytes() == PDF[:500]


def test_get_saves_one_url_as_the_file_asked_for(server, tmp_path):
    url = server.add_file("/paper.pdf", PDF)
    target = tmp_path / "dl" / "mine.pdf"
    proc = run_cli("get", url, "-o", str(target))
    assert proc.returncode == 0, proc.stderr
    assert target.read_bytes() == PDF
    assert str(target) in proc.stdout
    quiet = run_cli("get", url, "-o", str(target), "-q")  # done already: no request, no output
    assert quiet.returncode == 0 and quiet.stdout == ""
    assert server.stats("/paper.pdf").requests == 1


def test_bad_url_argument_or_no_input_is_one_line_and_exit_2(tmp_path):
    for args in (["run", "http://[::1", "-P", str(tmp_path / "out")], ["run", "-P", str(tmp_path / "out")],
                 ["get", "https://"], ["run", "https://x.test/a", "-P", str(tmp_path / "out"), "--header", "no colon"]):
        proc = run_cli(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_verbose_mirrors_log_lines_to_stderr(server, tmp_path):
    url = server.add_file("/v.pdf", PDF)
    quiet = run_cli("run", url, "-P", str(tmp_path / "q"), "--no-progress")
    loud = run_cli("run", url, "-P", str(tmp_path / "v"), "--no-progress", "-v")
    assert quiet.returncode == loud.returncode == 0
    assert "job_finished" not in quiet.stderr
    logged = (tmp_path / "v" / "logs" / "download.log").read_text()
    first_event = json.loads(logged.splitlines()[0])["event"]
    assert first_event in loud.stderr


def test_log_records_run_start_and_end_and_single_host_notice(server, tmp_path):
    urls = [server.add_file(f"/n{i}.pdf", PDF[: 100 + i]) for i in range(3)]
    proc = run_cli("run", *urls, "-P", str(tmp_path / "out"), "--workers", "6", "--per-host", "2", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "at most --per-host 2 of the 6 workers" in proc.stderr
    events = [json.loads(line) for line in (tmp_path / "out" / "logs" / "download.log").read_text().splitlines()]
    start = next(e for e in events if e["event"] == "run_started")
    end = next(e for e in events if e["event"] == "run_finished")
    assert start["version"] and start["settings"]["workers"] == 6 and set(start["winners"]) >= {"job_key", "stream_io"}
    assert end["jobs"] == 3 and end["outcomes"]["downloaded"] == 3 and end["exit_code"] == 0
    assert events.index(start) < events.index(end)


def test_run_takes_options_between_url_arguments(server, tmp_path):
    a = server.add_file("/first.pdf", PDF)
    b = server.add_file("/second.pdf", PDF[:700])
    proc = run_cli("run", a, "--out", str(tmp_path / "out"), b, "--no-progress", "-q")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "first.pdf").read_bytes() == PDF
    assert (tmp_path / "out" / "second.pdf").read_bytes() == PDF[:700]


def test_a_rate_limit_under_the_low_speed_limit_of_each_transfer_is_noticed(server, tmp_path):
    urls = [server.add_file(f"/r{i}.pdf", PDF[: 100 + i]) for i in range(4)]
    slow = run_cli("run", *urls, "-P", str(tmp_path / "slow"), "--workers", "4", "--limit-rate", "2k", "--no-progress")
    assert slow.returncode == 0, slow.stderr
    assert "--limit-rate 2048 B/s over 4 transfers at once is under --low-speed-limit 1000 B/s" in slow.stderr
    events = [json.loads(line)["event"] for line in (tmp_path / "slow" / "logs" / "download.log").read_text().splitlines()]
    assert "limit_rate_below_low_speed_limit" in events
    fine = run_cli("run", *urls, "-P", str(tmp_path / "fine"), "--workers", "4", "--limit-rate", "1M", "--no-progress")
    assert fine.returncode == 0 and "notice" not in fine.stderr, fine.stderr
