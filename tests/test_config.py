"""The config file: locations, keys, types, and that every key has an effect."""

from __future__ import annotations

import pytest

from contentdownload.machinery.config import RUN_SCHEMA, RunSettings, load_config, parse_config, resolve_settings
from contentdownload.errors import ConfigError


def test_contentdownload_toml_in_working_folder(tmp_path):
    (tmp_path / "contentdownload.toml").write_text('streaming = false\n[run]\nworkers = 3\n[plugins]\njob_key = "legacy"\n')
    cfg = load_config(cwd=tmp_path)
    assert cfg.layer.streaming is False
    assert cfg.layer.pins == {"job_key": "legacy"}
    assert resolve_settings(cfg)[0].workers == 3


def test_pyproject_tool_section(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\nname="x"\n[tool.contentdownload]\nstreaming_ratio = 0.25\n')
    cfg = load_config(cwd=tmp_path)
    assert cfg.layer.streaming_ratio == 0.25
    assert "[tool.contentdownload]" in cfg.layer.where("streaming_ratio")


def test_explicit_file_wins_and_missing_file_is_an_error(tmp_path):
    other = tmp_path / "other.toml"
    other.write_text("idempotency = false\n")
    (tmp_path / "contentdownload.toml").write_text("idempotency = true\n")
    assert load_config(other, cwd=tmp_path).layer.idempotency is False
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    "text, message",
    [
        ("streamin = true\n", "unknown key streamin; did you mean 'streaming'"),
        ("streaming = 1\n", "streaming must be true/false"),
        ("[run]\nworkerz = 2\n", "unknown key run.workerz; did you mean 'workers'"),
        ("[run]\nworkers = 0\n", "run.workers must be greater than 0"),
        ('[run]\ntimeout = "fast"\n', "run.timeout must be an integer or a number"),
        ("streaming_ratio = 1.5\n", "streaming_ratio must be between 0 and 1"),
        ('[plugins]\nstream_oi = "streaming"\n', "unknown hook 'stream_oi'"),
        ("streaming = \n", "cannot read config"),
    ],
)
def test_bad_config_names_key_and_file(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_cli_overrides_config_run_values():
    cfg = parse_config({"run": {"workers": 2, "retries": 9}}, "c.toml")
    settings, origin = resolve_settings(cfg, {}, {"workers": 7, "retries": None})
    assert settings.workers == 7 and settings.retries == 9
    assert origin["workers"] == "--workers" and origin["retries"] == "c.toml" and origin["timeout"] == "default"


def test_schema_covers_every_run_setting():
    import attrs

    assert set(RUN_SCHEMA) == {f.name for f in attrs.fields(RunSettings)}
