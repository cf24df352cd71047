"""Dispatch: ask the plugins of a selection's chain, one at a time, in order.

Each plugin is asked through pluggy's caller for that plugin alone
(:meth:`PluginSet.caller`), so hook wrappers and pluggy's monitoring see every call.
``None`` means declined: the next plugin is asked. An exception is a plugin fault:
logged with "falling back", counted, and the next plugin is asked where the stage says
that is safe (:func:`fallback_safe`). :data:`~contentdownload.errors.NOT_PLUGIN_FAULTS`
(a job abort, the job store failing or away, a full or read-only disk) are not faults and
propagate at once; an ``OSError`` of a full or read-only disk raised by a plugin is
raised as the :class:`~contentdownload.errors.DiskError` it stands for.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any, Awaitable, Callable

import attrs

from contentdownload.errors import NOT_PLUGIN_FAULTS, ContentDownloadError, DiskError, NoPluginAnsweredError
from contentdownload.machinery.loader import PluginSet
from contentdownload.records.log import get_logger
from contentdownload.hooks.model import ASYNC_HOOKS, HOOK_RESULT_TYPES
from contentdownload.machinery.policy import Selection
from contentdownload.machinery.telemetry import Telemetry

log = get_logger(__name__)

#: The asynchronous form of each stage that has one.
ASYNC_FORMS: dict[str, str] = {stage: form for form, stage in ASYNC_HOOKS.items()}


class StageFailed(ContentDownloadError, RuntimeError):
    """A plugin raised where falling back is no longer safe (bytes written, or the part renamed).

    ``hook``, ``plugin`` and ``error`` say what failed; ``effects`` what it had done.
    """

    def __init__(self, hook: str, plugin: str, error: BaseException, effects: Any):
        self.hook, self.plugin, self.error, self.effects = hook, plugin, error, effects
        super().__init__(f"plugin {plugin!r} failed in {hook} after changing the disk: {type(error).__name__}: {error}")


@attrs.frozen
class Answer:
    """A hook's answer: the result, the plugin that gave it and whether it was a fallback."""

    result: Any
    plugin: str
    fallback: bool


def fallback_safe(hook: str, ctx: Any) -> bool:
    """Whether another plugin may still be asked after one raised.

    ``job_key`` and ``resume_decision``: always. ``stream_io``: only while no body
    byte was written. ``finalize``: only before the rename.
    """
    if hook == "stream_io":
        return ctx.effects.bytes_written == 0
    if hook == "finalize":
        return not ctx.effects.renamed
    return True


class Dispatcher:
    """Calls hooks along selections, recording telemetry."""

    def __init__(self, plugins: PluginSet, telemetry: Telemetry | None = None):
        self.plugins = plugins
        self.telemetry = telemetry or Telemetry()
        self._sync_calls: dict[tuple[str, str], Callable[..., Awaitable[Any]] | None] = {}

    def call(self, selection: Selection, ctx: Any) -> Answer:
        """Ask ``selection.chain`` in order; return the first answer or raise :class:`NoPluginAnsweredError`."""
        asking = self._ask(selection, ctx, partial(self._sync_call, selection.hook))
        try:
            asking.send(None)  # synchronous plugins never suspend it: it runs to its answer here
        except StopIteration as answered:
            return answered.value
        asking.close()
        raise RuntimeError(f"a synchronous call of {selection.hook} was suspended")

    async def call_async(self, selection: Selection, ctx: Any, *,
                         to_thread: Callable[[Callable[[Any], Any], Any], Awaitable[Any]]) -> Answer:
        """:meth:`call` on the running event loop for a stage with an asynchronous form (``stream_io``, ``finalize``),
        with the same fallbacks and telemetry.

        Each plugin of the chain in order: its asynchronous form (``stream_io_async``,
        ``finalize_async``) awaited when it returns an awaitable; otherwise (``None``, or no
        such hook), or when the awaitable ends with ``None`` having changed nothing (no body
        byte written, nothing renamed), its synchronous hook through ``await to_thread(fn, ctx)``
        (the caller's executor).
        """
        form = ASYNC_FORMS.get(selection.hook)
        if form is None:
            raise ValueError(f"{selection.hook} has no asynchronous form: use call")
        return await self._ask(selection, ctx, lambda name: self._async_call(selection.hook, form, name, to_thread))

    def _sync_call(self, hook: str, name: str) -> Callable[..., Awaitable[Any]] | None:
        """Plugin ``name``'s pluggy caller for ``hook`` as a coroutine function (``None``: it does not implement the hook)."""
        key = (hook, name)
        if key not in self._sync_calls:
            caller = self.plugins.caller(hook, name)
            self._sync_calls[key] = None if caller is None else _as_coroutine(caller)
        return self._sync_calls[key]

    def _async_call(self, hook: str, form: str, name: str,
                    to_thread: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]] | None:
        """How plugin ``name`` carries out ``hook`` on the event loop (``None``: it implements neither form)."""
        asynchronous = self.plugins.caller(form, name)
        synchronous = self.plugins.caller(hook, name)
        if asynchronous is None and synchronous is None:
            return None

        async def call(ctx: Any) -> Any:
            awaitable = asynchronous(ctx=ctx) if asynchronous is not None else None
            result = await awaitable if awaitable is not None else None
            if result is not None or synchronous is None or not fallback_safe(hook, ctx):
                return result
            return await to_thread(lambda c: synchronous(ctx=c), ctx)  # declined, or handed over having changed nothing

        return call

    async def _ask(self, selection: Selection, ctx: Any, caller_of: Callable[[str], Any]) -> Answer:
        """Ask the chain: each plugin's call (from ``caller_of(name)``, a coroutine function) awaited in turn."""
        hook = selection.hook
        expected = HOOK_RESULT_TYPES[hook]
        attempts: list[tuple[str, str]] = []
        record = self.telemetry.record
        for position, name in enumerate(selection.chain):
            caller = caller_of(name)
            if caller is None:
                attempts.append((name, "does not implement the hook"))
                continue
            started = time.perf_counter_ns()
            try:
                result = await caller(ctx)
            except NOT_PLUGIN_FAULTS:
                record(hook, name, "error", time.perf_counter_ns() - started)
                raise
            except Exception as exc:
                record(hook, name, "error", time.perf_counter_ns() - started)
                disk = DiskError.of(exc)
                if disk is not None:  # no other plugin could write to this disk either
                    raise disk from exc
                if not fallback_safe(hook, ctx):
                    log.error("hook failed after changing the disk, not falling back", hook=hook, plugin=name, error=repr(exc))
                    raise StageFailed(hook, name, exc, getattr(ctx, "effects", None)) from exc
                following = selection.chain[position + 1 :]
                log.warning(
                    f"plugin {name} raised in {hook}, falling back" + (f" to {following[0]}" if following else " (no plugin left)"),
                    hook=hook,
                    plugin=name,
                    error=f"{type(exc).__name__}: {exc}",
                    exc_info=True,
                )
                attempts.append((name, f"raised {type(exc).__name__}: {exc}"))
                continue
            if result is None:
                record(hook, name, "declined", time.perf_counter_ns() - started)
                attempts.append((name, "declined"))
                continue
            if not isinstance(result, expected):
                record(hook, name, "error", time.perf_counter_ns() - started)
                if not fallback_safe(hook, ctx):
                    error = TypeError(f"returned {type(result).__name__}, not {expected.__name__}")
                    raise StageFailed(hook, name, error, getattr(ctx, "effects", None))
                log.warning(
                    f"plugin {name} returned {type(result).__name__} from {hook}, not {expected.__name__}; falling back",
                    hook=hook,
                    plugin=name,
                )
                attempts.append((name, f"returned {type(result).__name__}, not {expected.__name__}"))
                continue
            record(hook, name, "answered", time.perf_counter_ns() - started, fallback=position > 0)
            return Answer(result, name, position > 0)
        raise NoPluginAnsweredError(hook, attempts)


def _as_coroutine(caller: Callable[..., Any]) -> Callable[[Any], Awaitable[Any]]:
    async def call(ctx: Any) -> Any:
        return caller(ctx=ctx)

    return call
