"""The four pipeline hooks, and the optional asynchronous forms of ``stream_io`` and ``finalize``.

All four are ``firstresult`` hooks, but pluggy's own call order never decides who
answers: the policy (:mod:`contentdownload.machinery.policy`) names a chain of plugins per job
and hook, and the dispatcher asks them one at a time. Each hook takes one frozen
context argument named ``ctx`` and returns a frozen result, or ``None`` to decline
(the next plugin of the chain is then asked).

Raising from a hook is a plugin fault: the dispatcher logs it ("falling back"),
counts it and asks the next plugin where that is safe (see each hook). Raise
:class:`contentdownload.errors.JobAbort` (for instance ``LeaseLostError``) to stop the
job without any fallback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Awaitable

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from contentdownload.hooks.model import (
        FinalizeContext,
        FinalizeResult,
        JobKey,
        JobKeyContext,
        ResumeContext,
        ResumeDecision,
        StreamContext,
        StreamResult,
    )

PROJECT = "contentdownload"
#: Bumped when a context or result loses or changes a field; added fields do not bump it.
#: A plugin module declaring ``CONTENTDOWNLOAD_HOOKSPEC`` above this is skipped at load.
HOOKSPEC_VERSION = 1

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec(firstresult=True)
def job_key(ctx: "JobKeyContext") -> "JobKey | None":
    """Derive the job's deterministic key.

    Receives: :class:`~contentdownload.hooks.model.JobKeyContext` with the job and the path it
    was planned to, relative to the output folder.

    Returns: a :class:`~contentdownload.hooks.model.JobKey`. The same job must give the same key
    in every process, on every machine and in every run; a plugin that canonicalises
    URLs does so inside this hook, callers pass URLs as given.

    ``None``: this plugin cannot key this job; the next plugin is asked.

    May not: do I/O (network or disk), depend on time, randomness or process state.
    A raise falls back to the next plugin (always safe: nothing was done yet).
    """


@hookspec(firstresult=True)
def resume_decision(ctx: "ResumeContext") -> "ResumeDecision | None":
    """Decide how to request the URL, before any request is sent.

    Receives: :class:`~contentdownload.hooks.model.ResumeContext`: the job, its key, the
    candidate URL, the final/part/sidecar paths, transfer options, the earlier record
    (or ``None``), the attempt number and the previous attempt's ``StreamResult``.

    Returns: a :class:`~contentdownload.hooks.model.ResumeDecision` with the mode (``fresh``,
    ``resume``, ``revalidate``, ``discard``), the request headers to send, the offset a
    resume continues from, and a ``reason``.

    ``None``: this plugin has no opinion for this job; the next plugin is asked.

    May not: send requests or write the final file. It may delete a part and its
    sidecar it judged unusable (mode ``discard``). A raise falls back (always safe).
    """


@hookspec(firstresult=True)
def stream_io(ctx: "StreamContext") -> "StreamResult | None":
    """Carry out the decision: send the request, check the status line, write the part.

    Receives: :class:`~contentdownload.hooks.model.StreamContext` with the decision, the
    worker's HTTP client, the part and sidecar paths, options (``max_bytes``, chunk size,
    timeouts), the lease to heartbeat and the ``effects`` to report written bytes to.

    Returns: a :class:`~contentdownload.hooks.model.StreamResult`. HTTP failures, timeouts and
    short bodies are results (``retry`` or ``failed``), not exceptions. A ``complete``
    result carries the SHA-256 of the whole part, prefix included.

    ``None``: this plugin declines to transfer this job (before sending anything); the
    next plugin is asked.

    May not: write anything but the part and its sidecar, write an error body to the
    part, or touch the final path. A raise falls back only while ``effects.bytes_written``
    is 0; after that the attempt is retried from ``resume_decision``.
    """


@hookspec(firstresult=True)
def stream_io_async(ctx: "StreamContext") -> "Awaitable[StreamResult] | None":
    """``stream_io`` on the process's event loop, for plugins that can transfer without a thread (optional).

    Receives: the same :class:`~contentdownload.hooks.model.StreamContext` as ``stream_io``.

    Returns: an awaitable (a coroutine) of a :class:`~contentdownload.hooks.model.StreamResult`,
    with the same meaning as ``stream_io``'s. The dispatcher's
    :meth:`~contentdownload.machinery.dispatch.Dispatcher.call_async` asks the
    ``stream_io`` chain in order and awaits it; a plugin without this hook has its
    ``stream_io`` run in a thread, so synchronous plugins keep working unchanged.

    ``None``: this plugin's synchronous ``stream_io`` does it (run in a thread), not the next plugin.
    The awaitable may also end with ``None``, after a request it sent and abandoned, as long as
    nothing was written to the part: the synchronous ``stream_io`` then carries out the decision.

    May not: block the event loop (no synchronous network I/O; writing a part's blocks to
    disk is allowed), or anything ``stream_io`` may not do (touch the final path, write an
    error body). The same fallback rules as ``stream_io``: a raise falls back only while
    ``effects.bytes_written`` is 0.
    """


@hookspec(firstresult=True)
def finalize(ctx: "FinalizeContext") -> "FinalizeResult | None":
    """Promote a complete part to its final path.

    Receives: :class:`~contentdownload.hooks.model.FinalizeContext` with the complete
    ``StreamResult``, the paths, the lease and the ``effects``.

    Returns: a :class:`~contentdownload.hooks.model.FinalizeResult`: ``ok`` with path, size and
    SHA-256; or not ``ok`` with a reason (``size_mismatch``, ``sha256_mismatch``), having
    promoted nothing.

    ``None``: this plugin declines; the next plugin is asked.

    May not: promote a part whose size or SHA-256 differs from what the job expects;
    promote after ``ctx.lease.assert_held()`` raised; leave partial content at the final
    path at any moment. It must call ``ctx.effects.mark_renamed()`` right after the
    rename: from then on a raise never falls back.
    """


@hookspec(firstresult=True)
def finalize_async(ctx: "FinalizeContext") -> "Awaitable[FinalizeResult] | None":
    """``finalize`` on the process's event loop, for plugins that can promote without holding a thread (optional).

    Receives: the same :class:`~contentdownload.hooks.model.FinalizeContext` as ``finalize``.

    Returns: an awaitable (a coroutine) of a :class:`~contentdownload.hooks.model.FinalizeResult`,
    with the same meaning as ``finalize``'s. The event-loop lane asks the ``finalize`` chain
    through :meth:`~contentdownload.machinery.dispatch.Dispatcher.call_async`: a plugin without
    this hook has its ``finalize`` run in a thread, so synchronous plugins keep working
    unchanged. The built-in ``streaming`` plugin awaits
    :meth:`~contentdownload.transfer.parts.PartStore.promote_async`, which promotes the parts
    finishing together in one batch.

    ``None``: this plugin's synchronous ``finalize`` does it (run in a thread), not the next plugin.
    The awaitable may also end with ``None`` as long as nothing was renamed.

    May not: block the event loop (checks, fsyncs and renames run in the loop's executor), or
    anything ``finalize`` may not do. The same fallback rules as ``finalize``: a raise falls
    back only before ``ctx.effects.mark_renamed()``.
    """
