"""What a plain run imports: nothing only an error message, a terminal or a rare URL needs.

Every module imported is start-up time a run of one small file pays in full (the interpreter
imports it before the first request). These are imported only where they are used.
"""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import cli_env

PROGRAM = """
import atexit, json, runpy, sys
listing = sys.argv[1]
atexit.register(lambda: open(listing, "w").write(json.dumps(sorted(sys.modules))))
sys.argv = ["contentdownload", "run", sys.argv[2], "--out", sys.argv[3], "--no-progress"]
runpy.run_module("contentdownload", run_name="__main__")
"""

#: Imported only by what needs them: a terminal's live lines, the suggestion in an error
#: message, host names that are not plain ASCII, a server's structured digest field, and the
#: synchronous transport (``requests`` and urllib3, which the event-loop engine's run never
#: uses unless a proxy or a retry asks).
NOT_AT_START = ("tqdm", "difflib", "idna.uts46data", "http_sfv", "requests", "urllib3", "charset_normalizer")


def _modules_of_a_run(server, tmp_path) -> set[str]:
    server.add_file("/one.bin", b"x" * 1000)
    listing = tmp_path / "modules.json"
    done = subprocess.run([sys.executable, "-c", PROGRAM, str(listing), server.url("/one.bin"), str(tmp_path / "out")],
                          env=cli_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "one.bin").read_bytes() == b"x" * 1000
    return set(json.loads(listing.read_text()))


def test_a_run_of_one_file_imports_none_of_the_rarely_needed_modules(server, tmp_path):
    modules = _modules_of_a_run(server, tmp_path)
    assert "contentdownload.jobs.runner" in modules  # the listing is of a real run
    assert not modules.intersection(NOT_AT_START), sorted(modules.intersection(NOT_AT_START))
