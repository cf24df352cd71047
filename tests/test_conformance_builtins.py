"""The built-in plugins pass the shipped conformance checks; a careless plugin does not."""

from __future__ import annotations

import hashlib

import pytest

from contentdownload import StreamResult, hookimpl
from contentdownload.testing.conformance import CHECKS, ConformanceError, assert_conformance, run_conformance
from contentdownload.testing.server import LoopbackServer


@pytest.fixture(scope="module")
def server():
    with LoopbackServer() as srv:
        yield srv


@pytest.mark.parametrize("plugin", ["streaming", "legacy"])
def test_builtin_plugin_meets_the_transfer_contract(plugin, tmp_path, server):
    results = assert_conformance(plugin, tmp_path, server=server)
    assert [r.name for r in results] == list(CHECKS)
    assert all(r.passed for r in results)


class Careless:
    """Writes whatever the server sends, whatever the status, and calls it complete."""

    @hookimpl
    def stream_io(self, ctx):
        response = ctx.http.get(ctx.url, dict(ctx.decision.headers))
        digest = hashlib.sha256()
        with response, open(ctx.paths.part, "wb") as fh:
            try:
                for chunk in response.iter_content(65536):
                    ctx.effects.wrote(len(chunk))
                    fh.write(chunk)
                    digest.update(chunk)
            except Exception:
                pass
        size = ctx.paths.part.stat().st_size
        return StreamResult(status="complete", http_status=response.status_code, sha256=digest.hexdigest(), total_size=size)


def test_a_careless_plugin_fails_the_checks_it_breaks(tmp_path, server):
    results = {r.name: r for r in run_conformance("careless", tmp_path, extra_plugins={"careless": Careless()}, server=server)}
    assert results["full_download"].passed
    for name in ("error_body_never_lands", "short_body_never_finalized", "not_modified_keeps_file", "max_bytes_aborts"):
        assert not results[name].passed, name
        assert results[name].detail
    with pytest.raises(ConformanceError) as info:
        assert_conformance("careless", tmp_path / "again", extra_plugins={"careless": Careless()}, server=server,
                           checks=["error_body_never_lands"])
    assert "error_body_never_lands" in str(info.value)


def test_unknown_checks_and_plugins_are_reported(tmp_path):
    with pytest.raises(ValueError, match="unknown conformance checks"):
        run_conformance("streaming", tmp_path, checks=["nope"])
    results = run_conformance("not-installed", tmp_path, checks=["full_download"])
    assert not results[0].passed and "not-installed" in results[0].detail
