"""Counters and latencies of every hook call, per hook and per plugin.

The dispatcher records each call; the runner writes :meth:`Telemetry.snapshot` and the
seed's flat keys, per plugin (:meth:`Telemetry.seed_metrics`), into
``manifest.metrics.json``.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Mapping

import attrs

from contentdownload.hooks.model import HOOKS

# Name stems of the seed's metric keys (``streaming.resume_decisions_made`` ...).
_PLURAL = {"job_key": "job_keys", "resume_decision": "resume_decisions", "stream_io": "stream_transfers", "finalize": "finalizations"}
_SHORT = {"job_key": "job_key", "resume_decision": "decision", "stream_io": "stream_io", "finalize": "finalize"}


@attrs.define
class HookStats:
    """Counts for one (hook, plugin) pair, or for a hook over all its plugins."""

    calls: int = 0
    answered: int = 0
    declined: int = 0
    errors: int = 0
    fallbacks: int = 0
    latency_ns: int = 0

    def as_dict(self) -> dict:
        mean = self.latency_ns / self.calls / 1e6 if self.calls else 0.0
        return {
            "calls": self.calls,
            "answered": self.answered,
            "declined": self.declined,
            "errors": self.errors,
            "fallbacks": self.fallbacks,
            "average_latency_ms": round(mean, 4),
        }


class Telemetry:
    """Thread-safe per-hook, per-plugin counters."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._per_plugin: dict[tuple[str, str], HookStats] = defaultdict(HookStats)
        self._per_hook: dict[str, HookStats] = defaultdict(HookStats)

    def record(self, hook: str, plugin: str, outcome: str, latency_ns: int, fallback: bool = False) -> None:
        """Count one call; ``outcome`` is ``answered``, ``declined`` or ``error``."""
        with self._lock:
            for stats in (self._per_plugin[(hook, plugin)], self._per_hook[hook]):
                stats.calls += 1
                stats.latency_ns += latency_ns
                if outcome == "answered":
                    stats.answered += 1
                    stats.fallbacks += fallback
                elif outcome == "declined":
                    stats.declined += 1
                else:
                    stats.errors += 1

    def state(self) -> dict[tuple[str, str], tuple[int, ...]]:
        """The raw counters per (hook, plugin), for another process to :meth:`merge`."""
        with self._lock:
            return {pair: attrs.astuple(stats) for pair, stats in self._per_plugin.items()}

    def merge(self, state: Mapping[tuple[str, str], tuple[int, ...]], minus: Mapping[tuple[str, str], tuple[int, ...]] | None = None) -> None:
        """Add another process's counters (``state`` less what it had already counted, ``minus``)."""
        with self._lock:
            for (hook, plugin), values in state.items():
                before = (minus or {}).get((hook, plugin), (0,) * len(values))
                delta = [v - b for v, b in zip(values, before)]
                for stats in (self._per_plugin[(hook, plugin)], self._per_hook[hook]):
                    for field, d in zip(attrs.fields(HookStats), delta):
                        setattr(stats, field.name, getattr(stats, field.name) + d)

    def snapshot(self) -> dict:
        """``{hook: {"total": {...}, "plugins": {name: {...}}}}`` for every hook."""
        with self._lock:
            out: dict = {}
            for hook in HOOKS:
                plugins = {p: s.as_dict() for (h, p), s in sorted(self._per_plugin.items()) if h == hook}
                out[hook] = {"total": self._per_hook[hook].as_dict(), "plugins": plugins}
            return out

    def seed_metrics(self) -> dict:
        """The seed's flat keys per plugin that was called, e.g. ``streaming.resume_decisions_made``.

        Keys are named after the plugin (``legacy.resume_decisions_made`` for a legacy
        run), so a run never reports ``streaming.*`` counts the streaming plugin did not make.
        """
        out: dict = {}
        with self._lock:
            for (hook, plugin), stats in sorted(self._per_plugin.items()):
                mean = stats.latency_ns / stats.calls / 1e6 if stats.calls else 0.0
                out[f"{plugin}.{_PLURAL[hook]}_made"] = stats.answered
                out[f"{plugin}.{_PLURAL[hook]}_fallback"] = stats.fallbacks
                out[f"{plugin}.{hook}_errors"] = stats.errors
                out[f"{plugin}.average_{_SHORT[hook]}_latency_ms"] = round(mean, 4)
        return out
