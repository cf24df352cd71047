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
    headers = ["Accept: application/pdf"]

Files are read in this order, each overriding the one before: the user's file
(``config.toml`` in the platformdirs user config folder ``contentdownload``), the
project's file in the working folder, then ``--config FILE``. Every ``[run]`` key can
also be set as ``CONTENTDOWNLOAD_<KEY>`` (upper case; list keys take one item a line),
which beats the files; CLI flags beat everything. Unknown keys and values of the wrong
type are errors naming the key and where it was set.
"""

from __future__ import annotations

import contextlib
import re
import tomllib
from types import UnionType
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import attrs
import platformdirs

from contentdownload.errors import ConfigError, UsageError
from contentdownload.machinery.flags import FlagLayer, check_hook, parse_bool, parse_ratio
from contentdownload.machinery.suggest import did_you_mean

CONFIG_NAME = "contentdownload.toml"
USER_CONFIG_NAME = "config.toml"
ENV_PREFIX = "CONTENTDOWNLOAD_"


_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kKmMgG]?)\s*$")


def parse_size(value: int | str) -> int | None:
    """Bytes from ``1234``, ``"500k"``, ``"2M"``, ``"1.5G"`` (powers of 1024, as wget and curl read them); ``None`` when malformed."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None:
        return None
    number, unit = match.groups()
    scale = 1024 ** ("kmg".index(unit.lower()) + 1) if unit else 1
    return int(float(number) * scale)


# A [run] value's check beyond its type: (predicate, what the message says it must be)
_POSITIVE = (lambda v: v > 0, "must be greater than 0")
_NON_NEGATIVE = (lambda v: v >= 0, "must be 0 or more")
_ANY = (lambda v: True, "")
_HEADER = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\r\n]*$")
_COOKIE = re.compile(r"^[^=;\s]+=[^;\r\n]*(;\s*[^=;\s]+=[^;\r\n]*)*;?$")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/\s]+")
_PARAM = re.compile(r"^[^=&#?,\s]+$")


def _strings(pattern: re.Pattern[str], why: str) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: all(isinstance(x, str) and pattern.match(x.strip()) for x in v), why)


def _setting(default: Any, check: tuple[Callable[[Any], bool], str] = _ANY, **options: Any) -> Any:
    """A :class:`RunSettings` field whose value, beyond its annotated type, must pass ``check``."""
    return attrs.field(default=default, metadata={"check": check}, **options)


@attrs.frozen
class RunSettings:
    """Settings of a run, from defaults, then the config file's ``[run]`` table, then CLI flags.

    The annotations are the accepted types (a ``float`` takes an integer too, a tuple a
    list) and each field's ``check`` metadata the rest: :data:`RUN_SCHEMA` is read from them.
    """

    workers: int = _setting(4, _POSITIVE)
    per_host: int = _setting(4, _POSITIVE)
    processes: int | None = _setting(None, _POSITIVE)
    durability: str = _setting("batch", (lambda v: v in ("file", "batch", "none"), "must be file, batch or none"))
    transport: str = _setting("auto", (lambda v: v in ("auto", "sync"), "must be auto or sync"))
    retries: int = _setting(5, _NON_NEGATIVE)
    timeout: float = _setting(60.0, _POSITIVE)
    connect_timeout: float = _setting(10.0, _POSITIVE)
    max_bytes: int | None = _setting(None, _POSITIVE)
    max_jobs: int | None = _setting(None, _POSITIVE)
    db: str | None = None
    revalidate: bool = False
    accept_any_content: bool = False
    retry_failed: bool = False
    chunk_size: int = _setting(256 << 10, (lambda v: v >= 4096, "must be at least 4096"))
    low_speed_limit: int = _setting(1000, _NON_NEGATIVE)
    low_speed_time: float = _setting(60.0, _POSITIVE)
    max_time: float | None = _setting(None, _POSITIVE)
    lease_ttl: float = _setting(60.0, (lambda v: v >= 1, "must be at least 1 (seconds)"))
    store_retry_s: float = _setting(300.0, _NON_NEGATIVE)
    backoff_factor: float = _setting(0.5, _NON_NEGATIVE)
    verify_tls: bool = True
    log_level: str = _setting("INFO", (lambda v: v.upper() in {"DEBUG", "INFO", "WARNING", "ERROR"},
                                       "must be DEBUG, INFO, WARNING or ERROR"))
    progress: bool = True
    headers: tuple[str, ...] = _setting((), _strings(_HEADER, "must be a list of 'Name: value' strings"), converter=tuple)
    user_agent: str | None = _setting(None, (lambda v: "\n" not in v and "\r" not in v, "must be one line"))
    cookies: tuple[str, ...] = _setting((), _strings(_COOKIE, "must be a list of 'name=value' strings"), converter=tuple)
    cookie_jar: str | None = None
    proxy: str | None = _setting(None, (lambda v: bool(_URL.match(v)), "must be a URL such as http://proxy.example:3128"))
    ca_bundle: str | None = None
    host_rate: float | None = _setting(None, _POSITIVE)
    #: bytes per second, from ``1234`` or a size such as ``"500k"`` / ``"2M"``
    limit_rate: int | str | None = _setting(None, (lambda v: (parse_size(v) or 0) > 0, "must be bytes per second such as 500k or 2M"),
                                            converter=lambda v: None if v is None else parse_size(v))
    signing_params: tuple[str, ...] = _setting((), _strings(_PARAM, "must be a list of query parameter names (no '=', '&', '#', '?', ',' or spaces; in a variable one name a line)"),
                                               converter=tuple)


def _accepted(annotation: Any) -> tuple[type, ...]:
    """The value types a setting annotated ``annotation`` takes from a file or a keyword (``None`` is no value)."""
    union = typing.get_origin(annotation) in (typing.Union, UnionType)
    kinds = [a for a in typing.get_args(annotation) if a is not type(None)] if union else [annotation]
    widened = {float: (int, float), tuple: (list, tuple)}
    return tuple(t for kind in kinds for t in widened.get(typing.get_origin(kind) or kind, (kind,)))


#: ``[run]`` key -> (accepted types, (check, what the check says)), read from :class:`RunSettings`.
RUN_SCHEMA: dict[str, tuple[tuple[type, ...], tuple[Any, str]]] = {
    f.name: (_accepted(f.type), f.metadata.get("check", _ANY)) for f in attrs.fields(attrs.resolve_types(RunSettings))
}

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
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list", tuple: "a list", dict: "a table"}
    return " or ".join(dict.fromkeys(names[t] for t in types))


def _check_type(value: Any, types: tuple[type, ...], key: str, where: str) -> None:
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        raise ConfigError(f"{where}: {key} must be {_type_name(types)}, not {value!r}")


def run_value_problem(key: str, value: Any) -> str | None:
    """What is wrong with ``value`` for the ``[run]`` key ``key`` ("must be ..., not ..."), ``None`` when it is fine."""
    types, (check, why) = RUN_SCHEMA[key]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        return f"must be {_type_name(types)}, not {value!r}"
    if not check(value):
        return f"{why}, not {value!r}"
    return None


def check_option(key: str, value: Any, name: str, unknown: str | None = None, error: type[UsageError] = UsageError) -> Any:
    """Validate one ``[run]`` setting shown to the user as ``name`` (a flag, a variable, a keyword); returns it.

    An unknown ``key`` is reported as ``unknown`` (default ``unknown option KEY``) with the closest match.
    """
    if key not in RUN_SCHEMA:
        raise error(f"{unknown or f'unknown option {key}'}{did_you_mean(key, RUN_SCHEMA)}")
    problem = run_value_problem(key, value)
    if problem:
        raise error(f"{name} {problem}")
    return value


def check_run_value(key: str, value: Any, where: str) -> Any:
    """Validate one ``[run]`` value of the config file ``where``; returns it (a :class:`ConfigError` otherwise)."""
    return check_option(key, value, f"{where}: run.{key}", unknown=f"{where}: unknown key run.{key}", error=ConfigError)


@attrs.frozen
class ConfigFile:
    """A parsed config file: its selection layer and its ``[run]`` values."""

    path: Path | None
    layer: FlagLayer
    run: Mapping[str, Any]
    #: ``[run]`` key -> the file (label) that set it
    run_origin: Mapping[str, str] = attrs.field(factory=dict)
    #: every file read, in the order read
    paths: tuple[Path, ...] = ()


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
    layer = FlagLayer(source="config", pins=pins, origin=origin, **values)
    return ConfigFile(path=path, layer=layer, run=run, run_origin={k: where for k in run}, paths=(path,) if path else ())


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


def user_config_path() -> Path:
    """``config.toml`` in the user's config folder (``$XDG_CONFIG_HOME/contentdownload`` on Linux)."""
    return Path(platformdirs.user_config_dir("contentdownload", appauthor=False)) / USER_CONFIG_NAME


def _merge_layers(layers: Iterable[FlagLayer]) -> FlagLayer:
    """One config layer from several files, a later file's opinion winning."""
    values: dict[str, Any] = {}
    pins: dict[str, str] = {}
    origin: dict[str, str] = {}
    disable: list[str] = []
    for layer in layers:
        for field in ("streaming_integration", "streaming", "idempotency", "streaming_schema", "streaming_ratio", "allow_fallback", "strict_plugins"):
            if getattr(layer, field) is not None:
                values[field] = getattr(layer, field)
        pins.update(layer.pins)
        disable.extend(layer.disable_plugins)
        origin.update(layer.origin)
    return FlagLayer(source="config", pins=pins, disable_plugins=tuple(dict.fromkeys(disable)), origin=origin, **values)


def merge_configs(files: list[ConfigFile]) -> ConfigFile:
    """The files read in order, each overriding the ones before."""
    if not files:
        return EMPTY
    run: dict[str, Any] = {}
    run_origin: dict[str, str] = {}
    for file in files:
        run.update(file.run)
        run_origin.update(file.run_origin)
    paths = tuple(p for f in files for p in f.paths)
    return ConfigFile(path=paths[-1] if paths else None, layer=_merge_layers(f.layer for f in files), run=run, run_origin=run_origin, paths=paths)


def load_config(path: str | Path | None = None, cwd: Path | None = None, user: bool = True) -> ConfigFile:
    """The user's file (when ``user``), the project's file in ``cwd`` (default: the working folder), then ``path``."""
    files: list[ConfigFile] = []
    user_file = user_config_path()
    if user and user_file.is_file():
        files.append(parse_config(_read_toml(user_file), str(user_file), user_file))
    found = find_config(cwd or Path.cwd())
    if found is not None:
        where, data = found
        label = str(where) if where.name == CONFIG_NAME else f"{where} [tool.contentdownload]"
        files.append(parse_config(data, label, where))
    if path is not None:
        path = Path(path)
        files.append(parse_config(_read_toml(path), str(path), path))
    return merge_configs(files)


def _from_env(key: str, text: str, var: str) -> Any:
    types = RUN_SCHEMA[key][0]
    if str in types:  # checked (and converted) by the schema
        return text.strip()
    if bool in types:
        return parse_bool(text, var)
    if list in types:
        return [line.strip() for line in text.splitlines() if line.strip()]
    for kind in (k for k in (int, float) if k in types):  # 2.5 for a number: the int reading fails, the float one not
        with contextlib.suppress(ValueError):
            return kind(text.strip())
    raise UsageError(f"{var} must be {_type_name(types)}, not {text!r}")


def env_run_values(environ: Mapping[str, str]) -> dict[str, Any]:
    """``[run]`` values from ``CONTENTDOWNLOAD_<KEY>`` variables (validated; a bad one is a :class:`UsageError`)."""
    values = {}
    for key in RUN_SCHEMA:
        var = ENV_PREFIX + key.upper()
        if environ.get(var, "").strip():
            values[key] = check_option(key, _from_env(key, environ[var], var), var)
    return values


def resolve_settings(
    config: ConfigFile,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    override_label: Callable[[str], str] = lambda key: "--" + key.replace("_", "-"),
) -> tuple[RunSettings, dict[str, str]]:
    """Defaults, then the config files' ``[run]``, then ``CONTENTDOWNLOAD_<KEY>``, then ``overrides``; with each key's source."""
    env = env_run_values(environ or {})
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    origin = {key: "default" for key in RUN_SCHEMA}
    origin.update(config.run_origin)
    origin.update({k: f"{ENV_PREFIX}{k.upper()}" for k in env})
    origin.update({k: override_label(k) for k in given})
    return RunSettings(**{**config.run, **env, **given}), origin


def redact_setting(key: str, value: Any) -> Any:
    """A setting as it may be shown: header values, cookie values and proxy credentials hidden."""
    if key == "headers":
        return [f"{h.split(':', 1)[0]}: ***" for h in value]
    if key == "cookies":
        return ["; ".join(f"{c.split('=', 1)[0].strip()}=***" for c in v.split(";") if c.strip()) for v in value]
    if key == "proxy" and value:
        return re.sub(r"//[^/@]*@", "//***@", value)
    return list(value) if isinstance(value, tuple) else value
