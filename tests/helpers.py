"""Helpers shared by the test modules (import as ``from helpers import ...``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_distribution(root: Path, dist: str, plugins: dict[str, str], version: str = "1.0") -> Path:
    """Write a real installed distribution (``*.dist-info`` with entry points) under ``root``.

    ``plugins`` maps an entry-point name to the source of its module; each module is
    written as ``<dist>_<name>.py`` and registered in group ``contentdownload``.
    """
    root.mkdir(parents=True, exist_ok=True)
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = ["[contentdownload]"]
    for name, source in plugins.items():
        module = f"{dist.replace('-', '_')}_{name}"
        (root / f"{module}.py").write_text(textwrap.dedent(source))
        lines.append(f"{name} = {module}")
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return root


def cli_env(extra: dict | None = None) -> dict:
    """The environment of a CLI subprocess: this one without selection flags, ``PYTHONPATH`` made absolute, plus ``extra``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DOCSTOKG_", "CONTENTDOWNLOAD_"))}
    if base.get("PYTHONPATH"):  # absolute, so that a test's own cwd still imports this checkout
        base["PYTHONPATH"] = os.pathsep.join(str(Path(p).resolve()) for p in base["PYTHONPATH"].split(os.pathsep) if p)
    base.update(extra or {})
    return base


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None, input: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m contentdownload`` in a subprocess with a clean flag environment."""
    return subprocess.run(
        [sys.executable, "-m", "contentdownload", *args],
        env=cli_env(env),
        cwd=cwd,
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


_EXAMPLE = re.compile(r"^```python\n# (?P<path>[\w/]+\.py)\n(?P<code>.*?)^```", re.M | re.S)


def docs_examples(page: str = "plugins.md") -> dict[str, str]:
    """The Python examples of ``docs/<page>`` that open with a file name comment, by that file name.

    Tests run the documentation's own code, so the page and the tests cannot drift apart.
    """
    text = (REPO / "docs" / page).read_text(encoding="utf-8")
    return {m["path"]: m["code"] for m in _EXAMPLE.finditer(text)}
