"""Configuration where users look: user file, project file, --config, CONTENTDOWNLOAD_<KEY>, flags."""

from __future__ import annotations

import json

from helpers import run_cli


def _config(tmp_path, *args, env=None):
    home = tmp_path / "xdg"
    proc = run_cli("config", "--json", *args, cwd=tmp_path / "project", env={"XDG_CONFIG_HOME": str(home), "HOME": str(tmp_path), **(env or {})})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_layers_in_order_with_each_source_named(tmp_path):
    user = tmp_path / "xdg" / "contentdownload" / "config.toml"
    user.parent.mkdir(parents=True)
    user.write_text('[run]\nworkers = 2\nretries = 1\ntimeout = 5\nuser_agent = "from-user"\nheaders = ["Authorization: Bearer hunter2"]\n')
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "contentdownload.toml").write_text("[run]\nretries = 2\ntimeout = 6\nper_host = 3\n")
    explicit = tmp_path / "explicit.toml"
    explicit.write_text("[run]\ntimeout = 7\nconnect_timeout = 3\n")
    report = _config(tmp_path, "--config", str(explicit), env={"CONTENTDOWNLOAD_PER_HOST": "9", "CONTENTDOWNLOAD_REVALIDATE": "true"})
    s = report["settings"]
    assert (s["workers"]["value"], s["workers"]["source"]) == (2, str(user))
    assert (s["retries"]["value"], s["retries"]["source"]) == (2, str(tmp_path / "project" / "contentdownload.toml"))
    assert (s["timeout"]["value"], s["timeout"]["source"]) == (7, str(explicit))
    assert (s["per_host"]["value"], s["per_host"]["source"]) == (9, "CONTENTDOWNLOAD_PER_HOST")
    assert s["revalidate"] == {"value": True, "source": "CONTENTDOWNLOAD_REVALIDATE"}
    assert s["lease_ttl"]["source"] == "default"
    assert s["headers"]["value"] == ["Authorization: ***"]  # never a secret in an output
    assert report["config_files"] == [str(user), str(tmp_path / "project" / "contentdownload.toml"), str(explicit)]


def test_flags_beat_env_and_the_table_form(tmp_path):
    (tmp_path / "project").mkdir()
    home = {"XDG_CONFIG_HOME": str(tmp_path / "xdg"), "CONTENTDOWNLOAD_USER_AGENT": "env-agent"}
    proc = run_cli("config", cwd=tmp_path / "project", env=home)
    assert proc.returncode == 0, proc.stderr
    line = next(l for l in proc.stdout.splitlines() if l.startswith("user_agent"))
    assert '"env-agent"' in line and "CONTENTDOWNLOAD_USER_AGENT" in line
    assert "config files read: (none)" in proc.stdout


def test_bad_env_value_and_bad_user_file_are_one_line_exit_2(tmp_path):
    (tmp_path / "project").mkdir()
    env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg"), "CONTENTDOWNLOAD_WORKERS": "0"}
    proc = run_cli("config", cwd=tmp_path / "project", env=env)
    assert proc.returncode == 2 and proc.stderr.strip() == "contentdownload: error: CONTENTDOWNLOAD_WORKERS must be greater than 0, not 0"
    user = tmp_path / "xdg" / "contentdownload" / "config.toml"
    user.parent.mkdir(parents=True)
    user.write_text("[run]\nworkerz = 3\n")
    proc = run_cli("config", cwd=tmp_path / "project", env={"XDG_CONFIG_HOME": str(tmp_path / "xdg")})
    assert proc.returncode == 2 and str(user) in proc.stderr and "did you mean 'workers'" in proc.stderr


def test_run_uses_the_user_file(server, tmp_path):
    url = server.add_file("/u.pdf", b"user file agent")
    user = tmp_path / "xdg" / "contentdownload" / "config.toml"
    user.parent.mkdir(parents=True)
    user.write_text('[run]\nuser_agent = "configured/2"\nheaders = ["X-From: user-file"]\n')
    (tmp_path / "project").mkdir()
    proc = run_cli("run", url, "-P", str(tmp_path / "out"), "-q", cwd=tmp_path / "project", env={"XDG_CONFIG_HOME": str(tmp_path / "xdg")})
    assert proc.returncode == 0, proc.stderr
    record = next(r for r in server.requests if r.path == "/u.pdf")
    assert record.headers["User-Agent"] == "configured/2" and record.headers["X-From"] == "user-file"
