"""The ``contentdownload`` command line.

Every subcommand takes the selection flags (``--config``, ``--plugin``, the
streaming-integration switches, ``--streaming-ratio`` ...). Bad usage, bad config and
unknown plugin names print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Any, Callable, Sequence

from contentdownload.version import __version__
from contentdownload.errors import ContentDownloadError, DiskError, PluginLoadError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    from contentdownload.machinery.flags import FlagLayer
    from contentdownload.machinery.runtime import Runtime

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class _Parser(argparse.ArgumentParser):
    """One line and exit 2 on bad usage; with ``intermixed=True``, options may come between positionals.

    ``run URL --out d URL``: the subcommand action calls ``parse_known_args``, which then
    answers with argparse's ``parse_known_intermixed_args`` (itself calling the plain
    ``parse_known_args`` twice).
    """

    def __init__(self, *args: Any, intermixed: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._intermixed = intermixed

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        if not self._intermixed:
            return super().parse_known_args(args, namespace)
        self._intermixed = False
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixed = True

    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def selection_options() -> argparse.ArgumentParser:
    """The flags that decide which plugin answers each hook (shared by every subcommand)."""
    common = _Parser(add_help=False)
    group = common.add_argument_group("plugin selection")
    group.add_argument("--config", metavar="FILE", help="config file, read after the user file and ./contentdownload.toml (or [tool.contentdownload] in ./pyproject.toml)")
    switch = group.add_mutually_exclusive_group()
    switch.add_argument("--enable-streaming-integration", dest="integration", action="store_const", const=True, help="streaming plugins win every hook (overrides env and config)")
    switch.add_argument("--disable-streaming-integration", dest="integration", action="store_const", const=False, help="legacy wins every hook: the one-flag rollback")
    group.add_argument("--streaming-ratio", metavar="R", help="canary: share of jobs (0..1, by a stable hash of the job key) on streaming")
    group.add_argument("--plugin", metavar="HOOK=NAME", action="append", default=[], help="pin a hook to a plugin (repeatable)")
    group.add_argument("--allow-fallback", action="store_true", default=None, help="let pinned hooks fall back when their plugin declines or fails")
    group.add_argument("--disable-plugin", metavar="NAME", action="append", default=[], help="do not load this plugin (repeatable; not legacy)")
    group.add_argument("--strict-plugins", action="store_true", default=None, help="a plugin that fails to load is fatal")
    return common


def cli_layer(args: argparse.Namespace) -> FlagLayer:
    """The CLI's flag layer from parsed arguments."""
    from contentdownload.machinery.flags import FlagLayer, parse_pin, parse_ratio

    origin: dict[str, str] = {}
    values: dict[str, Any] = {}
    if args.integration is not None:
        values["streaming_integration"] = args.integration
        origin["streaming_integration"] = "--enable-streaming-integration" if args.integration else "--disable-streaming-integration"
    if args.streaming_ratio is not None:
        values["streaming_ratio"] = parse_ratio(args.streaming_ratio, "--streaming-ratio")
        origin["streaming_ratio"] = f"--streaming-ratio {args.streaming_ratio}"
    pins: dict[str, str] = {}
    for text in args.plugin:
        hook, name = parse_pin(text, "--plugin")
        pins[hook] = name
        origin[f"pin:{hook}"] = f"--plugin {text}"
    if args.disable_plugin:
        origin["disable_plugins"] = "--disable-plugin"
    return FlagLayer(
        source="cli",
        pins=pins,
        allow_fallback=args.allow_fallback,
        disable_plugins=tuple(args.disable_plugin),
        strict_plugins=args.strict_plugins,
        origin=origin,
        **values,
    )


def runtime_from_args(args: argparse.Namespace, run_overrides: dict | None = None) -> Runtime:
    from contentdownload.machinery.runtime import Runtime

    return Runtime.from_options(config_path=args.config, cli=cli_layer(args), run_overrides=run_overrides)


def _print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


# -- plugins list / explain, status --------------------------------------------------


def cmd_plugins_list(args: argparse.Namespace) -> int:
    runtime = runtime_from_args(args)
    infos = [i.as_dict() for _, i in sorted(runtime.plugins.infos.items())]
    if args.json:
        _print_json({"plugins": infos})
        return EXIT_OK
    rows = [[i["name"], i["distribution"] or "-", i["version"] or "-", i["status"], ",".join(i["hooks"]) or "-"] for i in infos]
    print(_table(rows, ["NAME", "DISTRIBUTION", "VERSION", "STATUS", "HOOKS"]))
    for info in runtime.plugins.failed:
        print(f"\n{info.name}: failed to load: {info.error}\n  disable it with --disable-plugin {info.name} or CONTENTDOWNLOAD_DISABLE_PLUGINS={info.name}")
    for info in (i for i in runtime.plugins.infos.values() if i.status == "skipped"):
        print(f"\n{info.name}: skipped: {info.error}\n  upgrade contentdownload or install a release of {info.distribution or info.name} for this hook API")
    return EXIT_OK


def cmd_plugins_explain(args: argparse.Namespace) -> int:
    runtime = runtime_from_args(args)
    report = runtime.explain(job_key=args.job_key, url=args.url)
    if args.json:
        _print_json(report)
        return EXIT_OK
    rows = [
        [h, s["winner"], " -> ".join(s["fallbacks"]) or "(none)", s["source"], "yes" if s["pinned"] else "no", s["detail"]]
        for h, s in report["hooks"].items()
    ]
    print(_table(rows, ["HOOK", "WINNER", "FALLBACKS", "SOURCE", "PINNED", "DECIDED BY"]))
    flags = report["flags"]
    print(f"\nidempotency: {'on' if flags['idempotency']['enabled'] else 'off'} ({flags['idempotency']['source']}: {flags['idempotency']['detail']})")
    print(f"job store:   {'on' if flags['streaming_schema']['enabled'] else 'off'} ({flags['streaming_schema']['source']}: {flags['streaming_schema']['detail']})")
    if "canary_fraction" in report:
        print(f"job key {report['job_key']}: canary fraction {report['canary_fraction']}")
    for failure in report["load_failures"]:
        print(f"\nplugin {failure['plugin']} ({failure['distribution'] or 'unknown distribution'}) failed to load: {failure['error']}")
        print(f"  to disable it: {failure['disable_with']}")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    runtime = runtime_from_args(args)
    report = runtime.status()
    if args.json:
        _print_json(report)
        return EXIT_OK if report["healthy"] else EXIT_FAILED
    print(f"contentdownload {report['version']} (hookspec {report['hookspec_version']}): {'healthy' if report['healthy'] else 'DEGRADED'}")
    for name, info in report["plugins"].items():
        print(f"  plugin {name:<12} {info['status']:<9} {info['error'] or ','.join(info['hooks'])}")
    for hook, winner in report["winners"].items():
        print(f"  hook   {hook:<16} -> {winner}")
    flags = report["flags"]
    print(f"  idempotency {'on' if flags['idempotency']['enabled'] else 'off'}, job store {'on' if flags['streaming_schema']['enabled'] else 'off'}, canary {'on' if flags['canary'] else 'off'}")
    return EXIT_OK if report["healthy"] else EXIT_FAILED


# -- the parser ---------------------------------------------------------------------

#: Subcommand installers, ``(subparsers, common_parent) -> None``; modules add theirs here.
SUBCOMMANDS: list[Callable[[Any, argparse.ArgumentParser], None]] = []


def build_parser() -> argparse.ArgumentParser:
    common = selection_options()
    parser = _Parser(prog="contentdownload", description="Resumable, exactly-once bulk downloads over HTTP.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    plugins = sub.add_parser("plugins", help="list plugins, explain who answers each hook")
    psub = plugins.add_subparsers(dest="plugins_command", metavar="ACTION", parser_class=_Parser)
    psub.required = True
    p_list = psub.add_parser("list", parents=[common], help="installed plugins: name, distribution, version, status, hooks")
    p_list.add_argument("--json", action="store_true")
    p_list.set_defaults(func=cmd_plugins_list)
    p_explain = psub.add_parser("explain", parents=[common], help="per hook: winner, fallbacks, deciding source")
    p_explain.add_argument("--json", action="store_true")
    target = p_explain.add_mutually_exclusive_group()
    target.add_argument("--job-key", metavar="KEY", help="explain for this job key (canary placement)")
    target.add_argument("--url", metavar="URL", help="explain for the job of this URL")
    p_explain.set_defaults(func=cmd_plugins_explain)

    p_status = sub.add_parser("status", parents=[common], help="health check: plugins, winners, flags")
    p_status.add_argument("--json", action="store_true")
    p_status.set_defaults(func=cmd_status)

    for install in SUBCOMMANDS:
        install(sub, common)
    return parser


def _load_subcommands() -> None:
    if SUBCOMMANDS:
        return
    import importlib

    for module in ("contentdownload.cli.commands",):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def redact_text(text: str) -> str:
    """``text`` with URL credentials and signatures redacted (loaded only once a message needs it)."""
    from contentdownload.transfer.urls import redact_text as redact

    return redact(text)


def _guarded(args: argparse.Namespace) -> int:
    """Run the subcommand; every failure is one line on stderr and an exit code, never a traceback."""
    try:
        return int(args.func(args) or 0)
    except (UsageError, PluginLoadError) as exc:
        print(f"contentdownload: error: {redact_text(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except ContentDownloadError as exc:
        print(f"contentdownload: {redact_text(str(exc))}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("contentdownload: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        raise
    except OSError as exc:
        disk = DiskError.of(exc)
        if disk is None:
            return _unexpected(exc)
        print(f"contentdownload: {redact_text(str(disk))}", file=sys.stderr)  # a full or read-only disk: the run's failure, not the usage's
        return EXIT_FAILED
    except Exception as exc:  # the guard of last resort
        return _unexpected(exc)


def _unexpected(exc: Exception) -> int:
    """An error nobody expected: one line on stderr, the traceback to the log file only."""
    from contentdownload.records.log import log_traceback

    log_traceback("unexpected error", exc)
    print(f"contentdownload: error: unexpected {type(exc).__name__}: {redact_text(str(exc))[:300]}", file=sys.stderr)
    return EXIT_USAGE


def _quiet_broken_pipe() -> int:
    """A reader that stopped early (``| head``): leave quietly, without Python's flush error at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    _load_subcommands()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = _guarded(args)
        sys.stdout.flush()
    except BrokenPipeError:
        return _quiet_broken_pipe()
    return code
