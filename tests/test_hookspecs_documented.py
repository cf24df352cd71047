"""Every hook and every field a plugin sees or returns is documented."""

from __future__ import annotations

import inspect
from pathlib import Path

import attrs
import pytest

from contentdownload.hooks import specs as hookspecs
from contentdownload.hooks.model import ASYNC_HOOKS, HOOK_CONTEXT_TYPES, HOOK_RESULT_TYPES, HOOKS, Effects, Job, JobKey, JobResult, PriorRecord, StagePaths, TransferOptions

DOCS = Path(__file__).resolve().parents[1] / "docs"
DOCUMENTED_TYPES = [*HOOK_CONTEXT_TYPES.values(), *HOOK_RESULT_TYPES.values(), Job, JobKey, JobResult, PriorRecord, StagePaths, TransferOptions, Effects]


@pytest.mark.parametrize("hook", [*HOOKS, *ASYNC_HOOKS])
def test_hookspec_docstring_covers_the_contract(hook):
    doc = inspect.getdoc(getattr(hookspecs, hook)) or ""
    for part in ("Receives:", "Returns:", "``None``:", "May not:"):
        assert part in doc, f"hook {hook} does not document {part!r}"
    assert getattr(getattr(hookspecs, hook), "contentdownload_spec")["firstresult"] is True


@pytest.mark.parametrize("cls", DOCUMENTED_TYPES, ids=lambda c: c.__name__)
def test_every_field_is_documented_in_its_class(cls):
    doc = inspect.getdoc(cls) or ""
    missing = [f.name for f in attrs.fields(cls) if not f.name.startswith("_") and f"``{f.name}``" not in doc]
    assert not missing, f"{cls.__name__} does not document fields {missing}"


@pytest.mark.parametrize("cls", DOCUMENTED_TYPES, ids=lambda c: c.__name__)
def test_classes_are_frozen_except_effects(cls):
    frozen = cls.__setattr__ is not object.__setattr__
    assert frozen or cls is Effects


def test_hook_reference_page_lists_every_hook_and_field():
    text = (DOCS / "hooks.md").read_text()
    for hook in (*HOOKS, *ASYNC_HOOKS):
        assert f"`{hook}`" in text
    for cls in DOCUMENTED_TYPES:
        assert f"`{cls.__name__}`" in text, cls.__name__
        for field in attrs.fields(cls):
            if not field.name.startswith("_"):
                assert f"`{field.name}`" in text, f"{cls.__name__}.{field.name} missing from docs/hooks.md"
