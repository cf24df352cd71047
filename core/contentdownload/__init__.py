"""contentdownload: resumable, exactly-once bulk downloads over HTTP with pluggable stages.

Start with :class:`Downloader` (one file at a time from a program),
``contentdownload run`` (job lists from the command line), :func:`explain` and
:func:`integration_status` (who answers each hook, and why).
"""

from contentdownload.version import __version__  # noqa: E402

from contentdownload.errors import (  # noqa: E402
    ContentDownloadError,
    ConfigError,
    JobAbort,
    LeaseLostError,
    NoPluginAnsweredError,
    PluginLoadError,
    UnknownPluginError,
    UsageError,
)
__all__ = [
    "__version__",
    "Downloader",
    "JobResult",
    "HOOKSPEC_VERSION",
    "hookimpl",
    "ContentDownloadError",
    "ConfigError",
    "JobAbort",
    "LeaseLostError",
    "NoPluginAnsweredError",
    "PluginLoadError",
    "UnknownPluginError",
    "UsageError",
    "FinalizeContext",
    "FinalizeResult",
    "Job",
    "JobKey",
    "JobKeyContext",
    "ResumeContext",
    "ResumeDecision",
    "StreamContext",
    "StreamResult",
    "Runtime",
    "explain",
    "integration_status",
]


#: Where each public name lives; imported on first use, so the command line starts fast.
_LAZY = {
    "Downloader": "contentdownload.jobs.downloader",
    "HOOKSPEC_VERSION": "contentdownload.hooks.specs",
    "hookimpl": "contentdownload.hooks.specs",
    **dict.fromkeys(("FinalizeContext", "FinalizeResult", "Job", "JobKey", "JobKeyContext", "JobResult", "ResumeContext",
                     "ResumeDecision", "StreamContext", "StreamResult"), "contentdownload.hooks.model"),
    **dict.fromkeys(("Runtime", "explain", "integration_status"), "contentdownload.machinery.runtime"),
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'contentdownload' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
