"""``finalize`` of the streaming plugin: the part store's checks and fenced rename, in ``durable`` mode.

``finalize_async`` is the same on the event-loop lane, where the parts finishing together
are checked, fsynced and renamed in one batch (:meth:`PartStore.promote_async`).

The part is promoted only when its size and SHA-256 match what the transfer and the job
say, after it was fsynced and right after the lease check; the rename is atomic on one
filesystem, and the folder is fsynced afterwards so the rename survives a power cut.
"""

from __future__ import annotations

from typing import Awaitable

from contentdownload import FinalizeContext, FinalizeResult, hookimpl
from contentdownload.transfer.parts import PartStore, PromoteRequest


@hookimpl
def finalize(ctx: FinalizeContext) -> FinalizeResult:
    """Check size and SHA-256, fsync, fenced rename, fsync the folder, drop the sidecar."""
    return PartStore.for_paths(ctx.paths, mode="durable").promote(PromoteRequest.of(ctx))


@hookimpl
def finalize_async(ctx: FinalizeContext) -> Awaitable[FinalizeResult]:
    """:func:`finalize` on the event loop, batched with the parts finishing together."""
    return PartStore.for_paths(ctx.paths, mode="durable").promote_async(PromoteRequest.of(ctx))
