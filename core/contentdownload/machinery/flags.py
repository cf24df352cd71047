"""Flag layers: what the CLI, the environment and the config file each say.

Each source becomes one :class:`FlagLayer` in which every value is optional (``None``:
this source has no opinion). The policy reads the layers highest first
(cli > env > config); nothing else interprets them.
"""

from __future__ import annotations

import os
from typing import Mapping

import attrs

from contentdownload.errors import UsageError
from contentdownload.hooks.model import HOOKS
from contentdownload.machinery.suggest import did_you_mean

# The seed's env flags.
ENV_STREAMING = "DOCSTOKG_ENABLE_STREAMING"
ENV_IDEMPOTENCY = "DOCSTOKG_ENABLE_IDEMPOTENCY"
ENV_SCHEMA = "DOCSTOKG_ENABLE_STREAMING_SCHEMA"
ENV_INTEGRATION = "DOCSTOKG_ENABLE_STREAMING_INTEGRATION"
# The product's own.
ENV_STRICT = "CONTENTDOWNLOAD_STRICT_PLUGINS"
ENV_DISABLE = "CONTENTDOWNLOAD_DISABLE_PLUGINS"
ENV_PINS = "CONTENTDOWNLOAD_PLUGINS"
ENV_RATIO = "CONTENTDOWNLOAD_STREAMING_RATIO"

ENV_VARS = (ENV_INTEGRATION, ENV_STREAMING, ENV_IDEMPOTENCY, ENV_SCHEMA, ENV_RATIO, ENV_PINS, ENV_DISABLE, ENV_STRICT)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_bool(text: str, where: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise UsageError(f"{where} must be 1 or 0 (true/false), not {text!r}")


def parse_ratio(value: object, where: str) -> float:
    try:
        ratio = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise UsageError(f"{where} must be a number between 0 and 1, not {value!r}") from None
    if not 0.0 <= ratio <= 1.0:
        raise UsageError(f"{where} must be between 0 and 1, not {value!r}")
    return ratio


def parse_pin(text: str, where: str) -> tuple[str, str]:
    """``HOOK=NAME`` -> ``(hook, name)``; the hook name is checked here, the plugin name by the policy."""
    hook, sep, name = text.partition("=")
    hook, name = hook.strip(), name.strip()
    if not sep or not hook or not name:
        raise UsageError(f"{where} takes HOOK=NAME (for instance stream_io=streaming), not {text!r}")
    check_hook(hook, where)
    return hook, name


def check_hook(hook: str, where: str) -> None:
    if hook not in HOOKS:
        raise UsageError(f"unknown hook {hook!r} in {where}; hooks: {', '.join(HOOKS)}{did_you_mean(hook, HOOKS)}")


@attrs.frozen
class FlagLayer:
    """One source's opinion on plugin selection. ``None`` / empty: no opinion.

    ``origin`` maps each field set to where it came from (a flag, a variable or a file)
    so that ``plugins explain`` can name it.
    """

    source: str
    streaming_integration: bool | None = None
    streaming: bool | None = None
    idempotency: bool | None = None
    streaming_schema: bool | None = None
    streaming_ratio: float | None = None
    pins: Mapping[str, str] = attrs.field(factory=dict)
    allow_fallback: bool | None = None
    disable_plugins: tuple[str, ...] = ()
    strict_plugins: bool | None = None
    origin: Mapping[str, str] = attrs.field(factory=dict)

    def where(self, field: str) -> str:
        return self.origin.get(field, self.source)


def env_layer(environ: Mapping[str, str] | None = None) -> FlagLayer:
    """Read the env flags; a malformed value is a :class:`UsageError` naming the variable."""
    env = os.environ if environ is None else environ
    values: dict = {}
    origin: dict[str, str] = {}
    for field, var in (
        ("streaming_integration", ENV_INTEGRATION),
        ("streaming", ENV_STREAMING),
        ("idempotency", ENV_IDEMPOTENCY),
        ("streaming_schema", ENV_SCHEMA),
        ("strict_plugins", ENV_STRICT),
    ):
        raw = env.get(var, "").strip()
        if raw:
            values[field] = parse_bool(raw, var)
            origin[field] = f"{var}={raw}"
    if env.get(ENV_RATIO, "").strip():
        values["streaming_ratio"] = parse_ratio(env[ENV_RATIO], ENV_RATIO)
        origin["streaming_ratio"] = f"{ENV_RATIO}={env[ENV_RATIO].strip()}"
    pins: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in env.get(ENV_PINS, "").split(","))):
        hook, name = parse_pin(item, ENV_PINS)
        pins[hook] = name
        origin[f"pin:{hook}"] = f"{ENV_PINS}={item}"
    disable = tuple(filter(None, (p.strip() for p in env.get(ENV_DISABLE, "").split(","))))
    if disable:
        origin["disable_plugins"] = ENV_DISABLE
    return FlagLayer(source="env", pins=pins, disable_plugins=disable, origin=origin, **values)
