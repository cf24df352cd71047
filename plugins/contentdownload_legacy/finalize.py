"""``finalize`` of the legacy plugin: the part store's checks and fenced rename, in ``plain`` mode (no fsync)."""

from __future__ import annotations

from contentdownload import FinalizeContext, FinalizeResult, hookimpl
from contentdownload.transfer.parts import PartStore, PromoteRequest


@hookimpl
def finalize(ctx: FinalizeContext) -> FinalizeResult:
    """Promote the part (size and SHA-256 checked against the job; a mismatch deletes it), without fsync."""
    return PartStore.for_paths(ctx.paths, mode="plain").promote(PromoteRequest.of(ctx))
