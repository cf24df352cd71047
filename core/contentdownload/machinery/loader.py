"""Plugin discovery: entry points in group ``contentdownload``, loaded one by one.

A plugin that fails to import or fails pluggy's validation is recorded (name,
distribution, error), warned about and skipped; with strict loading it is fatal.
Plugins disabled by name are not imported. ``legacy`` cannot be disabled, so every
hook always has a last fallback.
"""

from __future__ import annotations

import importlib.metadata as metadata
import inspect
from typing import Any, Callable, Iterable, Mapping

import attrs
import pluggy

from contentdownload.hooks import specs as hookspecs
from contentdownload.errors import DuplicatePluginError, PluginLoadError, UsageError
from contentdownload.records.log import get_logger
from contentdownload.hooks.model import ASYNC_HOOKS, HOOKS
from contentdownload.machinery.suggest import closest

ENTRY_POINT_GROUP = "contentdownload"
LEGACY = "legacy"
STREAMING = "streaming"
BUILTINS = (LEGACY, STREAMING)

log = get_logger(__name__)


@attrs.frozen
class PluginInfo:
    """What ``plugins list`` shows for one plugin."""

    name: str
    distribution: str | None
    version: str | None
    status: str  # "active", "disabled", "skipped" (newer hook API) or "failed"
    hooks: tuple[str, ...] = ()
    error: str | None = None
    value: str | None = None  # the entry point's target, e.g. "pkg.module"

    @property
    def builtin(self) -> bool:
        return self.name in BUILTINS

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "status": self.status,
            "hooks": list(self.hooks),
            "error": self.error,
            "entry_point": self.value,
            "builtin": self.builtin,
        }


class PluginSkipped(Exception):
    """A plugin that declares a newer hook API than this host's: not registered."""


def _is_wrapper(impl: Any) -> bool:
    return bool(impl.wrapper or impl.hookwrapper)


def _check_hook_api(obj: object) -> None:
    """Raise :class:`PluginSkipped` when ``obj`` needs a newer hook API than :data:`HOOKSPEC_VERSION`."""
    needed = getattr(obj, "CONTENTDOWNLOAD_HOOKSPEC", 1)
    if not isinstance(needed, int) or isinstance(needed, bool) or needed < 1:
        raise PluginLoadError(f"CONTENTDOWNLOAD_HOOKSPEC must be a positive integer, not {needed!r}")
    if needed > hookspecs.HOOKSPEC_VERSION:
        raise PluginSkipped(f"needs hook API {needed}, this host has {hookspecs.HOOKSPEC_VERSION}")


def _check_impls(pm: pluggy.PluginManager, name: str) -> None:
    """Reject what the dispatcher cannot honour: two answers to one hook, or an answer that is not a plain function."""
    plugin = pm.get_plugin(name)
    for hook in (*HOOKS, *ASYNC_HOOKS):
        answers = [i for i in getattr(pm.hook, hook).get_hookimpls() if i.plugin is plugin and not _is_wrapper(i)]
        if len(answers) > 1:
            functions = ", ".join(i.function.__name__ for i in answers)
            raise PluginLoadError(f"{len(answers)} implementations of {hook} ({functions}, via specname); a plugin may have one")
        for impl in answers:
            fn = impl.function
            coroutine = inspect.iscoroutinefunction(fn) and hook not in ASYNC_HOOKS  # an asynchronous hook may be one
            if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn) or coroutine:
                raise PluginLoadError(
                    f"{impl.function.__name__} implements {hook} as a generator or coroutine without wrapper=True; "
                    f"a hook implementation must return its answer"
                )


class PluginSet:
    """The loaded plugins, their records and, per hook and plugin, a pluggy caller for that plugin alone.

    The caller of ``(hook, name)`` is pluggy's subset caller without the other plugins that
    answer ``hook``: plugins that only wrap it (``wrapper=True`` or ``hookwrapper=True``) stay,
    so hook wrappers, :meth:`pluggy.PluginManager.add_hookcall_monitoring` and tracing see the call.
    """

    def __init__(self, pm: pluggy.PluginManager, infos: Mapping[str, PluginInfo]):
        self.pm = pm
        self.infos: dict[str, PluginInfo] = dict(infos)
        self._callers: dict[tuple[str, str], Callable[..., Any]] = {}
        for hook in (*HOOKS, *ASYNC_HOOKS):
            answering = {i.plugin_name: i.plugin for i in getattr(pm.hook, hook).get_hookimpls() if not _is_wrapper(i)}
            for name in answering:
                others = [plugin for other, plugin in answering.items() if other != name]
                self._callers[(hook, name)] = pm.subset_hook_caller(hook, remove_plugins=others)

    def caller(self, hook: str, name: str) -> Callable[..., Any] | None:
        """The pluggy caller that asks plugin ``name`` alone for ``hook`` (call it with ``ctx=``)."""
        return self._callers.get((hook, name))

    def implements(self, name: str, hook: str) -> bool:
        """Whether ``name`` answers ``hook`` (a plugin that only wraps it does not)."""
        return (hook, name) in self._callers

    @property
    def active(self) -> list[str]:
        return [n for n, i in self.infos.items() if i.status == "active"]

    @property
    def failed(self) -> list[PluginInfo]:
        return [i for i in self.infos.values() if i.status == "failed"]

    def check_name(self, name: str, what: str) -> None:
        """Raise :class:`UnknownPluginError` when ``name`` is not an installed plugin."""
        from contentdownload.errors import UnknownPluginError

        if name in self.infos:
            return
        installed = ", ".join(sorted(self.infos)) or "(none)"
        hint = closest(name, self.infos)
        raise UnknownPluginError(
            f"unknown plugin {name!r} in {what}; installed: {installed}" + (f"; did you mean {hint!r}?" if hint else "")
        )


def _distribution_of(ep: metadata.EntryPoint) -> tuple[str | None, str | None]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None, None
    return dist.metadata["Name"], dist.version


def _discover() -> list[metadata.EntryPoint]:
    seen: dict[tuple[str, str, str | None], metadata.EntryPoint] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        seen.setdefault((ep.name, ep.value, _distribution_of(ep)[0]), ep)
    return list(seen.values())


def _hooks_of(pm: pluggy.PluginManager, name: str) -> tuple[str, ...]:
    plugin = pm.get_plugin(name)
    return tuple(h for h in (*HOOKS, *ASYNC_HOOKS) if any(i.plugin is plugin for i in getattr(pm.hook, h).get_hookimpls()))


def _register(pm: pluggy.PluginManager, name: str, load: Callable[[], object]) -> tuple[str, ...]:
    """Import and register one plugin; raise whatever went wrong, leaving ``pm`` clean."""
    obj = load()
    _check_hook_api(obj)
    pm.register(obj, name=name)
    try:
        pm.check_pending()
        _check_impls(pm, name)
    except Exception:
        pm.unregister(name=name)
        raise
    return _hooks_of(pm, name)


def load_plugins(
    disable: Iterable[str] = (),
    strict: bool = False,
    extra: Mapping[str, object] | None = None,
) -> PluginSet:
    """Discover, import and validate the plugins.

    ``disable``: plugin names not to load (``legacy`` cannot be disabled). ``strict``: a
    plugin that fails to load raises :class:`PluginLoadError` instead of being skipped.
    ``extra``: plugin objects to register directly, by name (for programs and tests).
    """
    disabled = set(disable)
    if LEGACY in disabled:
        raise UsageError("the 'legacy' plugin cannot be disabled: it is every hook's last fallback")
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    infos: dict[str, PluginInfo] = {}
    owners: dict[str, str | None] = {}

    sources: list[tuple[str, str | None, str | None, str | None, Callable[[], object]]] = []
    for ep in _discover():
        dist, version = _distribution_of(ep)
        sources.append((ep.name, dist, version, ep.value, ep.load))
    for name, obj in (extra or {}).items():
        sources.append((name, None, None, repr(obj), lambda obj=obj: obj))

    for name, dist, version, value, load in sources:
        if name in owners:
            raise DuplicatePluginError(
                f"two plugins are named {name!r}: from {owners[name] or 'a program'} and from {dist or 'a program'}; "
                f"uninstall one of the distributions"
            )
        owners[name] = dist
        if name in disabled:
            infos[name] = PluginInfo(name, dist, version, "disabled", value=value)
            continue
        try:
            hooks = _register(pm, name, load)
        except PluginSkipped as exc:
            log.warning("plugin needs a newer hook API, skipped", plugin=name, distribution=dist, reason=str(exc))
            infos[name] = PluginInfo(name, dist, version, "skipped", error=str(exc), value=value)
            continue
        except Exception as exc:  # a broken plugin must not break the host
            error = f"{type(exc).__name__}: {exc}"
            if strict:
                raise PluginLoadError(f"plugin {name!r} from {dist or 'a program'} failed to load: {error}") from exc
            log.warning("plugin failed to load, skipped", plugin=name, distribution=dist, error=error)
            infos[name] = PluginInfo(name, dist, version, "failed", error=error, value=value)
            continue
        infos[name] = PluginInfo(name, dist, version, "active", hooks=hooks, value=value)

    if LEGACY not in infos or infos[LEGACY].status != "active":
        detail = infos[LEGACY].error if LEGACY in infos else "not installed"
        raise PluginLoadError(f"the built-in 'legacy' plugin is unavailable ({detail}); reinstall contentdownload")
    unknown = disabled - set(infos)
    if unknown:
        name = sorted(unknown)[0]
        PluginSet(pm, infos).check_name(name, "the disabled plugins")
    return PluginSet(pm, infos)
