"""Third-party plugins found through real entry-point metadata, and the dispatcher's fallback."""

from __future__ import annotations

import json
import os

import pytest
from structlog.testing import capture_logs

from contentdownload.errors import DuplicatePluginError, NoPluginAnsweredError, PluginLoadError
from contentdownload.machinery.flags import FlagLayer
from contentdownload.hooks.model import Job, JobKeyContext
from contentdownload.machinery.runtime import Runtime

from helpers import make_distribution, run_cli

ACME = """
from contentdownload import JobKey, hookimpl

@hookimpl
def job_key(ctx):
    return JobKey(key="acme-" + ctx.relative_path, scheme="acme-v1")
"""

RAISING = """
from contentdownload import hookimpl

@hookimpl
def job_key(ctx):
    raise RuntimeError("acme exploded")
"""

DECLINING = """
from contentdownload import hookimpl

@hookimpl
def job_key(ctx):
    return None
"""

BROKEN_IMPORT = """
raise ImportError("missing native library libacme.so")
"""

BAD_HOOK = """
from contentdownload import hookimpl

@hookimpl
def job_kee(ctx):
    return None
"""


def _ctx() -> JobKeyContext:
    return JobKeyContext(job=Job("http://example.com/a.pdf"), relative_path="a.pdf")


def test_third_party_plugin_is_discovered_and_can_win_a_hook(third_party):
    third_party("acme-plugins", {"acme": ACME})
    rt = Runtime(cli=FlagLayer(source="cli", pins={"job_key": "acme"}), environ={})
    info = rt.plugins.infos["acme"]
    assert (info.status, info.distribution, info.version, info.hooks) == ("active", "acme-plugins", "1.0", ("job_key",))
    selection = rt.policy.select("job_key")
    assert selection.chain == ("acme",) and selection.pinned
    answer = rt.dispatcher.call(selection, _ctx())
    assert answer.plugin == "acme" and answer.result.key == "acme-a.pdf"


def test_plugin_that_fails_to_import_is_listed_and_skipped(third_party):
    third_party("broken-plugins", {"broken": BROKEN_IMPORT})
    with capture_logs() as logs:
        rt = Runtime(environ={})
    info = rt.plugins.infos["broken"]
    assert info.status == "failed" and "libacme.so" in info.error
    assert info.distribution == "broken-plugins"
    assert any(e["event"] == "plugin failed to load, skipped" and e["plugin"] == "broken" for e in logs)
    # The host still works: the built-ins answer.
    assert rt.dispatcher.call(rt.policy.select("job_key"), _ctx()).plugin == "streaming"
    assert rt.explain()["load_failures"][0]["disable_with"].startswith("CONTENTDOWNLOAD_DISABLE_PLUGINS=broken")


def test_plugin_failing_validation_is_listed_as_failed(third_party):
    third_party("broken-validation", {"brokenv": BAD_HOOK})
    rt = Runtime(environ={})
    assert rt.plugins.infos["brokenv"].status == "failed"
    assert "job_kee" in rt.plugins.infos["brokenv"].error


def test_strict_loading_makes_a_broken_plugin_fatal(third_party):
    third_party("broken-plugins", {"broken": BROKEN_IMPORT})
    with pytest.raises(PluginLoadError, match="broken"):
        Runtime(environ={"CONTENTDOWNLOAD_STRICT_PLUGINS": "1"})


def test_disabled_plugin_is_not_imported(third_party):
    third_party("broken-plugins", {"broken": BROKEN_IMPORT})
    rt = Runtime(environ={"CONTENTDOWNLOAD_DISABLE_PLUGINS": "broken"})
    assert rt.plugins.infos["broken"].status == "disabled"
    assert rt.status()["healthy"]


def test_two_plugins_with_one_name_is_an_error_naming_both(third_party):
    third_party("dupe-plugins", {"streaming": ACME})
    with pytest.raises(DuplicatePluginError) as info:
        Runtime(environ={})
    assert "contentdownload" in str(info.value) and "dupe-plugins" in str(info.value)


def test_raising_hook_falls_back_logs_and_counts(third_party):
    third_party("acme-plugins", {"acme": RAISING})
    rt = Runtime(cli=FlagLayer(source="cli", pins={"job_key": "acme"}, allow_fallback=True), environ={})
    with capture_logs() as logs:
        answer = rt.dispatcher.call(rt.policy.select("job_key"), _ctx())
    assert answer.plugin == "streaming" and answer.fallback
    lines = [e for e in logs if "falling back" in e["event"]]
    assert lines and lines[0]["plugin"] == "acme" and "acme exploded" in lines[0]["error"]
    stats = rt.telemetry.snapshot()["job_key"]
    assert stats["plugins"]["acme"]["errors"] == 1
    assert stats["total"]["fallbacks"] == 1
    seed = rt.telemetry.seed_metrics()
    assert seed["acme.job_key_errors"] == 1 and seed["streaming.job_keys_fallback"] == 1
    assert seed["streaming.job_key_errors"] == 0


def test_pinned_hook_without_fallback_fails_with_every_reason(third_party):
    third_party("acme-plugins", {"acme": DECLINING})
    rt = Runtime(cli=FlagLayer(source="cli", pins={"job_key": "acme"}), environ={})
    with pytest.raises(NoPluginAnsweredError) as info:
        rt.dispatcher.call(rt.policy.select("job_key"), _ctx())
    assert info.value.attempts == [("acme", "declined")]
    assert "acme: declined" in str(info.value)


def test_declining_plugin_passes_to_the_next(third_party):
    third_party("acme-plugins", {"acme": DECLINING})
    rt = Runtime(cli=FlagLayer(source="cli", pins={"job_key": "acme"}, allow_fallback=True), environ={})
    answer = rt.dispatcher.call(rt.policy.select("job_key"), _ctx())
    assert answer.plugin == "streaming" and answer.fallback
    assert rt.telemetry.snapshot()["job_key"]["plugins"]["acme"]["declined"] == 1


# -- the same through the real CLI in a subprocess -----------------------------------


def _env(*roots) -> dict:
    return {"PYTHONPATH": os.pathsep.join([*map(str, roots), os.environ.get("PYTHONPATH", "")])}


def test_cli_lists_builtins_and_third_party(tmp_path):
    root = make_distribution(tmp_path / "site", "acme-plugins", {"acme": ACME})
    broken = make_distribution(tmp_path / "site2", "broken-plugins", {"broken": BROKEN_IMPORT})
    proc = run_cli("plugins", "list", "--json", env=_env(root, broken), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    plugins = {p["name"]: p for p in json.loads(proc.stdout)["plugins"]}
    assert plugins["legacy"]["status"] == plugins["streaming"]["status"] == "active"
    assert "job_key" in plugins["legacy"]["hooks"] and "job_key" in plugins["streaming"]["hooks"]
    assert plugins["acme"]["distribution"] == "acme-plugins"
    assert plugins["broken"]["status"] == "failed"


def test_cli_explain_shows_third_party_winning_from_config(tmp_path):
    root = make_distribution(tmp_path / "site", "acme-plugins", {"acme": ACME})
    (tmp_path / "contentdownload.toml").write_text('[plugins]\njob_key = "acme"\n')
    proc = run_cli("plugins", "explain", "--json", env=_env(root), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    hook = json.loads(proc.stdout)["hooks"]["job_key"]
    assert (hook["winner"], hook["source"], hook["pinned"]) == ("acme", "config", True)


@pytest.mark.parametrize(
    "args, env, config",
    [
        (["--plugin", "job_key=streeming"], {}, None),
        ([], {"CONTENTDOWNLOAD_PLUGINS": "job_key=streeming"}, None),
        ([], {}, '[plugins]\njob_key = "streeming"\n'),
        ([], {"CONTENTDOWNLOAD_DISABLE_PLUGINS": "streeming"}, None),
    ],
)
def test_cli_unknown_plugin_exits_2_with_suggestion(tmp_path, args, env, config):
    if config:
        (tmp_path / "contentdownload.toml").write_text(config)
    proc = run_cli("plugins", "explain", *args, env=env, cwd=tmp_path)
    assert proc.returncode == 2
    assert "did you mean 'streaming'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_cli_strict_plugins_exits_2(tmp_path):
    broken = make_distribution(tmp_path / "site", "broken-plugins", {"broken": BROKEN_IMPORT})
    proc = run_cli("status", "--strict-plugins", env=_env(broken), cwd=tmp_path)
    assert proc.returncode == 2 and "broken" in proc.stderr
