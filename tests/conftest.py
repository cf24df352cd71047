"""Shared fixtures. Fixtures for plugin authors live in ``contentdownload.testing``."""

from __future__ import annotations

import os
import sys

import pytest

from contentdownload.testing.server import LoopbackServer
from helpers import make_distribution

pytest_plugins = ("realservers",)  # real third-party servers (nginx) as fixtures


@pytest.fixture
def server(tmp_path):
    """A loopback HTTP server for one test, serving from ``tmp_path/served``."""
    with LoopbackServer(root=tmp_path / "served") as srv:
        yield srv


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    """Build distributions under ``tmp_path`` and put them on ``sys.path``, as installing them would."""

    def build(dist: str, plugins: dict[str, str], version: str = "1.0"):
        root = make_distribution(tmp_path / f"site-{dist}", dist, plugins, version)
        monkeypatch.syspath_prepend(str(root))
        return root

    yield build
    for module in [m for m in sys.modules if m.startswith(("acme", "broken", "dupe"))]:
        del sys.modules[module]


@pytest.fixture(autouse=True)
def _clean_flag_env(monkeypatch, tmp_path_factory):
    """Tests start with no selection flags from the developer's shell, and no user config file."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("user-config")))
    for key in list(os.environ):
        if key.startswith(("DOCSTOKG_", "CONTENTDOWNLOAD_")):
            monkeypatch.delenv(key)
