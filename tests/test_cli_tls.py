"""TLS: a loopback HTTPS server with a certificate made for the test (trustme)."""

from __future__ import annotations

import json
import ssl

import pytest

from contentdownload.testing.server import LoopbackServer
from helpers import run_cli

trustme = pytest.importorskip("trustme")

BODY = b"tls body " * 500


@pytest.fixture
def https(tmp_path):
    """``(server, https URL of /doc.pdf, path of the CA bundle that signed its certificate)``."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    bundle = tmp_path / "test-ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    srv = LoopbackServer(root=tmp_path / "served")
    httpd = srv._httpd()
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    with srv:
        url = srv.add_file("/doc.pdf", BODY).replace("http://", "https://", 1)
        yield srv, url, bundle


def _wrong_bundle(tmp_path):
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    return str(other)


def _result(out):
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    return rows[-1]


def test_unknown_certificate_fails_with_tls_error(https, tmp_path):
    _srv, url, _bundle = https
    proc = run_cli("run", url, "-P", str(tmp_path / "out"), "--json")
    assert proc.returncode == 1
    row = _result(tmp_path / "out")
    assert row["outcome"] == "failed" and row["reason"] == "tls_error"
    assert not (tmp_path / "out" / "doc.pdf").exists()


def test_ca_bundle_flag_beats_a_wrong_requests_ca_bundle(https, tmp_path):
    _srv, url, bundle = https
    env = {"REQUESTS_CA_BUNDLE": _wrong_bundle(tmp_path), "CURL_CA_BUNDLE": _wrong_bundle(tmp_path)}
    proc = run_cli("run", url, "-P", str(tmp_path / "out"), "--ca-bundle", str(bundle), "-q", env=env)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "doc.pdf").read_bytes() == BODY


def test_ca_bundle_from_config_and_ssl_cert_file(https, tmp_path):
    _srv, url, bundle = https
    config = tmp_path / "cd.toml"
    config.write_text(f"[run]\nca_bundle = {json.dumps(str(bundle))}\n")
    proc = run_cli("run", url, "-P", str(tmp_path / "a"), "--config", str(config), "-q",
                   env={"REQUESTS_CA_BUNDLE": _wrong_bundle(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("get", url, "-P", str(tmp_path / "b"), "-q", env={"SSL_CERT_FILE": str(bundle), "REQUESTS_CA_BUNDLE": "", "CURL_CA_BUNDLE": ""})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "b" / "doc.pdf").read_bytes() == BODY


def test_insecure_works_with_exactly_one_warning_line(https, tmp_path):
    srv, url, _bundle = https
    second = srv.add_file("/two.pdf", BODY[:100]).replace("http://", "https://", 1)
    proc = run_cli("run", url, second, "-P", str(tmp_path / "out"), "--insecure", "--no-progress", "--json",
                   env={"REQUESTS_CA_BUNDLE": _wrong_bundle(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["jobs"] == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not verified" in lines[0] and "InsecureRequestWarning" not in proc.stderr
    assert (tmp_path / "out" / "doc.pdf").read_bytes() == BODY


def test_missing_ca_bundle_is_a_usage_error(tmp_path):
    proc = run_cli("run", "https://127.0.0.1:1/x", "-P", str(tmp_path / "out"), "--ca-bundle", str(tmp_path / "nope.pem"))
    assert proc.returncode == 2 and "--ca-bundle: no such file" in proc.stderr
    assert not (tmp_path / "out").exists()
