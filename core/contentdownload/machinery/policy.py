"""The selection policy: per job and hook, the chain of plugins to ask and who decided.

This is the only module that makes selection choices. Sources, highest first:

1. ``cli``: ``--plugin HOOK=NAME``, ``--enable/--disable-streaming-integration``,
   ``--streaming-ratio``;
2. ``env``: ``DOCSTOKG_ENABLE_*`` flags, ``CONTENTDOWNLOAD_PLUGINS``,
   ``CONTENTDOWNLOAD_STREAMING_RATIO``;
3. ``config``: the config file;
4. ``canary``: a ratio set in any of those, when no higher source decided the hook;
5. ``default``: ``streaming`` everywhere (every flag enabled).

Within one source a pin beats the flags, a flag set to 0 beats a ratio, and a ratio
beats a flag set to 1 (enabling streaming while canarying it means "on for the canary
share"). The chain is the winner, then ``streaming`` when a third-party plugin won and
streaming is not switched off, then ``legacy``. A pinned hook's chain is the winner
alone unless ``allow_fallback`` is set.
"""

from __future__ import annotations

from typing import Sequence

import attrs

from contentdownload.errors import UnknownPluginError
from contentdownload.machinery.flags import FlagLayer
from contentdownload.jobs.keys import canary_fraction
from contentdownload.machinery.loader import LEGACY, STREAMING, PluginSet
from contentdownload.hooks.model import HOOKS

#: Which seed flag governs which hooks.
FLAG_OF_HOOK = {
    "job_key": "idempotency",
    "resume_decision": "streaming",
    "stream_io": "streaming",
    "finalize": "streaming",
}


@attrs.frozen
class Selection:
    """Who answers one hook for one job: ``chain[0]`` first, then the fallbacks in order."""

    hook: str
    chain: tuple[str, ...]
    source: str  # "cli", "env", "config", "canary" or "default"
    detail: str  # the flag, variable or file that decided
    pinned: bool = False

    @property
    def winner(self) -> str:
        return self.chain[0]

    def as_dict(self) -> dict:
        return {
            "hook": self.hook,
            "winner": self.winner,
            "chain": list(self.chain),
            "fallbacks": list(self.chain[1:]),
            "source": self.source,
            "detail": self.detail,
            "pinned": self.pinned,
        }


@attrs.frozen
class Feature:
    """A global switch (idempotency, the persistent store) and the source that set it."""

    enabled: bool
    source: str
    detail: str


@attrs.frozen
class _Opinion:
    winner: str | None  # None: canary
    source: str
    detail: str
    pinned: bool = False
    ratio: float | None = None


def _opinion(layer: FlagLayer, hook: str) -> _Opinion | None:
    """What one source says about one hook, or ``None``."""
    if hook in layer.pins:
        return _Opinion(layer.pins[hook], layer.source, layer.where(f"pin:{hook}"), pinned=True)
    flag = FLAG_OF_HOOK[hook]
    master, specific = layer.streaming_integration, getattr(layer, flag)
    if master is False:
        return _Opinion(LEGACY, layer.source, layer.where("streaming_integration"))
    if specific is False:
        return _Opinion(LEGACY, layer.source, layer.where(flag))
    if layer.streaming_ratio is not None:
        return _Opinion(None, "canary", layer.where("streaming_ratio"), ratio=layer.streaming_ratio)
    if specific is True:
        return _Opinion(STREAMING, layer.source, layer.where(flag))
    if master is True:
        return _Opinion(STREAMING, layer.source, layer.where("streaming_integration"))
    return None


def _feature(layers: Sequence[FlagLayer], flag: str) -> Feature:
    for layer in layers:
        if layer.streaming_integration is False:
            return Feature(False, layer.source, layer.where("streaming_integration"))
        value = getattr(layer, flag)
        if value is not None:
            return Feature(value, layer.source, layer.where(flag))
        if layer.streaming_integration is True:
            return Feature(True, layer.source, layer.where("streaming_integration"))
    return Feature(True, "default", "all features enabled by default")


class Policy:
    """Resolves selections from flag layers (highest first) over the loaded plugins.

    Everything that does not depend on the job is computed once here; a canaried hook
    costs one hash per job. Unknown plugin names in any layer raise
    :class:`UnknownPluginError` at construction, before any download.
    """

    def __init__(self, layers: Sequence[FlagLayer], plugins: PluginSet):
        self.layers = tuple(layers)
        self.plugins = plugins
        self.allow_fallback = next((l.allow_fallback for l in self.layers if l.allow_fallback is not None), False)
        self.idempotency = _feature(self.layers, "idempotency")
        self.streaming_schema = _feature(self.layers, "streaming_schema")
        self._check_names()
        self._static: dict[str, Selection] = {}
        self._canary: dict[str, tuple[float, Selection, Selection]] = {}
        for hook in HOOKS:
            opinion = next((o for o in (_opinion(l, hook) for l in self.layers) if o is not None), None)
            if opinion is None:
                self._static[hook] = self._select(hook, STREAMING, "default", "every flag enabled by default")
            elif opinion.winner is None:
                assert opinion.ratio is not None
                self._canary[hook] = (
                    opinion.ratio,
                    self._select(hook, STREAMING, "canary", f"{opinion.detail} (job in the streaming share)"),
                    self._select(hook, LEGACY, "canary", f"{opinion.detail} (job outside the streaming share)"),
                )
            else:
                self._static[hook] = self._select(hook, opinion.winner, opinion.source, opinion.detail, opinion.pinned)

    def _check_names(self) -> None:
        for layer in self.layers:
            for hook, name in layer.pins.items():
                self.plugins.check_name(name, layer.where(f"pin:{hook}"))
                if self.plugins.infos[name].status != "active":
                    info = self.plugins.infos[name]
                    raise UnknownPluginError(
                        f"plugin {name!r} named in {layer.where(f'pin:{hook}')} is {info.status}"
                        + (f" ({info.error})" if info.error else "")
                    )
                if not self.plugins.implements(name, hook):
                    raise UnknownPluginError(
                        f"plugin {name!r} named in {layer.where(f'pin:{hook}')} does not implement hook {hook!r}"
                    )

    def _select(self, hook: str, winner: str, source: str, detail: str, pinned: bool = False) -> Selection:
        usable = [n for n in self.plugins.active if self.plugins.implements(n, hook)]
        if winner not in usable:
            # The chosen plugin is disabled, failed to load or lacks the hook: say so, and fall to legacy.
            info = self.plugins.infos.get(winner)
            why = "not installed" if info is None else info.status if info.status != "active" else f"no {hook} hook"
            detail = f"{detail}; {winner!r} unavailable ({why}), legacy answers"
            winner, pinned = LEGACY, False
        chain = [winner]
        if not pinned or self.allow_fallback:
            if winner not in (STREAMING, LEGACY) and STREAMING in usable and self._streaming_allowed(hook):
                chain.append(STREAMING)
            if winner != LEGACY:
                chain.append(LEGACY)
        return Selection(hook, tuple(chain), source, detail, pinned)

    def _streaming_allowed(self, hook: str) -> bool:
        for layer in self.layers:
            if layer.streaming_integration is False or getattr(layer, FLAG_OF_HOOK[hook]) is False:
                return False
        return True

    def select(self, hook: str, canary_key: str | None = None) -> Selection:
        """The selection for ``hook``; ``canary_key`` (the job's identity key) places canaried jobs."""
        static = self._static.get(hook)
        if static is not None:
            return static
        return self.plan(canary_key)[hook]

    def plan(self, canary_key: str | None = None) -> dict[str, Selection]:
        """Selections for all four hooks of one job (one hash at most)."""
        if not self._canary:
            return dict(self._static)
        fraction = canary_fraction(canary_key) if canary_key is not None else None
        out: dict[str, Selection] = {}
        for hook in HOOKS:
            if hook in self._static:
                out[hook] = self._static[hook]
            else:
                ratio, inside, outside = self._canary[hook]
                in_share = ratio >= 1.0 if fraction is None else fraction < ratio
                out[hook] = inside if in_share else outside
        return out

    @property
    def canaried(self) -> bool:
        return bool(self._canary)
