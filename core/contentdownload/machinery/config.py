"""The config file: ``contentdownload.toml``, ``[tool.contentdownload]`` in ``pyproject.toml``, or ``--config FILE``.

Layout::

    streaming_integration = true     # master switch (DOCSTOKG_ENABLE_STREAMING_INTEGRATION)
    streaming = true                 # resume_decision, stream_io, finalize (DOCSTOKG_ENABLE_STREAMING)
    idempotency = true               # job_key, leases, ledger (DOCSTOKG_ENABLE_IDEMPOTENCY)
    streaming_schema = true          # the persistent job store (DOCSTOKG_ENABLE_STREAMING_SCHEMA)
    streaming_ratio = 0.1            # canary share of jobs on streaming
    allow_fallback = false           # let pinned hooks fall back
    strict_plugins = false           # a plugin that fails to load is fatal
    disable_plugins = ["name"]

    [plugins]                        # pin a hook to a plugin
    stream_io = "streaming"

    [run]                            # defaults for `contentdownload run`; CLI flags override
    workers = 8

Unknown keys and values of the wrong type are errors naming the key and the file.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Mapping

import attrs

from contentdownload.errors import ConfigError, UsageError
from contentdownload.machinery.flags import FlagLayer, check_hook, parse_ratio
from contentdownload.machinery.suggest import did_you_mean

CONFIG_NAME = "contentdownload.toml"


@attrs.frozen
class RunSettings:
    """Settings of a run, from defaults, then the config file's ``[run]`` table, then CLI flags."""

    workers: int = 4
    per_host: int = 4
    retries: int = 5
    timeout: float = 60.0
    connect_timeout: float = 10.0
    max_bytes: int | None = None
    max_jobs: int | None = None
    db: str | None = None
    revalidate: bool = False
    retry_failed: bool = False
    chunk_size: int = 64 << 10
    lease_ttl: float = 60.0
    store_retry_s: float = 300.0
    backoff_factor: float = 0.5
    verify_tls: bool = True
    log_level: str = "INFO"
    progress: bool = True


# key -> (accepted types, check, description of the check)
_POSITIVE = (lambda v: v > 0, "must be greater than 0")
_NON_NEGATIVE = (lambda v: v >= 0, "must be 0 or more")
_ANY = (lambda v: True, "")
RUN_SCHEMA: dict[str, tuple[tuple[type, ...], tuple[Any, str]]] = {
    "workers": ((int,), _POSITIVE),
    "per_host": ((int,), _POSITIVE),
    "retries": ((int,), _NON_NEGATIVE),
    "timeout": ((int, float), _POSITIVE),
    "connect_timeout": ((int, float), _POSITIVE),
    "max_bytes": ((int,), _POSITIVE),
    "max_jobs": ((int,), _POSITIVE),
    "db": ((str,), _ANY),
    "revalidate": ((bool,), _ANY),
    "retry_failed": ((bool,), _ANY),
    "chunk_size": ((int,), (lambda v: v >= 4096, "must be at least 4096")),
    "lease_ttl": ((int, float), (lambda v: v >= 1, "must be at least 1 (seconds)")),
    "store_retry_s": ((int, float), _NON_NEGATIVE),
    "backoff_factor": ((int, float), _NON_NEGATIVE),
    "verify_tls": ((bool,), _ANY),
    "log_level": ((str,), (lambda v: v.upper() in {"DEBUG", "INFO", "WARNING", "ERROR"}, "must be DEBUG, INFO, WARNING or ERROR")),
    "progress": ((bool,), _ANY),
}
assert set(RUN_SCHEMA) == {f.name for f in attrs.fields(RunSettings)}

SELECTION_KEYS: dict[str, tuple[type, ...]] = {
    "streaming_integration": (bool,),
    "streaming": (bool,),
    "idempotency": (bool,),
    "streaming_schema": (bool,),
    "streaming_ratio": (int, float),
    "allow_fallback": (bool,),
    "strict_plugins": (bool,),
    "disable_plugins": (list,),
    "plugins": (dict,),
    "run": (dict,),
}


def _type_name(types: tuple[type, ...]) -> str:
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a table"}
    return " or ".join(names[t] for t in types)


def _check_type(value: Any, types: tuple[type, ...], key: str, where: str) -> None:
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        raise ConfigError(f"{where}: {key} must be {_type_name(types)}, not {value!r}")


def check_run_value(key: str, value: Any, where: str) -> Any:
    """Validate one ``[run]`` value (also used for CLI flags); returns it."""
    if key not in RUN_SCHEMA:
        raise ConfigError(f"{where}: unknown key run.{key}{did_you_mean(key, RUN_SCHEMA)}")
    types, (check, why) = RUN_SCHEMA[key]
    _check_type(value, types, f"run.{key}", where)
    if not check(value):
        raise ConfigError(f"{where}: run.{key} {why}, not {value!r}")
    return value


@attrs.frozen
class ConfigFile:
    """A parsed config file: its selection layer and its ``[run]`` values."""

    path: Path | None
    layer: FlagLayer
    run: Mapping[str, Any]


EMPTY = ConfigFile(path=None, layer=FlagLayer(source="config"), run={})


def parse_config(data: Mapping[str, Any], where: str, path: Path | None = None) -> ConfigFile:
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    pins: dict[str, str] = {}
    run: dict[str, Any] = {}
    for key, value in data.items():
        if key not in SELECTION_KEYS:
            raise ConfigError(f"{where}: unknown key {key}{did_you_mean(key, SELECTION_KEYS)}")
        _check_type(value, SELECTION_KEYS[key], key, where)
        if key == "plugins":
            for hook, name in value.items():
                try:
                    check_hook(hook, f"{where} [plugins]")
                except UsageError as exc:
                    raise ConfigError(str(exc)) from None
                _check_type(name, (str,), f"plugins.{hook}", where)
                pins[hook] = name
                origin[f"pin:{hook}"] = f"{where} [plugins] {hook}"
        elif key == "run":
            run = {k: check_run_value(k, v, where) for k, v in value.items()}
        elif key == "disable_plugins":
            for item in value:
                _check_type(item, (str,), "disable_plugins item", where)
            values[key] = tuple(value)
            origin[key] = f"{where} disable_plugins"
        elif key == "streaming_ratio":
            try:
                values[key] = parse_ratio(value, f"{where}: streaming_ratio")
            except UsageError as exc:
                raise ConfigError(str(exc)) from None
            origin[key] = f"{where} streaming_ratio"
        else:
            values[key] = value
            origin[key] = f"{where} {key}"
    return ConfigFile(path=path, layer=FlagLayer(source="config", pins=pins, origin=origin, **values), run=run)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from None


def find_config(cwd: Path) -> tuple[Path, Mapping[str, Any]] | None:
    """The config in ``cwd``: ``contentdownload.toml``, else ``[tool.contentdownload]`` of ``pyproject.toml``."""
    candidate = cwd / CONFIG_NAME
    if candidate.is_file():
        return candidate, _read_toml(candidate)
    pyproject = cwd / "pyproject.toml"
    if pyproject.is_file():
        section = _read_toml(pyproject).get("tool", {}).get("contentdownload")
        if section is not None:
            return pyproject, section
    return None


def load_config(path: str | Path | None = None, cwd: Path | None = None) -> ConfigFile:
    """Load ``path`` if given, else look in ``cwd`` (default: the working folder)."""
    if path is not None:
        path = Path(path)
        return parse_config(_read_toml(path), str(path), path)
    found = find_config(cwd or Path.cwd())
    if found is None:
        return EMPTY
    where, data = found
    label = str(where) if where.name == CONFIG_NAME else f"{where} [tool.contentdownload]"
    return parse_config(data, label, where)


def run_settings(config: ConfigFile, overrides: Mapping[str, Any] | None = None) -> RunSettings:
    """Defaults, then the config's ``[run]``, then ``overrides`` (CLI flags that were given)."""
    merged = {**config.run, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    return RunSettings(**merged)
