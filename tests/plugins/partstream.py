"""A third-party ``stream_io`` built on the core's part store: resumes a part from its committed offset (via the overlap)."""

from contentdownload import StreamResult, hookimpl
from contentdownload.transfer.http import content_length
from contentdownload.transfer.parts import PartStore, Sidecar, url_identity
from contentdownload.transfer.status import TRANSPORT_ERRORS, Attempt
from contentdownload.transfer.validators import resume_start


@hookimpl
def stream_io(ctx):
    store = PartStore.for_paths(ctx.paths, mode="durable")
    attempt = Attempt(ctx, {**dict(ctx.decision.headers), "Accept-Encoding": "identity"})
    response = attempt.send()
    if isinstance(response, StreamResult):
        return response
    with response:
        verdict = attempt.verdict(response, ranged=ctx.decision.offset > 0)
        if verdict.discard_part or verdict.action == "range_not_satisfiable":
            store.discard(ctx.paths)
        if verdict.action not in ("full", "partial"):
            return attempt.stopped(verdict) if verdict.stops else attempt.result("retry", "range_not_satisfiable")
        offset = ctx.decision.offset if verdict.action == "partial" else 0
        body = content_length(response)  # from resume_start(offset): the overlap is compared, not written
        body = None if body is None else body - (offset - resume_start(offset))
        meta = Sidecar(url=url_identity(ctx.url), committed=offset, etag=response.headers.get("ETag"),
                       last_modified=response.headers.get("Last-Modified"),
                       expected_total=None if body is None else offset + body)
        part = store.open(ctx.paths, offset=offset, meta=meta)
        outcome = part.receive(lambda: response.raw.read(ctx.options.chunk_size), effects=ctx.effects,
                               progress=ctx.progress, checkpoint_every=ctx.options.checkpoint_bytes,
                               errors=TRANSPORT_ERRORS)
        return attempt.body_result(part, outcome, response, offset=offset, expected_body=body)
