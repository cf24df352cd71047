"""The part store: the on-disk state of an attempt, and the one way a part reaches its final path.

A *part* is the staging file a transfer writes (``staging/KEY[.EPOCH].part``); its
*sidecar* (``KEY[.EPOCH].part.json``) says what the bytes are (see :class:`Sidecar`, the
only code that reads or writes that format). Every transfer plugin, built-in or not,
opens, appends to, checkpoints and discards parts through a :class:`PartStore`, and
:meth:`PartStore.promote` is the only code that renames a part to its final path.

Invariants (why a final path never holds a partial or stale file):

- a part is promoted only when its size and SHA-256 match the transfer's and the job's,
  every digest the server offered matches, and its first bytes do not contradict the type
  the job expects (an HTML page where a PDF is expected is never promoted);
- a part continued at an offset first compares the bytes a resume re-reads before that
  offset (:data:`~contentdownload.transfer.validators.OVERLAP` of them) with its own tail,
  so two versions of a file are never spliced, whatever the validators said;
- promotion renames *from the epoch's own part path*, right after the lease check; a
  new owner of the job first moves every older epoch's part away (:meth:`PartStore.claim`:
  adopted when its writer is gone, quarantined as ``KEY.EPOCH.fenced`` while it lives),
  so a worker that lost its lease finds its part path gone, whatever moment it was
  paused at, and its rename fails (:class:`~contentdownload.errors.LeaseLostError`);
- nothing is opened or renamed through a symlink: parts are opened with ``O_NOFOLLOW``,
  the staging folder, the final path and its parent folders are checked with ``lstat``;
- in ``durable`` mode the part is fsynced before the rename and the folder after it, and
  a checkpoint fsyncs the data before the sidecar records the count; in ``plain`` mode
  nothing is fsynced and no sidecar is kept (a part is never resumed).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import hashlib
import json
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Sequence

import attrs

from contentdownload.clock import boot_id
from contentdownload.errors import Cancelled, DiskError, LeaseLostError, StagingError, UnsafePathError, UsageError
from contentdownload.hooks.model import NO_LEASE, Effects, FinalizeContext, FinalizeResult, Job, Lease, StagePaths, lost_leases
from contentdownload.records.log import debug_line, get_logger
from contentdownload.transfer import content, durability
from contentdownload.transfer.blocks import BufferPool, Hasher, Stage, start_writeback, write_all
from contentdownload.transfer.digests import BodyHasher, ServerDigest
from contentdownload.transfer.locks import ByteLock, PartLock, epoch_lock
from contentdownload.transfer.urls import identity_url, redact_url
from contentdownload.transfer.validators import Overlap, OverlapMismatch, resume_start

log = get_logger("contentdownload.parts")
log_debug = debug_line("contentdownload.parts")  # per-job lines

Mode = Literal["durable", "plain"]
MODES: tuple[str, ...] = ("durable", "plain")
SIDECAR_VERSION = 2
#: Sidecar versions this code reads (version 1 lacks ``server_digests`` and ``boot_id``).
READABLE_VERSIONS = (1, 2)
FENCED_SUFFIX = ".fenced"
_HASH_BLOCK = 1 << 20
#: Bodies at least this large (or of unknown length) are hashed in a second thread.
THREADED_HASH_MIN = 8 << 20
#: Durable parts (at a level that fsyncs): the kernel is asked to start writing every so many bytes received
#: (see ``blocks.start_writeback``).
WRITEBACK_EVERY = 8 << 20
#: Size of the buffers :meth:`Part.receive` reads a ``readinto`` source into.
DEFAULT_BLOCK = 256 << 10
#: A fresh body no longer than this gets its sidecar only when it is interrupted:
#: complete, it is promoted at once; killed before that, it is fetched again.
LAZY_SIDECAR_MAX = 64 << 10

# -- test hooks -------------------------------------------------------------------------

_TEST_HOOKS: dict[str, Callable[..., None]] = {}


def set_test_hook(name: str, fn: Callable[..., None] | None) -> None:
    """Call ``fn(paths)`` at the named point of a promotion (``before_rename``); ``None`` removes it. Tests only."""
    if fn is None:
        _TEST_HOOKS.pop(name, None)
    else:
        _TEST_HOOKS[name] = fn


def _at(name: str, *args: Any) -> None:
    hook = _TEST_HOOKS.get(name)
    if hook is not None:
        hook(*args)


# -- the sidecar ------------------------------------------------------------------------


def url_identity(url: str) -> str:
    """The form of ``url`` a sidecar stores and compares: canonical, no credentials, no signature."""
    try:
        return identity_url(url)
    except UsageError:
        return redact_url(url)


def _optional(data: dict, name: str, kind: type) -> Any:
    value = data.get(name)
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool) and kind is int):
        raise ValueError(f"sidecar with a bad {name}")
    if kind is int and value is not None and value < 0:
        raise ValueError(f"sidecar with a bad {name}")
    return value


@attrs.frozen(kw_only=True)
class Sidecar:
    """What a part holds (the core's format, JSON, ``version`` 2).

    ``url``: :func:`url_identity` of the URL requested. ``committed``: bytes of the part
    known to be on disk (fsynced when the sidecar was written). ``etag`` /
    ``last_modified``: the validators of the response the bytes came from.
    ``expected_total``: the full size the server announced. ``content_encoding``: the
    response's content coding (``None`` for identity). ``resumable``: whether a Range
    request may continue the part. ``final_url``: where redirects led.
    ``last_modified_strong``: whether that date was a strong validator (the response's
    ``Date`` a second or more later). ``server_digests``: representation digests the server
    offered (``{"repr-digest:sha256": hex}``). ``boot_id``: the boot the bytes were written
    in (on the same boot, bytes past ``committed`` survived a process crash and may be
    resumed from, through the overlap check). ``updated``: Unix time of the write.
    """

    url: str
    committed: int
    etag: str | None = None
    last_modified: str | None = None
    expected_total: int | None = None
    content_encoding: str | None = None
    resumable: bool = True
    final_url: str | None = None
    last_modified_strong: bool = False
    server_digests: dict[str, str] = attrs.field(factory=dict)
    boot_id: str | None = None
    updated: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to disk."""
        return {"version": SIDECAR_VERSION, **attrs.asdict(self)}

    @classmethod
    def from_json(cls, data: Any) -> "Sidecar":
        """Parse a sidecar object; ``ValueError`` when it is not one this code reads."""
        if not isinstance(data, dict) or data.get("version") not in READABLE_VERSIONS:
            raise ValueError("not a sidecar of a known version")
        url, committed = data.get("url"), _optional(data, "committed", int)
        if not isinstance(url, str) or committed is None:
            raise ValueError("sidecar without a URL or a committed count")
        digests = data.get("server_digests") or {}
        if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
            raise ValueError("sidecar with bad server_digests")
        strings = {name: _optional(data, name, str) for name in ("etag", "last_modified", "content_encoding", "final_url", "boot_id")}
        return cls(url=url, committed=committed, expected_total=_optional(data, "expected_total", int),
                   resumable=bool(data.get("resumable", False)), updated=float(data.get("updated") or 0.0),
                   last_modified_strong=bool(data.get("last_modified_strong", False)),
                   server_digests=dict(digests), **strings)


def sidecar_path(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _sidecar_tmp(sidecar: Path) -> Path:
    return sidecar.with_name(sidecar.name + ".tmp")


def _write_sidecar(path: Path, sidecar: Sidecar, durable: bool, level: durability.Durability | None = None) -> None:
    """Write ``sidecar`` at ``path`` atomically; ``durable``: fsync it at ``level`` (this thread's when ``None``)."""
    data = json.dumps(attrs.evolve(sidecar, updated=time.time()).to_json(), sort_keys=True).encode("utf-8")
    tmp = _sidecar_tmp(path)
    fd = _open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        if durable:
            fh.flush()
            (level or durability.current()).sync(fh.fileno())
    os.replace(tmp, path)


def _remove_sidecar(path: Path) -> None:
    path.unlink(missing_ok=True)
    _sidecar_tmp(path).unlink(missing_ok=True)


def _drop_sidecar(path: Path) -> None:
    """Remove a promoted part's sidecar, if it had one (a short body never had: one ``lstat``, no failing ``unlink``).

    A ``.tmp`` left without its sidecar (a crash during the first write) is gc's.
    """
    if os.path.lexists(path):
        _remove_sidecar(path)


# -- files and folders ------------------------------------------------------------------


def _open_nofollow(path: Path, flags: int) -> int:
    try:
        return os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePathError(f"refusing to write through a symlink at {path}", "part_path_is_symlink") from None
        raise


def fsync_directory(path: Path, level: durability.Durability | None = None) -> None:
    """fsync a folder so the names created or renamed in it are durable (a no-op where unsupported, or at durability ``none``)."""
    (level or durability.current()).sync_folder(path)


def _kind(path: Path) -> str:
    """``missing``, ``link``, ``folder`` or ``file``: what is at ``path`` itself (a symlink is not followed)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return "missing"
    return "link" if stat.S_ISLNK(mode) else "folder" if stat.S_ISDIR(mode) else "file"


def check_staging(staging: Path, out: Path | None = None) -> None:
    """Refuse a staging folder that is a symlink (or sits under one), is not a folder, or is on another filesystem than ``out``."""
    for folder in (staging.parent, staging):
        kind = _kind(folder)
        if kind == "link":
            raise UnsafePathError(f"staging folder {folder} is a symlink: refusing to write through it", "staging_is_symlink")
        if kind == "file":
            raise UnsafePathError(f"staging folder {folder} is not a folder", "staging_not_folder")
    if out is not None and os.stat(staging).st_dev != os.stat(out).st_dev:
        raise StagingError(f"staging folder {staging} is on another filesystem than the output folder {out}: "
                           "the final rename would not be atomic")


def _check_final(final: Path) -> None:
    kind = _kind(final)
    if kind == "link":
        raise UnsafePathError(f"final path {final} is a symlink: not replacing it", "final_path_is_symlink")
    if kind == "folder":
        raise UnsafePathError(f"final path {final} is a folder", "final_path_is_folder")


def _make_parents(folder: Path, root: Path | None, durable: bool, level: durability.Durability) -> None:
    """Create ``folder`` below ``root`` one level at a time, refusing any symlink on the way.

    ``root`` itself (the output folder, resolved and checked when the run opened it) and
    the folders above it are not looked at.
    """
    if root is None or (folder != root and root not in folder.parents):
        chain = [folder]
    else:
        chain = [folder, *folder.parents][: len(folder.parents) - len(root.parents)][::-1]
    for current in chain:
        kind = _kind(current)
        if kind == "missing":
            try:
                os.mkdir(current)
            except FileExistsError:
                pass
            kind = _kind(current)
            if durable:
                fsync_directory(current.parent, level)
        if kind == "link":
            raise UnsafePathError(f"folder {current} of a final path is a symlink: refusing to write through it", "parent_is_symlink")
        if kind != "folder":
            raise UnsafePathError(f"{current} is not a folder", "parent_not_folder")


def hash_prefix(fd: int, length: int, *digests: Any) -> None:
    """Feed the first ``length`` bytes of the file ``fd`` to each of ``digests``; ``ValueError`` if it is shorter."""
    position = 0
    while position < length:
        block = os.pread(fd, min(_HASH_BLOCK, length - position), position)
        if not block:
            raise ValueError("part shorter than its committed bytes")
        for digest in digests:
            digest.update(block)
        position += len(block)


# -- a part -----------------------------------------------------------------------------


#: Fed to a part's writer thread: start a checkpoint once every byte before it is written.
_CHECKPOINT = memoryview(b"")


def _given_back(done: Callable[[], None] | None, outcome: "BodyOutcome") -> "BodyOutcome":
    """``outcome``, once ``done`` (the block not appended) is called."""
    if done is not None:
        done()
    return outcome


@attrs.frozen(kw_only=True)
class BodyOutcome:
    """How :meth:`Part.receive` ended: ``error`` (a transport error that stopped it), ``too_large``,
    or ``overlap_mismatch`` (the re-read bytes differ from the part's tail: the part was discarded)."""

    error: BaseException | None = None
    too_large: bool = False
    overlap_mismatch: bool = False


class Part:
    """One open part: ``append`` bytes (hashed), ``checkpoint``, then ``close`` or ``discard``.

    ``position`` is the part's length; ``sha256()`` the SHA-256 of the whole part (the
    prefix a resume continued from included). Built by :meth:`PartStore.open`.
    """

    def __init__(self, store: "PartStore", paths: StagePaths, fd: int, digest: Any, offset: int,
                 meta: Sidecar | None, threaded_hash: bool, overlap: Overlap | None = None):
        self.store, self.paths, self.meta = store, paths, meta
        self.fd: int | None = fd
        os.lseek(fd, offset, os.SEEK_SET)
        self.position = self._written = self._written_back = offset
        self.overlap = overlap
        self.body_digest: BodyHasher | None = None
        self.hasher = Hasher(digest, threaded_hash)
        self._writer: Stage | None = None
        self._checkpoint: threading.Thread | None = None
        self.durability = durability.current()  # also for the checkpoints' threads
        self.sidecar_on_disk = False
        self._checkpoint_error: BaseException | None = None

    @property
    def closed(self) -> bool:
        return self.fd is None

    def __enter__(self) -> "Part":
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.closed:
            self.close(sha=False)

    def append(self, data: bytes) -> int:
        """Write ``data`` at the end of the part and hash it; returns the bytes written.

        While an overlap is pending, the first bytes are compared with the part's tail
        instead of written (:class:`~contentdownload.transfer.validators.OverlapMismatch`
        when they differ).
        """
        data = self._past_overlap(data)
        self._write(data)
        return len(data)

    def _past_overlap(self, data: bytes | memoryview) -> bytes | memoryview:
        if self.body_digest is not None:
            self.body_digest.update(data)
        if self.overlap is not None and self.overlap.pending:
            return self.overlap.feed(data)
        return data

    def _write(self, data: bytes | memoryview, done: Callable[[], None] | None = None) -> None:
        """Append ``data``: written whole and hashed (``done`` once both are done), by the writer thread while one runs."""
        self.position += len(data)
        if self._writer is not None:
            self._writer.feed(data, done)
        else:
            self._put(data, done)

    def _write_step(self, data: bytes | memoryview, done: Callable[[], None] | None) -> None:
        """The writer thread's step: a block (see :meth:`_put`), or :data:`_CHECKPOINT` (see :meth:`checkpoint`)."""
        if data is _CHECKPOINT:
            self._start_checkpoint(self._written)
        else:
            self._put(data, done)

    def _put(self, data: bytes | memoryview, done: Callable[[], None] | None) -> None:
        """Write ``data`` at the end of the file, hand it to the hasher, start its writeback in durable mode (unless level ``none``)."""
        assert self.fd is not None
        write_all(self.fd, data)
        self._written += len(data)
        if self.store.durable and self.durability.syncs and self._written - self._written_back >= WRITEBACK_EVERY:
            start_writeback(self.fd, self._written_back, self._written - self._written_back)
            self._written_back = self._written
        self.hasher.feed(data, done)  # last: ``done`` is handed on only once nothing here can fail

    def check_body_digest(self, digests: tuple[ServerDigest, ...]) -> None:
        """Hash this response's body (overlap included) for its ``Content-Digest``; see :meth:`body_digest_mismatch`."""
        self.body_digest = BodyHasher(digests) if digests else None

    def body_digest_mismatch(self) -> ServerDigest | None:
        """The ``Content-Digest`` the body did not match, once the whole body was received."""
        return self.body_digest.mismatch() if self.body_digest is not None else None

    def receive(self, source: Callable[[], bytes] | Any, *, effects: Effects, progress: Callable[[int], None] | None = None,
                max_bytes: int | None = None, checkpoint_every: int | None = None,
                heartbeat: Callable[[], None] | None = None, errors: tuple[type[BaseException], ...] = (OSError,),
                block_size: int = DEFAULT_BLOCK) -> BodyOutcome:
        """Append the body from ``source`` until its end; checkpoint every ``checkpoint_every`` bytes (durable mode).

        ``source`` is a callable returning the next block (``b""`` at the end), or an object
        with ``readinto(buffer) -> int`` (such as :class:`~contentdownload.transfer.body.BodyReader`),
        which is read into a few reused buffers of ``block_size`` bytes. One of ``errors``
        ends it (returned, the bytes so far kept); a body past ``max_bytes`` ends it with
        ``too_large`` (the part discarded). ``effects`` and then ``progress`` are told of
        each block once it is checked and handed to the writer (``progress`` is the one
        place for a per-block callback: a progress bar, a rate limit, the lease). A big
        body (hashed in a thread) is also written by a thread of its own, so receiving,
        writing and hashing overlap; a write error (a full disk) is raised here, and every
        block handed over is in the file when this returns.
        """
        self._writer = Stage(self._write_step, self.hasher.thread is not None, "contentdownload-write")
        try:
            return self._receive(source, effects, progress, max_bytes, checkpoint_every, heartbeat, errors, block_size)
        finally:
            self.flush()

    def _receive(self, source: Any, effects: Effects, progress: Callable[[int], None] | None, max_bytes: int | None,
                 checkpoint_every: int | None, heartbeat: Callable[[], None] | None,
                 errors: tuple[type[BaseException], ...], block_size: int) -> BodyOutcome:
        pool = BufferPool(block_size) if hasattr(source, "readinto") else None
        since = 0
        while True:
            buffer = pool.take() if pool is not None else None
            try:
                data = source() if buffer is None else buffer[:source.readinto(buffer)]
            except errors as exc:
                return BodyOutcome(error=exc)
            if not data:
                return BodyOutcome()
            taken = self._take(data, effects, max_bytes, None if buffer is None else (lambda b=buffer: pool.give(b)))
            if isinstance(taken, BodyOutcome):
                return taken
            assert self._writer is not None
            self._writer.raise_error()
            if progress is not None:
                progress(taken)
            since += taken
            if checkpoint_every is not None and since >= checkpoint_every:
                self.checkpoint(background=True)
                since = 0
                if heartbeat is not None:
                    heartbeat()

    def take(self, data: bytes | memoryview, effects: Effects, max_bytes: int | None = None,
             done: Callable[[], None] | None = None) -> BodyOutcome | int:
        """Check, then append one received block, as :meth:`receive` does for each (for a caller reading the body itself).

        The bytes appended (``effects`` told), or the :class:`BodyOutcome` that ends the body
        (past ``max_bytes``, or an overlap mismatch: the part was discarded). ``done`` is
        called once nothing reads ``data`` any more (written and hashed, maybe later in the
        hash thread; at once when it is not appended), so the caller may reuse its buffer.
        A big body (hashed in a thread) is written by a thread of its own, started here: a
        write error is raised by a later call, and :meth:`flush` (or :meth:`close`) waits
        for every byte taken to be in the file. Without a ``done``, the bytes of a few
        blocks at most wait for the threads (this call blocks for the next).
        """
        if self._writer is None and self.hasher.thread is not None:
            self._writer = Stage(self._write_step, True, "contentdownload-write")
        taken = self._take(data, effects, max_bytes, done)
        if self._writer is not None:
            self._writer.raise_error()
        return taken

    def flush(self) -> None:
        """Wait until every byte taken is written (the writer thread, if any, ended); raises the write's error."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.stop()

    def _take(self, data: bytes | memoryview, effects: Effects, max_bytes: int | None,
              done: Callable[[], None] | None) -> BodyOutcome | int:
        """Check, then write one received block: the bytes appended (past the overlap), or a :class:`BodyOutcome` when the body must stop here."""
        if max_bytes is not None and self.position + len(data) - (self.overlap.pending if self.overlap else 0) > max_bytes:
            self.discard()
            return _given_back(done, BodyOutcome(too_large=True))
        try:
            data = self._past_overlap(data)
        except OverlapMismatch:
            log.warning("the bytes re-read before the resume offset differ: the origin changed", part=self.paths.part.name)
            self.discard()
            return _given_back(done, BodyOutcome(overlap_mismatch=True))
        effects.wrote(len(data))
        if data:
            self._write(data, done)
        elif done is not None:
            done()
        return len(data)

    def checkpoint(self, *, background: bool = False) -> None:
        """Make the bytes so far durable, then record their count in the sidecar (durable mode; plain: nothing to do).

        ``background``: fsync in a thread so the transfer goes on (skipped while one runs);
        with a writer thread, that thread starts it once the bytes so far are written, so
        this never waits for the writes.
        """
        if not self.store.durable or self.meta is None:
            return
        writer = self._writer
        if background and writer is not None and writer.thread is not None:
            writer.feed(_CHECKPOINT)
            return
        if writer is not None:
            writer.drain()  # every byte counted is in the file before it is synced
        if background:
            self._start_checkpoint(self._written)
            return
        self._wait_checkpoint()
        self._sync(self._written, durable=True)
        self._raise_checkpoint_error()

    def _start_checkpoint(self, position: int) -> None:
        """Sync the first ``position`` bytes (all written) and record them, in a thread; skipped while one runs."""
        if self._checkpoint is not None and self._checkpoint.is_alive():
            return
        self._wait_checkpoint()
        self._checkpoint = threading.Thread(target=self._sync, args=(position, True),
                                            name="contentdownload-checkpoint", daemon=True)
        self._checkpoint.start()

    def _sync(self, position: int, durable: bool) -> None:
        try:
            if durable:
                assert self.fd is not None
                self.durability.sync(self.fd)
            assert self.meta is not None
            _write_sidecar(self.paths.sidecar, attrs.evolve(self.meta, committed=position), durable, self.durability)
            self.sidecar_on_disk = True
        except BaseException as exc:  # reported by _raise_checkpoint_error
            self._checkpoint_error = exc

    def _wait_checkpoint(self) -> None:
        if self._checkpoint is not None:
            self._checkpoint.join()
            self._checkpoint = None

    def _raise_checkpoint_error(self) -> None:
        error, self._checkpoint_error = self._checkpoint_error, None
        if error is not None:
            raise error

    def _close_fd(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)

    def close(self, *, sha: bool = True, commit: bool = True) -> str | None:
        """Close the part (recording the count in the sidecar when ``commit``); the SHA-256 when ``sha``.

        A complete part is committed without an fsync: :meth:`PartStore.promote` makes it durable.
        """
        self.flush()
        self._wait_checkpoint()
        digest = self.hasher.hexdigest() if sha else (self.hasher.stop(), None)[1]
        if not self.closed:
            if commit and self.meta is not None and self.store.durable and self.sidecar_on_disk:
                self._sync(self.position, durable=False)
            self._close_fd()
        self._raise_checkpoint_error()
        return digest

    def abandon(self) -> None:
        """Stop after an interruption: make what was written durable and recorded, keep the part for a resume."""
        with contextlib.suppress(OSError):  # a failed write: what is in the file is recorded below
            self.flush()
        self.hasher.stop()
        if self.closed:
            return
        try:
            self.checkpoint()
        except OSError:
            pass  # the count recorded by the last checkpoint stays: what a resume trusts
        try:
            self._close_fd()
        except OSError:  # a failing disk may refuse the close too; the descriptor is released anyway
            pass

    def discard(self) -> None:
        """Close and delete the part and its sidecar."""
        with contextlib.suppress(OSError):  # discarded while receiving: let the writer finish with the file first
            self.flush()
        self._wait_checkpoint()
        self.hasher.stop()
        self._close_fd()
        self.store.discard(self.paths)


# -- promotion --------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class PromoteRequest:
    """A complete part to promote: its ``paths``, the ``job`` it must match, the transfer's
    ``size`` and ``sha256`` (``None``: computed), the ``lease`` checked right before the
    rename and the ``effects`` told of it. ``server_digests`` (``{"repr-digest:sha256":
    hex}``) must all match the part; ``expected`` is the content family its first bytes
    may not contradict (``None``: not checked); ``verified_by`` names checks already made.
    """

    paths: StagePaths
    job: Job
    size: int | None = None
    sha256: str | None = None
    lease: Lease = NO_LEASE
    effects: Effects = attrs.field(factory=Effects)
    server_digests: Mapping[str, str] = attrs.field(factory=dict)
    expected: str | None = None
    verified_by: tuple[str, ...] = ()

    @classmethod
    def of(cls, ctx: FinalizeContext) -> "PromoteRequest":
        """The request for a ``finalize`` context: the stream's digests, and the job's expected type unless any is accepted."""
        stream = ctx.stream
        expected = None if ctx.options.accept_any_content else content.expected_family(ctx.job.expected_type, ctx.paths.final.name, ctx.job.url)
        digests = stream.server_digests if stream.content_encoding is None else {}  # a digest covers the coded bytes
        return cls(paths=ctx.paths, job=ctx.job, size=stream.total_size, sha256=stream.sha256, lease=ctx.lease,
                   effects=ctx.effects, server_digests=dict(digests), expected=expected, verified_by=stream.verified_by)


@attrs.define
class _Promotion:
    request: PromoteRequest
    size: int | None = None
    sha256: str | None = None
    reason: str = ""
    error: BaseException | None = None
    verified_by: tuple[str, ...] = ()
    detected_type: str | None = None
    mtime_ns: int | None = None  # the part's, at the check (a rename keeps it)

    def result(self, durable: bool) -> FinalizeResult:
        checks = {"verified_by": self.verified_by, "detected_type": self.detected_type}
        if self.reason:
            return FinalizeResult(ok=False, size=self.size, sha256=self.sha256, reason=self.reason, **checks)
        return FinalizeResult(ok=True, path=self.request.paths.final, size=self.size, sha256=self.sha256, durable=durable,
                              mtime_ns=self.mtime_ns, **checks)


def _content_problem(fd: int, request: PromoteRequest, promotion: _Promotion) -> str:
    """Why the part's bytes are not what the job and the server say (``""`` when they are).

    The job's SHA-256, then every digest the server offered (algorithms other than SHA-256
    hash the file once more), then the first bytes against the expected content family.
    """
    assert promotion.sha256 is not None
    verified = list(request.verified_by)
    if request.job.sha256 is not None:
        if promotion.sha256 != request.job.sha256:
            return "sha256_mismatch"
        verified.append("sha256")
    wrong = _digest_mismatch(fd, request.server_digests, promotion.sha256)
    if wrong is not None:
        log.warning("the part does not match a digest the server sent", digest=wrong, final=str(request.paths.final))
        return "digest_mismatch"
    verified.extend(request.server_digests)
    promotion.verified_by = tuple(dict.fromkeys(verified))
    head = os.pread(fd, content.SNIFF_BYTES, 0)
    promotion.detected_type = content.detect(head)
    found = content.contradiction(request.expected, head, promotion.detected_type)
    if found is not None:
        promotion.detected_type = found
        log.warning("the body is not what the job expects", expected=request.expected, detected=found, final=str(request.paths.final))
        return "unexpected_content"
    return ""


def _digest_mismatch(fd: int, digests: Mapping[str, str], sha256: str) -> str | None:
    """The label of the first of ``digests`` (``{"repr-digest:sha256": hex}``) the file does not match."""
    algorithms = {label.rpartition(":")[2] for label in digests} - {"sha256"}
    actual = {name: hashlib.new(name) for name in algorithms}
    if actual:
        hash_prefix(fd, os.fstat(fd).st_size, *actual.values())
    values = {name: d.hexdigest() for name, d in actual.items()} | {"sha256": sha256}
    return next((label for label, value in digests.items() if values[label.rpartition(":")[2]] != value), None)


def _sha256_of(fd: int) -> str:
    digest = hashlib.sha256()
    hash_prefix(fd, os.fstat(fd).st_size, digest)
    return digest.hexdigest()


def _wait_for(lock: PartLock | ByteLock, key: str, cancel: threading.Event | None) -> None:
    """Acquire ``lock``, waiting while another process holds it (and giving up on ``cancel``)."""
    waited = False
    while True:
        if lock.acquire(0.0 if not waited else 0.2):
            return
        if not waited:
            log.info("another process is writing this job's part; waiting for it", job_key=key)
            waited = True
        if cancel is not None and cancel.is_set():
            raise Cancelled("the run was interrupted while waiting for another process's part")


# -- the store --------------------------------------------------------------------------


class PartStore:
    """Parts of one staging folder, in one mode (``durable`` or ``plain``).

    ``root`` is the output folder: final paths' parent folders are created and checked
    below it. Plugins get theirs from a context's paths with :meth:`for_paths`.
    """

    def __init__(self, staging: Path, *, mode: Mode = "durable", root: Path | None = None):
        if mode not in MODES:
            raise ValueError(f"unknown part store mode {mode!r}")
        self.staging, self.mode, self.root = Path(staging), mode, root

    @classmethod
    def for_paths(cls, paths: StagePaths, *, mode: Mode = "durable") -> "PartStore":
        return cls(paths.part.parent, mode=mode, root=paths.root)

    @property
    def durable(self) -> bool:
        return self.mode == "durable"

    # -- reading ------------------------------------------------------------------------

    def load_sidecar(self, paths: StagePaths) -> Sidecar:
        """The part's sidecar; ``FileNotFoundError`` when none, ``ValueError`` when corrupt or a symlink."""
        if os.path.islink(paths.sidecar):
            raise ValueError("sidecar is a symlink")
        try:
            data = json.loads(paths.sidecar.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"sidecar is not JSON: {exc}") from exc
        return Sidecar.from_json(data)

    def save_sidecar(self, paths: StagePaths, sidecar: Sidecar) -> None:
        """Write the part's sidecar atomically (fsynced in durable mode)."""
        _write_sidecar(paths.sidecar, sidecar, self.durable)

    @staticmethod
    def check_paths(paths: StagePaths) -> None:
        """Raise :class:`UnsafePathError` when the part or sidecar path is a planted symlink."""
        for path, reason in ((paths.part, "part_path_is_symlink"), (paths.sidecar, "sidecar_path_is_symlink")):
            if os.path.islink(path):
                raise UnsafePathError(f"staging path {path} is a symlink: refusing to write through it", reason)

    @staticmethod
    def part_size(paths: StagePaths) -> int | None:
        """The part's length (``None`` when there is no part; a symlink counts as none)."""
        if _kind(paths.part) != "file":
            return None
        return os.lstat(paths.part).st_size

    # -- writing ------------------------------------------------------------------------

    def open(self, paths: StagePaths, *, offset: int = 0, meta: Sidecar | None = None,
             expected_size: int | None = None) -> Part:
        """Open the part fresh (``offset`` 0) or to continue at ``offset`` (anything past it cut off).

        The prefix is hashed, so :meth:`Part.close` gives the whole file's SHA-256. A part
        continued at an offset expects the body to start at :func:`~contentdownload.transfer.validators.resume_start` ``(offset)``:
        the bytes before ``offset`` are compared with the part's tail, not written (see
        :meth:`Part.append`). In durable mode ``meta`` (with this boot's id; its
        ``committed`` is the count known to be fsynced) is written as the sidecar (for a
        fresh body of at most :data:`LAZY_SIDECAR_MAX` bytes only once it is interrupted or
        checkpointed: complete, it is promoted without ever having one); in plain
        mode any sidecar is removed. Raises :class:`UnsafePathError` for a planted
        symlink, ``ValueError`` when the part is shorter than ``offset``.
        """
        check_staging(self.staging)
        digest = hashlib.sha256()
        overlap = None
        if offset > 0:
            fd = _open_nofollow(paths.part, os.O_RDWR)
            try:
                hash_prefix(fd, offset, digest)
                os.ftruncate(fd, offset)
                overlap = Overlap(os.pread(fd, offset - resume_start(offset), resume_start(offset)))
            except BaseException:
                os.close(fd)
                raise
        else:
            self._forget_sidecar(paths)
            fd = _open_nofollow(paths.part, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        if not self.durable:
            meta = None
        remaining = None if expected_size is None else expected_size - offset
        lazy = offset == 0 and remaining is not None and remaining <= LAZY_SIDECAR_MAX
        if meta is not None:
            meta = attrs.evolve(meta, committed=min(meta.committed, offset), boot_id=boot_id())
            if not lazy:
                _write_sidecar(paths.sidecar, meta, durable=False)  # its count is already on disk
        part = Part(self, paths, fd, digest, offset, meta, threaded_hash=remaining is None or remaining >= THREADED_HASH_MIN,
                    overlap=overlap)
        part.sidecar_on_disk = meta is not None and not lazy
        return part

    def _forget_sidecar(self, paths: StagePaths) -> None:
        """Remove a sidecar that describes bytes about to be overwritten (durably, in durable mode)."""
        if not os.path.lexists(paths.sidecar):
            return
        _remove_sidecar(paths.sidecar)
        if self.durable:
            fsync_directory(paths.sidecar.parent)

    def truncate(self, paths: StagePaths, length: int) -> str:
        """Cut the part to ``length`` bytes; their SHA-256 (``ValueError`` when shorter)."""
        fd = _open_nofollow(paths.part, os.O_RDWR)
        try:
            digest = hashlib.sha256()
            hash_prefix(fd, length, digest)
            os.ftruncate(fd, length)
            return digest.hexdigest()
        finally:
            os.close(fd)

    def discard(self, paths: StagePaths) -> None:
        """Delete the part and its sidecar, if present (a symlink is removed, never followed)."""
        paths.part.unlink(missing_ok=True)
        _remove_sidecar(paths.sidecar)

    # -- ownership ----------------------------------------------------------------------

    def part_path(self, key: str, epoch: int) -> Path:
        return self.staging / f"{key}.{epoch}.part"

    def epoch_lock(self, key: str, epoch: int) -> PartLock | ByteLock:
        """The lock a worker holds on its epoch's part for the whole job."""
        return epoch_lock(self.staging, f"{key}.{epoch}")

    def older_parts(self, key: str, epoch: int) -> list[tuple[int, Path]]:
        """Parts of earlier epochs of ``key``, newest first (none before the first claim's epoch 1: the folder is not listed)."""
        found: list[tuple[int, Path]] = []
        if epoch <= 1:
            return found
        for path in self.staging.glob(f"{key}.*.part"):
            tag = path.name[len(key) + 1: -len(".part")]
            if tag.isdigit() and int(tag) < epoch:
                found.append((int(tag), path))
        return sorted(found, reverse=True)

    @contextlib.contextmanager
    def claim(self, key: str, epoch: int, cancel: threading.Event | None = None) -> Iterator[None]:
        """Hold epoch ``epoch`` of job ``key`` (its lock) and fence every older epoch's part first.

        The newest older part whose writer is gone (its lock can be taken) is adopted:
        renamed with its sidecar to this epoch's part path, so the transfer resumes. Any
        other older part is renamed to ``KEY.EPOCH.fenced`` (gc removes it later): its
        writer, alive but no longer the owner, then finds its part path gone and cannot
        promote it. The epoch's lock is held by someone else only when another process
        counts epochs apart from this one (each with a store of its own): then this waits.
        """
        lock = self.epoch_lock(key, epoch)
        _wait_for(lock, key, cancel)
        try:
            self._fence_older(key, epoch)
            yield
        finally:
            lock.release(remove=True)

    def claim_first(self, key: str, epoch: int) -> PartLock | ByteLock | None:
        """The lock of a first claim's epoch taken without waiting, or ``None`` (another holder has it, or older epochs may exist).

        A first claim has no older epoch to fence, so nothing here can block: an event loop
        may call it. On ``None``, :meth:`claim` does the whole claim (and waits). The lock is
        released with ``release(remove=True)``.
        """
        if epoch > 1:
            return None
        lock = self.epoch_lock(key, epoch)
        return lock if lock.acquire(0.0) else None

    @contextlib.contextmanager
    def exclusive(self, key: str, cancel: threading.Event | None = None) -> Iterator[None]:
        """Hold the one part of job ``key`` when there are no epochs (no leases, or no store).

        A second process on the same folder waits here until the first is done with the
        part (then finds the file finished, or resumes what it left), so a part never has
        two writers. The lock file stays: removing it could let a third process lock a new
        file while a waiter holds the old one.
        """
        lock = PartLock(self.staging / f"{key}.lock")
        _wait_for(lock, key, cancel)
        try:
            yield
        finally:
            lock.release()

    def _fence_older(self, key: str, epoch: int) -> None:
        own = self.part_path(key, epoch)
        for tag, part in self.older_parts(key, epoch):
            lock = self.epoch_lock(key, tag)
            if not lock.acquire(0.0):
                self._quarantine(part, key, tag)
                continue
            try:
                if os.path.lexists(own) or os.path.islink(part):
                    self._quarantine(part, key, tag)
                else:
                    self._adopt(part, own, key, tag, epoch)
            finally:
                lock.release(remove=True)

    def _adopt(self, part: Path, own: Path, key: str, tag: int, epoch: int) -> None:
        try:
            os.rename(part, own)
        except FileNotFoundError:
            return
        old_sidecar = sidecar_path(part)
        if os.path.lexists(old_sidecar) and not os.path.islink(old_sidecar):
            os.replace(old_sidecar, sidecar_path(own))
        log.info("resuming the part of an earlier attempt", job_key=key, from_epoch=tag, to_epoch=epoch)

    def _quarantine(self, part: Path, key: str, tag: int) -> None:
        try:
            os.rename(part, self.staging / f"{key}.{tag}{FENCED_SUFFIX}")
        except FileNotFoundError:
            return
        _remove_sidecar(sidecar_path(part))
        log.warning("fenced the part of an earlier owner of this job", job_key=key, epoch=tag)

    # -- promotion ----------------------------------------------------------------------

    def promote(self, request: PromoteRequest) -> FinalizeResult:
        """Check, fence and rename one part to its final path (see :meth:`promote_many`).

        The checks and the part's fsync run in the caller's thread; at durability
        ``batch`` (durable mode) the rename and the folder's fsync are the staging
        folder's committer's, shared with the jobs finishing at the same time
        (:mod:`~contentdownload.transfer.durability`). Raises
        :class:`~contentdownload.errors.LeaseLostError` when the job was taken over.
        """
        promotion = self._verify(request)
        level = durability.current()
        if not promotion.reason and self.durable and level.level == "batch":
            durability.committer((self.staging, self.root), lambda ready: self._commit(ready, level)).submit(promotion)
        elif not promotion.reason:
            self._commit([promotion], level)
        if promotion.error is not None:
            raise promotion.error
        return promotion.result(self.durable and level.syncs)

    async def promote_async(self, request: PromoteRequest) -> FinalizeResult:
        """:meth:`promote` for a caller on an event loop: no thread is held while the part waits for its batch.

        At durability ``batch`` (durable mode) the checks, the fsyncs and the renames of the
        parts finishing together are done by the staging folder's committer on this loop, in
        one executor call per batch (:meth:`promote_many`'s way); at any other level
        :meth:`promote` runs in the loop's executor. Raises what :meth:`promote` raises.
        """
        level = durability.current()
        loop = asyncio.get_running_loop()
        if not (self.durable and level.level == "batch"):
            return await loop.run_in_executor(None, contextvars.copy_context().run, self.promote, request)
        committer = durability.loop_committer((self.staging, self.root), lambda requests: self._promote_all(requests, level, counted=True))
        promotion = await committer.submit(request)
        if promotion.error is not None:
            raise promotion.error
        return promotion.result(level.syncs)

    def promote_many(self, requests: Iterable[PromoteRequest]) -> list[FinalizeResult]:
        """Promote many parts: check each, make them durable together, rename each, fsync each folder once.

        One result per request, in order; a part whose lease was lost gets ``lease_lost``. What a part's
        check or fsync raised is raised once the others are promoted.
        """
        level = durability.current()
        durable = self.durable and level.syncs
        promotions = self._promote_all(list(requests), level)
        failed = next((p.error for p in promotions if p.error is not None and p.reason != "lease_lost"), None)
        if failed is not None:
            raise failed
        return [p.result(durable) if p.error is None else FinalizeResult(ok=False, size=p.size, sha256=p.sha256, reason="lease_lost")
                for p in promotions]

    def _promote_all(self, requests: Sequence[PromoteRequest], level: durability.Durability, *,
                     counted: bool = False) -> list[_Promotion]:
        """Check every part, fsync the good ones together (durable mode), then :meth:`_commit` them
        (``counted``: as a batch of the committers, :func:`~contentdownload.transfer.durability.commit_batches`).

        What one part's check or fsync raised is that promotion's ``error``; the others go on.
        """
        checked = [self._check_one(request) for request in requests]
        try:
            opened = [(promotion, fd) for promotion, fd in checked if fd is not None]
            if self.durable:
                for (promotion, _), error in zip(opened, level.sync_all([fd for _, fd in opened])):
                    promotion.error = error
        finally:
            for _, fd in checked:
                if fd is not None:
                    os.close(fd)
        promotions = [promotion for promotion, _ in checked]
        ready = [p for p in promotions if not p.reason and p.error is None]
        if counted and ready:
            durability.count_batch(len(ready))
        self._commit(ready, level)
        return promotions

    def _check_one(self, request: PromoteRequest) -> tuple[_Promotion, int | None]:
        """:meth:`_check`, what it raised kept as the promotion's ``error``."""
        try:
            return self._check(request)
        except Exception as exc:
            promotion = _Promotion(request)
            promotion.error = exc
            return promotion, None

    def _commit(self, ready: list[_Promotion], level: durability.Durability) -> list[_Promotion]:
        """Rename each verified part (fenced), fsync each folder once (durable mode), drop the sidecars.

        The leases of the batch are asserted together right before its renames (one store
        transaction for a job store's leases); a lost one's part is not renamed.
        """
        folders: dict[Path, None] = {}
        lost = lost_leases(promotion.request.lease for promotion in ready)
        for promotion in ready:
            if self._rename(promotion, level, held=promotion.request.lease not in lost):
                folders[promotion.request.paths.final.parent] = None
        if self.durable:
            for folder in folders:
                fsync_directory(folder, level)
        for promotion in ready:
            if not promotion.reason:
                _drop_sidecar(promotion.request.paths.sidecar)
                log_debug("promoted", final=str(promotion.request.paths.final), size=promotion.size, sha256=promotion.sha256)
        return ready

    def _verify(self, request: PromoteRequest) -> _Promotion:
        """:meth:`_check` the part and, in durable mode, fsync it."""
        promotion, fd = self._check(request)
        if fd is not None:
            try:
                if self.durable:
                    durability.current().sync(fd)
            finally:
                os.close(fd)
        return promotion

    def _check(self, request: PromoteRequest) -> tuple[_Promotion, int | None]:
        """Size, SHA-256, server digests and content type against the transfer and the job: the promotion and,
        when they match, the part still open (the caller closes it); a mismatch discards the part."""
        paths, promotion = request.paths, _Promotion(request)
        try:
            fd = _open_nofollow(paths.part, os.O_RDONLY)
        except FileNotFoundError:
            promotion.reason = "part_missing"
            return promotion, None
        except UnsafePathError as exc:
            promotion.reason = exc.reason
            return promotion, None
        try:
            st = os.fstat(fd)
            promotion.size, promotion.mtime_ns = st.st_size, st.st_mtime_ns
            promotion.reason = self._size_problem(request, promotion.size)
            if not promotion.reason:
                promotion.sha256 = request.sha256 or _sha256_of(fd)
                promotion.reason = _content_problem(fd, request, promotion)
        except BaseException:
            os.close(fd)
            raise
        if not promotion.reason:
            return promotion, fd
        os.close(fd)
        self.discard(paths)
        log.warning("part not promoted", final=str(paths.final), reason=promotion.reason, size=promotion.size, sha256=promotion.sha256)
        return promotion, None

    @staticmethod
    def _size_problem(request: PromoteRequest, size: int) -> str:
        if request.size is not None and size != request.size:
            return "part_changed"
        if request.job.size is not None and size != request.job.size:
            return "size_mismatch"
        return ""

    def _rename(self, promotion: _Promotion, level: durability.Durability, *, held: bool) -> bool:
        """The fenced rename: parents checked, then (the lease ``held``) rename from the epoch's own part path."""
        request = promotion.request
        paths = request.paths
        try:
            _make_parents(paths.final.parent, self.root, self.durable, level)
            _check_final(paths.final)
        except UnsafePathError as exc:
            log.error("final path refused", final=str(paths.final), reason=exc.reason, error=str(exc))
            promotion.reason = exc.reason
            return False
        try:
            if not held:
                raise LeaseLostError(f"the lease of {paths.final.name} was taken over; not promoted")
            _at("before_rename", paths)
            os.rename(paths.part, paths.final)
        except LeaseLostError as exc:
            promotion.reason, promotion.error = "lease_lost", exc
            return False
        except FileNotFoundError:
            return self._part_gone(promotion)
        except OSError as exc:
            disk = DiskError.of(exc)
            if disk is not None:  # the run stops; the part stays for the rerun
                raise disk from exc
            log.error("cannot move the part into place", final=str(paths.final), error=str(exc))
            promotion.reason = "rename_failed"
            return False
        request.effects.mark_renamed()
        return True

    def _part_gone(self, promotion: _Promotion) -> bool:
        """The part path vanished between the checks and the rename: a newer owner fenced it."""
        request = promotion.request
        promotion.reason = "lease_lost" if request.lease is not NO_LEASE else "part_missing"
        if request.lease is not NO_LEASE:
            promotion.error = LeaseLostError(f"part {request.paths.part.name} was fenced by a newer owner of the job; not promoted")
        log.warning("part gone at the rename, not promoted", part=str(request.paths.part), reason=promotion.reason)
        return False
