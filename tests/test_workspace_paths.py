"""A job's final path: inside the output folder, never inside the product's own folder, whatever the relative path says."""

from __future__ import annotations

from pathlib import Path

import pytest

from contentdownload.errors import UsageError
from contentdownload.jobs.workspace import Workspace

ALLOWED = ["a.pdf", "x/y/z.bin", "./a.pdf", "x//y.bin", "x/./y.bin", "x/../y.bin", ".contentdownloadX/a", "..a", "a..",
           ".contentdownload.pdf", "x/.contentdownload/a"]
REFUSED_OUTSIDE = ["../a.pdf", "x/../../a.pdf", "/etc/passwd", "", ".", "x/..", "../out/../../a"]
REFUSED_HIDDEN = [".contentdownload", ".contentdownload/jobs.db", "x/../.contentdownload/a", "./.contentdownload/staging/k.part"]


@pytest.fixture
def ws(tmp_path) -> Workspace:
    return Workspace.open(tmp_path / "out")


@pytest.mark.parametrize("relative", ALLOWED)
def test_a_path_inside_the_output_folder_is_kept(ws, relative):
    final = ws.final_path(relative)
    assert ws.out in final.parents and ws.hidden not in (final, *final.parents)
    assert final == Path(ws.out, relative).resolve()


@pytest.mark.parametrize("relative", REFUSED_OUTSIDE)
def test_a_path_outside_the_output_folder_is_refused(ws, relative):
    with pytest.raises(UsageError, match="outside the output folder"):
        ws.final_path(relative)


@pytest.mark.parametrize("relative", REFUSED_HIDDEN)
def test_a_path_inside_the_product_s_folder_is_refused(ws, relative):
    with pytest.raises(UsageError, match="product's own folder"):
        ws.final_path(relative)
