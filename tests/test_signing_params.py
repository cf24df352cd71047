"""Signing parameters the user names (``--signing-param``, ``signing_params``, ``CONTENTDOWNLOAD_SIGNING_PARAMS``):
dropped from a job's identity, redacted wherever a URL is written."""

from __future__ import annotations

import json
import os

from helpers import run_cli


def _everything_written(out, *streams: str) -> bytes:
    blobs = [p.read_bytes() for p in out.rglob("*") if p.is_file()]
    return b"\n".join(blobs + [s.encode() for s in streams])


def test_a_configured_signing_parameter_is_no_part_of_the_identity_and_is_written_nowhere(server, tmp_path):
    data = b"%PDF-1.7\n" + os.urandom(50_000)
    base = server.add_file("/store/report.pdf", data)
    out, jobs = tmp_path / "out", tmp_path / "jobs.txt"
    secrets = ["Tok3nS3cretAlpha", "Tok3nS3cretBravo", "Tok3nS3cretCharlie", "Sig2S3cretDelta"]
    (tmp_path / "contentdownload.toml").write_text('[run]\nsigning_params = ["token", "sig2"]\n')
    env_dir = tmp_path / "elsewhere"
    env_dir.mkdir()
    runs = [  # (token, extra CLI args, env, cwd): the flag, the variable, the config file
        (secrets[0], ["--signing-param", "token", "--signing-param", "SIG2"], {}, env_dir),
        (secrets[1], [], {"CONTENTDOWNLOAD_SIGNING_PARAMS": "token\nsig2"}, env_dir),
        (secrets[2], [], {}, tmp_path),
    ]
    outputs = []
    for i, (token, extra, env, cwd) in enumerate(runs):
        jobs.write_text(f"{base}?Token={token}&sig2={secrets[3]}&part=1\n")
        server.reset_stats()
        proc = run_cli("run", str(jobs), "--out", str(out), "--json", "-v", *extra, env=env, cwd=cwd)
        assert proc.returncode == 0, proc.stderr
        summary = json.loads(proc.stdout)
        outputs += [proc.stdout, proc.stderr]
        if i == 0:
            assert server.stats("/store/report.pdf").requests == 1
        else:  # re-signed: the same job, finished, skipped without a request
            assert server.stats("/store/report.pdf").requests == 0, (extra, env)
            assert summary["outcomes"].get("skipped") == 1, summary
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["manifest.jsonl", "manifest.metrics.json", "report.pdf"]
    written = _everything_written(out, *outputs)
    for secret in secrets:
        assert secret.encode() not in written, secret
    assert b"part=1" in (out / "manifest.jsonl").read_bytes()  # the other parameters stay


def test_a_signing_parameter_name_must_be_a_plain_name(tmp_path):
    proc = run_cli("run", "http://127.0.0.1:9/x.pdf", "--out", str(tmp_path / "o"), "--signing-param", "a=b")
    assert proc.returncode == 2 and "signing" in proc.stderr and "Traceback" not in proc.stderr


def test_a_comma_separated_variable_is_refused_not_taken_as_one_name(tmp_path):
    proc = run_cli("run", "http://127.0.0.1:9/x.pdf", "--out", str(tmp_path / "o"),
                   env={"CONTENTDOWNLOAD_SIGNING_PARAMS": "token,sig2"}, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "one name a line" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
