"""Closest-match suggestions for misspelt names in error messages."""

from __future__ import annotations

from typing import Iterable


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The choice most like ``name``, or ``None`` when nothing is close."""
    import difflib  # only an error message needs it; a run that goes well never pays its import

    matches = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return matches[0] if matches else None


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` or an empty string."""
    hint = closest(name, choices)
    return f"; did you mean {hint!r}?" if hint else ""
