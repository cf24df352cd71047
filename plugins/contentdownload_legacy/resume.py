"""``resume_decision`` of the legacy plugin: never resume; revalidate only with a full, verified record.

A broken transfer restarts from byte 0: any part (and sidecar) is deleted (``discard``).
A conditional request is sent only when the earlier record has a path, a SHA-256 and a
length, and the finished file on disk still has that length and that SHA-256
(recomputed), and the record has a validator to send.
"""

from __future__ import annotations


from contentdownload import ResumeContext, ResumeDecision, hookimpl
from contentdownload.transfer.files import file_matches
from contentdownload.transfer.headers import conditional_headers
from contentdownload.transfer.parts import PartStore
from contentdownload.records.log import get_logger

log = get_logger("contentdownload.legacy")


def _verified_record(ctx: ResumeContext) -> bool:
    record = ctx.record
    if record is None or not record.path or not record.sha256 or record.size is None:
        return False
    return file_matches(ctx.paths.final, record.size, record.sha256)


def decide(ctx: ResumeContext) -> ResumeDecision:
    """The legacy decision for ``ctx``; deletes any part and sidecar."""
    paths = ctx.paths
    had_part = PartStore.part_size(paths) is not None
    PartStore.for_paths(paths, mode="plain").discard(paths)
    previous = ctx.previous
    if previous is not None and previous.reason == "precondition_failed":
        return ResumeDecision(mode="fresh", reason="precondition_failed_dropped_validators")
    record = ctx.record
    if _verified_record(ctx) and record is not None and (record.etag or record.last_modified):
        headers = conditional_headers(record.etag, record.last_modified)
        return ResumeDecision(mode="revalidate", reason="finished_file_verified", headers=headers,
                              etag=record.etag, last_modified=record.last_modified)
    if had_part:
        return ResumeDecision(mode="discard", reason="legacy_restarts_from_zero")
    return ResumeDecision(mode="fresh", reason="no_part")


@hookimpl
def resume_decision(ctx: ResumeContext) -> ResumeDecision:
    """Fresh (or discard of a leftover part), or revalidate a verified finished file."""
    return decide(ctx)
