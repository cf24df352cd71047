"""A job's states and the one table of legal transitions between them.

Every backend checks a move against :data:`TRANSITIONS` before making it, and the SQL
backends also keep a copy of the table in the database (``job_transitions``) with a
trigger that refuses any other ``UPDATE`` of a job's state, so a bug, or a hand-written
query, cannot move a job where this table says it cannot go.
"""

from __future__ import annotations

import enum
from typing import Iterator

from contentdownload.errors import IllegalTransition


class JobState(str, enum.Enum):
    PLANNED = "planned"
    LEASED = "leased"
    STREAMING = "streaming"
    FINALIZED = "finalized"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


P, L, S, F, X = JobState.PLANNED, JobState.LEASED, JobState.STREAMING, JobState.FINALIZED, JobState.FAILED

#: from-state -> the states a job in it may move to.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    P: frozenset({L}),                # claimed
    L: frozenset({L, S, F, X, P}),    # taken over after expiry / streaming / finished / failed / released or retried
    S: frozenset({L, F, X, P}),       # taken over after expiry / finished / failed / released or retried
    X: frozenset({P}),                # re-queued
    F: frozenset({P}),                # reopened: the file is gone, or revalidation was asked for
}

#: States whose jobs a worker holds (a lease exists).
HELD = frozenset({L, S})


def is_allowed(old: JobState | str, new: JobState | str) -> bool:
    return JobState(new) in TRANSITIONS.get(JobState(old), frozenset())


def check_transition(old: JobState | str, new: JobState | str) -> None:
    """Raise :class:`IllegalTransition` unless the table allows ``old -> new``."""
    if not is_allowed(old, new):
        raise IllegalTransition(f"illegal job transition: {JobState(old).value} -> {JobState(new).value}")


def pairs() -> Iterator[tuple[str, str]]:
    """Every allowed ``(from, to)`` pair as strings, in a stable order (the rows of ``job_transitions``)."""
    for old in JobState:
        for new in JobState:
            if new in TRANSITIONS.get(old, frozenset()):
                yield old.value, new.value
