"""``resume_decision`` of the streaming plugin: RFC 9110 resume from the part's committed bytes.

Order of preference:

1. After a ``412`` the validators are stale: drop the part, go ``fresh`` without any.
2. A part whose sidecar is sound (same URL, identity coding, committed bytes within the
   announced total) is resumed from its committed count, or, when the sidecar was written
   in this boot (a process crash, not a power loss), from the part's whole length:
   ``Range`` from the overlap before that offset, ``If-Range`` only with a strong
   validator (a strong ETag, else a Last-Modified that was a strong date and no ETag at
   all), ``Accept-Encoding: identity``. With weak validators or none, the overlap check
   of the part store alone allows the splice. Bytes past the offset are cut off when the
   part is opened.
3. A finished file that still matches the earlier record is revalidated
   (``If-None-Match`` / ``If-Modified-Since``).
4. Any other part is unusable: ``discard`` (part and sidecar deleted), then fresh.
5. Otherwise ``fresh``.

Every decision carries a ``reason`` and is logged as ``streaming_resume_decision``.
"""

from __future__ import annotations

import os
from pathlib import Path

from contentdownload import ResumeContext, ResumeDecision, hookimpl
from contentdownload.transfer.files import file_matches
from contentdownload.transfer.headers import conditional_headers, http_date, is_strong_etag
from contentdownload.records.log import get_logger
from contentdownload.hooks.model import PriorRecord, StagePaths
from contentdownload.clock import boot_id
from contentdownload.transfer.parts import PartStore, Sidecar, url_identity
from contentdownload.transfer.validators import Validators, resume_start

log = get_logger("contentdownload.streaming")

#: A previous attempt's reasons after which the part must not be trusted again.
_DISTRUST_PART = frozenset({"bad_content_range", "part_changed", "validator_changed", "overlap_mismatch"})


def drop_part(paths: StagePaths) -> None:
    """Delete a part and its sidecar, if present."""
    PartStore.for_paths(paths).discard(paths)


def final_matches_record(final: Path, record: PriorRecord | None) -> bool:
    """Whether the finished file is the one ``record`` describes: same size, and same mtime or same SHA-256."""
    if record is None or record.size is None:
        return False
    return file_matches(final, record.size, record.sha256, record.mtime_ns)


def _revalidation(ctx: ResumeContext, reason: str) -> ResumeDecision | None:
    record = ctx.record
    if record is None or not final_matches_record(ctx.paths.final, record):
        return None
    etag = record.etag.strip() if record.etag else None
    date = http_date(record.last_modified)
    if not etag and not date:
        return None
    return ResumeDecision(mode="revalidate", reason=reason, headers=conditional_headers(etag, date), etag=etag, last_modified=date)


def _part_problem(ctx: ResumeContext, part_size: int) -> tuple[str | None, Sidecar | None]:
    """Why the part cannot be resumed (``None`` when it can), and its sidecar."""
    previous = ctx.previous
    if previous is not None and previous.reason in _DISTRUST_PART:
        return f"previous_{previous.reason}", None
    try:
        meta = PartStore.for_paths(ctx.paths).load_sidecar(ctx.paths)
    except FileNotFoundError:
        return "no_sidecar", None
    except (ValueError, OSError):
        return "corrupt_sidecar", None
    if meta.url != url_identity(ctx.url):
        return "different_url", meta
    if meta.content_encoding or not meta.resumable:
        return "encoded_content" if meta.content_encoding else "not_resumable", meta
    if resume_offset(meta, part_size) <= 0:
        return "nothing_committed", meta
    if part_size < meta.committed:
        return "part_shorter_than_committed", meta
    if meta.expected_total is not None and meta.committed > meta.expected_total:
        return "size_past_total", meta
    if ctx.job.size is not None and meta.committed > ctx.job.size:
        return "size_past_expected", meta
    if ctx.options.max_bytes is not None and meta.committed > ctx.options.max_bytes:
        return "size_past_max_bytes", meta
    return None, meta


def resume_offset(meta: Sidecar, part_size: int) -> int:
    """Where to continue: the fsynced count, or the part's length when this boot wrote it (a process crash keeps the page cache)."""
    same_boot = meta.boot_id is not None and meta.boot_id == boot_id()
    within = meta.expected_total is None or part_size <= meta.expected_total
    return part_size if same_boot and within and part_size > meta.committed else meta.committed


def _resume(meta: Sidecar, part_size: int) -> ResumeDecision:
    offset = resume_offset(meta, part_size)
    if_range = Validators(etag=meta.etag, last_modified=meta.last_modified, date_is_strong=meta.last_modified_strong).if_range()
    kind = "strong_etag" if is_strong_etag(meta.etag) else "strong_date" if if_range else "overlap_only"
    reason = f"part_with_{kind}" + ("_after_a_crash" if offset > meta.committed else "_truncated_to_committed" if part_size > offset else "")
    headers = (("Range", f"bytes={resume_start(offset)}-"), *((("If-Range", if_range),) if if_range else ()), ("Accept-Encoding", "identity"))
    return ResumeDecision(mode="resume", reason=reason, headers=headers, offset=offset, etag=meta.etag,
                          last_modified=http_date(meta.last_modified), expected_total=meta.expected_total)


def decide(ctx: ResumeContext) -> ResumeDecision:
    """The decision for ``ctx`` (see the module docstring); deletes a part it judges unusable."""
    paths = ctx.paths
    previous = ctx.previous
    if previous is not None and previous.reason == "precondition_failed":
        drop_part(paths)
        return ResumeDecision(mode="fresh", reason="precondition_failed_dropped_validators")

    part_size = PartStore.part_size(paths)

    if part_size is None:
        if os.path.lexists(paths.sidecar):
            drop_part(paths)  # an orphan sidecar (a crash right after a finalize)
        revalidate = _revalidation(ctx, "finished_file_matches_record")
        if revalidate is not None:
            return revalidate
        if paths.final.exists():
            return ResumeDecision(mode="fresh", reason="final_file_not_recorded")
        return ResumeDecision(mode="fresh", reason="no_part")

    problem, meta = _part_problem(ctx, part_size)
    if problem is None:
        assert meta is not None
        return _resume(meta, part_size)

    drop_part(paths)
    revalidate = _revalidation(ctx, f"finished_file_matches_record_part_dropped_{problem}")
    if revalidate is not None:
        return revalidate
    return ResumeDecision(mode="discard", reason=problem)


@hookimpl
def resume_decision(ctx: ResumeContext) -> ResumeDecision:
    """Decide between resume, revalidate, discard and fresh from the part, its sidecar and the record."""
    return decide(ctx)
