"""What a run counts of its job results, in memory that does not grow with the results kept whole.

A :class:`Tally` takes every :class:`~contentdownload.hooks.model.JobResult` of a run
and keeps what ``manifest.metrics.json`` and the summary need: counts per outcome and
failure reason, bytes, decisions, revalidations, the plugins that answered, and each
job's latency (8 bytes a job, so the quantiles stay exact). Whole results are kept only
for the first :data:`KEEP_FAILED` failures and the first :data:`KEEP_OTHERS` results of
any other outcome (what ``contentdownload get`` and the demo print); the rest are
counted in ``dropped``. Tallies merge, so a worker process sends its tally to the
parent instead of its results.
"""

from __future__ import annotations

from array import array
from collections import Counter
from typing import Iterable

import attrs

from contentdownload.hooks.model import JobResult

#: Failed results kept whole (the rest are counted in :attr:`Tally.dropped`).
KEEP_FAILED = 1000
#: Results of other outcomes kept whole: the first ones of the run.
KEEP_OTHERS = 100
#: Decision modes that send a conditional request.
CONDITIONAL_MODES = frozenset({"resume", "revalidate"})


@attrs.define
class Tally:
    """Counts of a run's results (see the module); ``add`` one result, ``merge`` another tally."""

    jobs: int = 0
    outcomes: Counter = attrs.field(factory=Counter)
    failures: Counter = attrs.field(factory=Counter)  # failure reason -> failed jobs
    bytes_downloaded: int = 0
    sizes: int = 0  # sum of the results' file sizes (the progress display's done bytes)
    decisions: int = 0
    conditional: int = 0
    revalidations: int = 0
    answered_304: int = 0
    not_modified_as_errors: int = 0
    plugins: Counter = attrs.field(factory=Counter)  # "hook=plugin" -> jobs it answered
    latencies: array = attrs.field(factory=lambda: array("d"))  # elapsed_ms of every job not skipped
    kept_failed: list = attrs.field(factory=list)
    kept_others: list = attrs.field(factory=list)
    dropped: int = 0
    kept_before: tuple = (0, 0)  # (failed, others) kept by the tallies taken from this one: they count against the limits

    def add(self, result: JobResult) -> None:
        failed = result.outcome == "failed"
        self.jobs += 1
        self.outcomes[result.outcome] += 1
        self.bytes_downloaded += result.bytes_downloaded
        self.sizes += result.size or 0
        self.decisions += len(result.decisions)
        self.conditional += sum(1 for d in result.decisions if d in CONDITIONAL_MODES)
        if "revalidate" in result.decisions:
            self.revalidations += 1
            self.answered_304 += result.outcome == "not_modified"
        if failed:
            self.failures[result.reason] += 1
            self.not_modified_as_errors += result.http_status == 304
        self.plugins.update(f"{hook}={plugin}" for hook, plugin in result.plugins.items() if plugin)
        if result.outcome != "skipped":
            self.latencies.append(result.elapsed_ms)
        self._keep(result, failed)

    def add_all(self, results: Iterable[JobResult]) -> None:
        for result in results:
            self.add(result)

    def _keep(self, result: JobResult, failed: bool) -> None:
        kept, limit = (self.kept_failed, KEEP_FAILED) if failed else (self.kept_others, KEEP_OTHERS)
        if len(kept) + self.kept_before[0 if failed else 1] < limit:
            kept.append(result)
        else:
            self.dropped += 1

    def merge(self, other: "Tally") -> None:
        """Add ``other``'s counts (a worker process's) to these; its kept results too, within the limits."""
        for name in ("jobs", "bytes_downloaded", "sizes", "decisions", "conditional", "revalidations", "answered_304",
                     "not_modified_as_errors", "dropped"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.outcomes.update(other.outcomes)
        self.failures.update(other.failures)
        self.plugins.update(other.plugins)
        self.latencies.extend(other.latencies)
        for kept, limit, more in ((self.kept_failed, KEEP_FAILED, other.kept_failed), (self.kept_others, KEEP_OTHERS, other.kept_others)):
            room = max(0, limit - len(kept))
            kept.extend(more[:room])
            self.dropped += max(0, len(more) - room)

    def take(self) -> "Tally":
        """These counts, leaving this tally empty (what a worker process sends since its last report)."""
        taken = attrs.evolve(self, kept_before=(0, 0))
        before = (self.kept_before[0] + len(self.kept_failed), self.kept_before[1] + len(self.kept_others))
        self.__init__(kept_before=before)  # type: ignore[misc]
        return taken

    @property
    def failed(self) -> int:
        return self.outcomes["failed"]

    @property
    def results(self) -> list[JobResult]:
        """The results kept whole: the failed ones first, then the others, each in completion order."""
        return [*self.kept_failed, *self.kept_others]

    def latency_ms(self, q: float) -> float | None:
        """The ``q`` quantile of the latencies (nearest rank, as the metrics always computed it), rounded to µs."""
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
        return round(ordered[index], 3)
