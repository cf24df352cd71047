"""The operation ledger: what a job has done, recorded in the job store so a crash repeats nothing.

Three kinds of operation, each keyed by :func:`~contentdownload.jobs.keys.operation_key`:

- the **transfer** of a job (begun when a worker starts it, done or failed with its result);
- the **finalize intent** of one content: recorded, with its SHA-256 and validators, before
  the part is renamed into place, so a crash between the rename and the store update is
  recovered from the file on disk instead of downloading it again;
- the **manifest row** of an outcome: a success once per content of the job (a file
  fetched again with other bytes gets its row), a revalidation once per run, a failure
  once per reason; even when a crash came between writing the row
  and recording it (the manifest on disk is the truth when the ledger lags). A row whose
  file was found gone or changed is marked failed (:func:`forget_row`): the file fetched
  again gets its row, though its content is the same.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from contentdownload.hooks.model import JobResult, StreamResult
from contentdownload.jobs.keys import operation_key
from contentdownload.records.manifest import ManifestWriter, iter_rows, result_row


def in_one_transaction(store: Any, calls: Sequence[Callable[[], Any]]) -> list:
    """The results of ``calls`` (store calls), made in one store transaction (a single call is made as it is)."""
    if len(calls) <= 1:
        return [call() for call in calls]
    return store.batched(lambda: [call() for call in calls])


# -- transfer -------------------------------------------------------------------------


def begin_transfer(store: Any, key: str, epoch: int | None) -> None:
    store.op_begin(operation_key(key, "transfer"), key, "transfer", epoch)


def end_transfer(store: Any, key: str, result: JobResult) -> None:
    """The transfer op of ``key`` done with ``result`` (or failed with its reason)."""
    op = operation_key(key, "transfer")
    if result.ok and result.path is not None:
        store.op_done(op, {"outcome": result.outcome, "bytes": result.bytes_downloaded})
    else:
        store.op_failed(op, result.reason or "failed")


def begin_transfers(store: Any, pairs: Iterable[tuple[str, int | None]]) -> None:
    """:func:`begin_transfer` for each ``(key, epoch)``, in one transaction."""
    in_one_transaction(store, [partial(begin_transfer, store, key, epoch) for key, epoch in pairs])


# -- finalize intent ------------------------------------------------------------------


def intent_key(key: str, sha256: str) -> str:
    """The finalize op of one content: its key names the SHA-256, so a file on disk finds its own record."""
    return operation_key(key, f"finalize:{sha256}")


def record_intent(store: Any, key: str, epoch: int | None, stream: StreamResult) -> None:
    """Before the rename: record that this content is being promoted (the crash-recovery evidence)."""
    op = intent_key(key, stream.sha256 or "")
    store.op_begin(op, key, "finalize", epoch or 0)
    store.op_done(op, {
        "sha256": stream.sha256, "size": stream.total_size, "etag": stream.etag,
        "last_modified": stream.last_modified, "final_url": stream.final_url,
        "content_type": stream.content_type, "url": stream.url,
    })


def record_intents(store: Any, items: Iterable[tuple[str, int | None, StreamResult]]) -> None:
    """:func:`record_intent` for each ``(key, epoch, stream)``, in one transaction."""
    in_one_transaction(store, [partial(record_intent, store, key, epoch, stream) for key, epoch, stream in items])


def finalize_intent(store: Any, key: str, sha256: str) -> Mapping[str, Any] | None:
    """The recorded intent of promoting content ``sha256`` for ``key``, when one was completed."""
    op = store.op_get(intent_key(key, sha256))
    if not op or op["status"] != "done" or not op.get("result"):
        return None
    return op["result"]


# -- manifest rows --------------------------------------------------------------------


def manifest_op(job_key: str, outcome: str, reason: str, run_id: str, sha256: str | None = None) -> str:
    """The ledger key of a manifest row.

    A success once per content of the job (its SHA-256: a file fetched again with other
    bytes gets its row, a replay of the same outcome does not), a revalidation once per
    run, a failure once per reason.
    """
    kind = {"not_modified": f"manifest:not_modified:{run_id}", "failed": f"manifest:failed:{reason}"}.get(
        outcome, f"manifest:{sha256 or ''}")
    return operation_key(job_key, kind)


def forget_row(store: Any, job_key: str, sha256: str) -> None:
    """The job's row for content ``sha256`` no longer describes the disk (the file is gone or changed):
    mark its ledger entry failed, so the next file of that content gets a row of its own."""
    op = manifest_op(job_key, "downloaded", "", "", sha256)
    store.op_begin(op, job_key, "manifest", 0)
    store.op_failed(op, "file gone or changed")


def rows_on_disk(path: Path) -> frozenset[str]:
    """Ledger keys of the rows the manifest already holds (the file is the truth when the ledger lags)."""
    if not path.is_file():
        return frozenset()
    return frozenset(
        manifest_op(row["job_key"], row.get("outcome", ""), row.get("reason", ""), row.get("run_id", ""), row.get("sha256"))
        for row in iter_rows(path)
        if row.get("job_key")
    )


class ManifestLedger:
    """Writes one manifest row per outcome of a run, at most once per ledger key when leasing."""

    def __init__(self, store: Any, manifest: ManifestWriter, run_id: str, out: Path):
        self.store, self.manifest, self.run_id, self.out = store, manifest, run_id, out
        self._on_disk: frozenset[str] | None = None  # read when first needed: a rerun of finished jobs never reads the manifest

    def _rows_on_disk(self, op: str) -> bool:
        """Whether the manifest holds the row of ``op`` already (read once, when a row not recorded done is first due)."""
        if self._on_disk is None:
            self._on_disk = rows_on_disk(self.manifest.path)
        return op in self._on_disk

    def write(self, result: JobResult, *, leasing: bool) -> None:
        self.write_many([result], leasing=leasing)

    def write_many(self, results: Sequence[JobResult], *, leasing: bool, then: Callable[[], Any] | None = None) -> None:
        """The rows of ``results`` that are due, with one fsync: the ledger's ``op_begin`` s in one
        transaction, then the rows, then their ``op_done`` s in another, with ``then()`` (more store
        calls: the jobs' records) when given. A result whose row is
        recorded done is skipped; one whose row is on disk but not yet recorded (a crash came
        between) is recorded without writing it again; two results of one ledger key get one row.
        """
        ops: dict[str, JobResult] = {}
        rows = []
        for result in results:
            if leasing and result.job_key:
                ops.setdefault(manifest_op(result.job_key, result.outcome, result.reason, self.run_id, result.sha256), result)
            else:
                rows.append(result_row(result, self.run_id, self.out))
        begun = list(ops.items())
        statuses = self.store.op_begin_many([(op, r.job_key, "manifest", 0) for op, r in begun])
        due = [(op, r, status != "failed" and self._rows_on_disk(op)) for (op, r), status in zip(begun, statuses) if status != "done"]
        self.manifest.write_many(rows + [result_row(r, self.run_id, self.out) for _, r, on_disk in due if not on_disk])
        in_one_transaction(self.store, [partial(self._done, op, r, on_disk) for op, r, on_disk in due] + ([then] if then else []))

    def _done(self, op: str, result: JobResult, reconciled: bool) -> None:
        """Record the row of ``op`` written (``reconciled``: it was on disk before, from a run that crashed)."""
        done = {"run_id": self.run_id, "outcome": result.outcome}
        self.store.op_done(op, {**done, "reconciled": True} if reconciled else done)
