"""The documentation site builds without a warning, and the API it documents has a docstring for every public name."""

from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys

import pytest

from helpers import REPO

MODULES = ("contentdownload.testing", "contentdownload.testing.server", "contentdownload.testing.conformance",
           "contentdownload.testing.jobkeys", "contentdownload.testing.probe")


def _public(module):
    names = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
    return {name: getattr(module, name) for name in names}


def _undocumented(module):
    missing = []
    for name, obj in _public(module).items():
        if not (inspect.isclass(obj) or inspect.isfunction(obj)) or getattr(obj, "__module__", None) != module.__name__:
            continue
        if not inspect.getdoc(obj):
            missing.append(name)
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                function = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
                if attr.startswith("_") or not inspect.isfunction(function):
                    continue
                if not function.__doc__:
                    missing.append(f"{name}.{attr}")
    return missing


@pytest.mark.parametrize("name", MODULES)
def test_every_public_name_of_the_testing_api_has_a_docstring(name):
    module = importlib.import_module(name)
    assert module.__doc__
    assert _undocumented(module) == []


def test_the_docs_build_without_warnings(tmp_path):
    pytest.importorskip("sphinx", reason="sphinx comes with the test extra: pip install -e '.[test]'")
    pytest.importorskip("myst_parser", reason="myst-parser comes with the test extra: pip install -e '.[test]'")
    out = tmp_path / "html"
    done = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", "-d",
                           str(tmp_path / "doctrees"), str(REPO / "docs"), str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    reference = (out / "api" / "testing.html").read_text(encoding="utf-8")
    for documented in ("LoopbackServer.add_file", "Fault.cut_after", "run_conformance", "assert_conformance",
                       "JOB_KEY_CHECKS", "StreamProbe"):
        assert documented in reference, documented
    for page in ("architecture", "hooks", "config", "plugins", "many-machines"):
        assert (out / f"{page}.html").is_file(), page
