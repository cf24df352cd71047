"""Selection policy: sources, precedence, canary, pins and fallback chains."""

from __future__ import annotations

import subprocess
import sys

import pytest

from contentdownload.machinery.config import parse_config
from contentdownload.errors import UnknownPluginError, UsageError
from contentdownload.machinery.flags import FlagLayer
from contentdownload.jobs.keys import canary_fraction
from contentdownload.hooks.model import HOOKS
from contentdownload.machinery.runtime import Runtime

STREAMING_HOOKS = ("resume_decision", "stream_io", "finalize")


def runtime(cli=None, env=None, config=None, **kw) -> Runtime:
    cfg = parse_config(config or {}, "test.toml")
    return Runtime(cli=FlagLayer(source="cli", **(cli or {})), config=cfg, environ=env or {}, **kw)


def winners(rt: Runtime, key: str | None = None) -> dict[str, tuple[str, str]]:
    return {h: (s.winner, s.source) for h, s in rt.policy.plan(key).items()}


def test_default_is_streaming_everywhere():
    rt = runtime()
    for hook in HOOKS:
        sel = rt.policy.select(hook)
        assert sel.source == "default"
        assert sel.chain[-1] == "legacy"
    assert rt.policy.select("job_key").chain == ("streaming", "legacy")
    assert rt.policy.idempotency.enabled and rt.policy.streaming_schema.enabled


def test_env_streaming_off_moves_three_stages_to_legacy():
    rt = runtime(env={"DOCSTOKG_ENABLE_STREAMING": "0"})
    w = winners(rt)
    for hook in STREAMING_HOOKS:
        assert w[hook] == ("legacy", "env")
        assert rt.policy.select(hook).chain == ("legacy",)
    assert w["job_key"] == ("streaming", "default")


def test_env_idempotency_off_moves_job_key_only():
    rt = runtime(env={"DOCSTOKG_ENABLE_IDEMPOTENCY": "0"})
    w = winners(rt)
    assert w["job_key"] == ("legacy", "env")
    assert all(w[h] == ("streaming", "default") for h in STREAMING_HOOKS)
    assert rt.policy.idempotency.enabled is False and rt.policy.idempotency.source == "env"


def test_env_master_switch_off_makes_legacy_win_everything():
    rt = runtime(env={"DOCSTOKG_ENABLE_STREAMING_INTEGRATION": "0", "DOCSTOKG_ENABLE_STREAMING": "1"})
    assert all(v == ("legacy", "env") for v in winners(rt).values())
    assert rt.policy.idempotency.enabled is False
    assert rt.policy.streaming_schema.enabled is False


def test_schema_flag_is_read_and_exposed():
    rt = runtime(env={"DOCSTOKG_ENABLE_STREAMING_SCHEMA": "0"})
    assert rt.policy.streaming_schema.enabled is False
    assert rt.status()["flags"]["streaming_schema"] == {"enabled": False, "source": "env", "detail": "DOCSTOKG_ENABLE_STREAMING_SCHEMA=0"}


def test_cli_beats_env():
    rt = runtime(cli={"streaming_integration": True, "origin": {"streaming_integration": "--enable-streaming-integration"}}, env={"DOCSTOKG_ENABLE_STREAMING": "0"})
    assert all(v == ("streaming", "cli") for v in winners(rt).values())
    rt = runtime(cli={"streaming_integration": False}, env={"DOCSTOKG_ENABLE_STREAMING": "1"})
    assert all(v == ("legacy", "cli") for v in winners(rt).values())


def test_env_beats_config():
    rt = runtime(env={"DOCSTOKG_ENABLE_STREAMING": "1"}, config={"streaming": False})
    assert all(winners(rt)[h] == ("streaming", "env") for h in STREAMING_HOOKS)
    rt = runtime(env={"DOCSTOKG_ENABLE_STREAMING": "0"}, config={"streaming": True, "plugins": {"stream_io": "streaming"}})
    assert all(winners(rt)[h] == ("legacy", "env") for h in STREAMING_HOOKS)


def test_cli_beats_config():
    rt = runtime(cli={"pins": {"finalize": "legacy"}}, config={"plugins": {"finalize": "streaming"}})
    assert winners(rt)["finalize"] == ("legacy", "cli")


def test_config_beats_default_and_names_the_file():
    rt = runtime(config={"idempotency": False})
    sel = rt.policy.select("job_key")
    assert (sel.winner, sel.source) == ("legacy", "config")
    assert "test.toml" in sel.detail


def test_pinned_hook_does_not_fall_back_unless_allowed():
    rt = runtime(cli={"pins": {"stream_io": "streaming"}})
    sel = rt.policy.select("stream_io")
    assert sel.pinned and sel.chain == ("streaming",)
    rt = runtime(cli={"pins": {"stream_io": "streaming"}}, config={"allow_fallback": True})
    assert rt.policy.select("stream_io").chain == ("streaming", "legacy")


@pytest.mark.parametrize("where", ["cli", "env", "config"])
def test_unknown_plugin_name_is_an_error_with_a_suggestion(where):
    kwargs = {
        "cli": {"cli": {"pins": {"stream_io": "streeming"}}},
        "env": {"env": {"CONTENTDOWNLOAD_PLUGINS": "stream_io=streeming"}},
        "config": {"config": {"plugins": {"stream_io": "streeming"}}},
    }[where]
    with pytest.raises(UnknownPluginError) as info:
        runtime(**kwargs)
    assert "streeming" in str(info.value) and "did you mean 'streaming'" in str(info.value)
    assert "legacy" in str(info.value)


def test_unknown_hook_name_is_an_error():
    with pytest.raises(UsageError, match="did you mean 'stream_io'"):
        runtime(env={"CONTENTDOWNLOAD_PLUGINS": "stream_oi=streaming"})


def test_bad_env_value_is_an_error_naming_the_variable():
    with pytest.raises(UsageError, match="DOCSTOKG_ENABLE_STREAMING"):
        runtime(env={"DOCSTOKG_ENABLE_STREAMING": "maybe"})


def test_legacy_cannot_be_disabled():
    with pytest.raises(UsageError, match="cannot be disabled"):
        runtime(env={"CONTENTDOWNLOAD_DISABLE_PLUGINS": "legacy"})


def test_disabling_streaming_leaves_legacy_answering():
    rt = runtime(cli={"disable_plugins": ("streaming",)})
    assert rt.plugins.infos["streaming"].status == "disabled"
    assert all(v[0] == "legacy" for v in winners(rt).values())


def test_canary_splits_ten_thousand_keys_evenly_and_stably():
    rt = runtime(cli={"streaming_ratio": 0.5})
    keys = [f"{i:064x}" for i in range(10_000)]
    inside = [k for k in keys if rt.policy.plan(k)["stream_io"].winner == "streaming"]
    share = len(inside) / len(keys)
    assert 0.48 <= share <= 0.52, share
    # Every hook of a job is in the same bucket, and asking again gives the same answer.
    for key in keys[:500]:
        plan = rt.policy.plan(key)
        assert len({s.winner for s in plan.values()}) == 1
        assert {s.source for s in plan.values()} == {"canary"}
        assert rt.policy.plan(key)["finalize"].winner == plan["finalize"].winner
    # A second process puts the same keys in the same bucket.
    code = (
        "import sys; from contentdownload.jobs.keys import canary_fraction;"
        "keys=[f'{i:064x}' for i in range(10000)];"
        "print(''.join('1' if canary_fraction(k) < 0.5 else '0' for k in keys))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "".join("1" if k in set(inside) else "0" for k in keys)


def test_canary_respects_a_higher_rollback():
    rt = runtime(env={"DOCSTOKG_ENABLE_STREAMING": "0"}, config={"streaming_ratio": 1.0})
    assert all(rt.policy.plan("a" * 64)[h].winner == "legacy" for h in STREAMING_HOOKS)
    assert rt.policy.plan("a" * 64)["job_key"].source == "canary"


def test_canary_fraction_is_uniformish_and_deterministic():
    assert canary_fraction("x") == canary_fraction("x")
    assert 0.0 <= canary_fraction("y") < 1.0
