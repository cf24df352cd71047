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
from contentdownload.hooks.specs import HOOKSPEC_VERSION, hookimpl  # noqa: E402
from contentdownload.hooks.model import (  # noqa: E402
    FinalizeContext,
    FinalizeResult,
    Job,
    JobKey,
    JobKeyContext,
    JobResult,
    ResumeContext,
    ResumeDecision,
    StreamContext,
    StreamResult,
)
from contentdownload.machinery.runtime import Runtime, explain, integration_status  # noqa: E402

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


def __getattr__(name: str):
    # The Downloader pulls in the HTTP stack; import it on first use only.
    if name == "Downloader":
        from contentdownload.jobs.downloader import Downloader

        return Downloader
    raise AttributeError(f"module 'contentdownload' has no attribute {name!r}")
