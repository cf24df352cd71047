"""The runtime: flags from every source, the loaded plugins, the policy and the dispatcher.

The CLI and the library both build one :class:`Runtime`; ``explain()`` and
``integration_status()`` report from it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping


from contentdownload.version import __version__
import attrs

from contentdownload.transfer.urls import add_signing_params
from contentdownload.machinery.config import ConfigFile, RunSettings, load_config, redact_setting, resolve_settings, user_config_path
from contentdownload.machinery.dispatch import Dispatcher
from contentdownload.machinery.flags import ENV_VARS, FlagLayer, env_layer
from contentdownload.hooks.specs import HOOKSPEC_VERSION
from contentdownload.jobs.keys import canary_fraction, identity_key
from contentdownload.machinery.loader import PluginSet, load_plugins
from contentdownload.hooks.model import HOOKS, Job
from contentdownload.machinery.policy import Policy
from contentdownload.machinery.telemetry import Telemetry


class Runtime:
    """Everything selection needs, built once per run (or per ``Downloader``)."""

    def __init__(
        self,
        cli: FlagLayer | None = None,
        config: ConfigFile | None = None,
        environ: Mapping[str, str] | None = None,
        extra_plugins: Mapping[str, object] | None = None,
        run_overrides: Mapping[str, Any] | None = None,
        override_label: Callable[[str], str] | None = None,
    ):
        self.environ = dict(os.environ if environ is None else environ)
        self.cli = cli or FlagLayer(source="cli")
        self.env = env_layer(self.environ)
        self.config = config if config is not None else load_config()
        self.layers = (self.cli, self.env, self.config.layer)
        strict = next((l.strict_plugins for l in self.layers if l.strict_plugins is not None), False)
        disable = tuple(dict.fromkeys(n for l in self.layers for n in l.disable_plugins))
        self.plugins: PluginSet = load_plugins(disable=disable, strict=strict, extra=extra_plugins)
        self.policy = Policy(self.layers, self.plugins)
        self.telemetry = Telemetry()
        self.dispatcher = Dispatcher(self.plugins, self.telemetry)
        labels = {} if override_label is None else {"override_label": override_label}
        resolved = resolve_settings(self.config, self.environ, run_overrides, **labels)
        self.settings: RunSettings = resolved[0]
        add_signing_params(self.settings.signing_params)
        #: ``[run]`` key -> where its value came from (default, a file, a variable, a flag)
        self.settings_origin: dict[str, str] = resolved[1]

    @classmethod
    def from_options(
        cls,
        config_path: str | Path | None = None,
        cli: FlagLayer | None = None,
        environ: Mapping[str, str] | None = None,
        extra_plugins: Mapping[str, object] | None = None,
        run_overrides: Mapping[str, Any] | None = None,
        override_label: Callable[[str], str] | None = None,
    ) -> "Runtime":
        return cls(cli=cli, config=load_config(config_path), environ=environ, extra_plugins=extra_plugins,
                   run_overrides=run_overrides, override_label=override_label)

    # -- reports -------------------------------------------------------------------

    def flags(self) -> dict:
        """The effective seed flags and their sources."""
        out = {}
        for name, feature in (("idempotency", self.policy.idempotency), ("streaming_schema", self.policy.streaming_schema)):
            out[name] = {"enabled": feature.enabled, "source": feature.source, "detail": feature.detail}
        streaming = [self.policy.select(h).winner for h in ("resume_decision", "stream_io", "finalize")]
        out["streaming"] = {"enabled": all(w != "legacy" for w in streaming) and not self.policy.canaried}
        out["canary"] = self.policy.canaried
        out["allow_fallback"] = self.policy.allow_fallback
        out["env"] = {k: self.environ[k] for k in ENV_VARS if k in self.environ}
        out["config_file"] = str(self.config.path) if self.config.path else None
        return out

    def settings_report(self) -> dict:
        """Every ``[run]`` setting with its effective value and its source; secrets shown as ``***``."""
        values = attrs.asdict(self.settings)
        settings = {k: {"value": redact_setting(k, v), "source": self.settings_origin[k]} for k, v in values.items()}
        return {"config_files": [str(p) for p in self.config.paths], "user_config": str(user_config_path()), "settings": settings}

    def explain(self, job_key: str | None = None, url: str | None = None) -> dict:
        """Per hook: winner, fallback chain, deciding source, pinned; plus load failures."""
        canary_key = job_key
        if url is not None and canary_key is None:
            canary_key, _ = identity_key(Job(urls=(url,)))
        plan = self.policy.plan(canary_key)
        hooks = {hook: plan[hook].as_dict() for hook in HOOKS}
        report: dict[str, Any] = {
            "hooks": hooks,
            "flags": self.flags(),
            "load_failures": [
                {
                    "plugin": i.name,
                    "distribution": i.distribution,
                    "error": i.error,
                    "disable_with": f"CONTENTDOWNLOAD_DISABLE_PLUGINS={i.name} or --disable-plugin {i.name}",
                }
                for i in self.plugins.failed
            ],
        }
        if canary_key is not None:
            report["job_key"] = canary_key
            report["canary_fraction"] = round(canary_fraction(canary_key), 6)
        return report

    def status(self) -> dict:
        """The health check: plugins loaded or failed, the winner per hook, the flags."""
        winners = {hook: self.policy.select(hook).winner for hook in HOOKS}
        return {
            "version": __version__,
            "hookspec_version": HOOKSPEC_VERSION,
            "healthy": not self.plugins.failed,
            "plugins": {name: info.as_dict() for name, info in sorted(self.plugins.infos.items())},
            "winners": winners,
            "flags": self.flags(),
        }


def explain(job_key: str | None = None, url: str | None = None, **options: Any) -> dict:
    """Library form of ``contentdownload plugins explain``: who wins each hook and why."""
    return Runtime.from_options(**options).explain(job_key=job_key, url=url)


def integration_status(**options: Any) -> dict:
    """Library form of ``contentdownload status``: plugins, winners per hook, flags."""
    return Runtime.from_options(**options).status()
