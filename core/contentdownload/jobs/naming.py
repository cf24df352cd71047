"""Output file names: from the job, else the URL path, else the job's key.

Names are sanitised so that nothing escapes the output folder: no separators, no
``..``, no control characters, no reserved device names, no hidden names (which could
collide with the product's own ``.contentdownload`` folder), bounded length. Two
different jobs that want the same name get a deterministic suffix from their identity;
the job met first keeps the plain name, and a name recorded by an earlier run stays
with its job.
"""

from __future__ import annotations

import posixpath
import re
import unicodedata
from typing import Iterable, Mapping, Sequence
from urllib.parse import unquote, urlsplit

from contentdownload.hooks.model import Job

MAX_NAME_BYTES = 200
#: Names the output folder uses itself.
RESERVED_TOP_LEVEL = frozenset({"manifest.jsonl", "manifest.metrics.json", "logs"})
_WINDOWS_RESERVED = frozenset({"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))})
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f/\\:*?\"<>|]")


def _truncate_utf8(text: str, limit: int) -> str:
    encoded = text.encode("utf-8")
    if len(encoded) <= limit:
        return text
    return encoded[:limit].decode("utf-8", "ignore")


def sanitize_name(name: str, max_bytes: int = MAX_NAME_BYTES) -> str:
    """A safe single path component for ``name``, or ``""`` when nothing usable is left."""
    name = unicodedata.normalize("NFC", name)
    name = _UNSAFE.sub("_", name)
    name = "".join(ch for ch in name if unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co"))
    name = name.strip().rstrip(". ")
    if not name or set(name) <= {".", "_", " "}:
        return ""
    if name.startswith("."):
        name = "_" + name.lstrip(".")
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem or len(ext) > 16:
        stem, dot, ext = name, "", ""
    if stem.lower().split(".")[0] in _WINDOWS_RESERVED:
        stem = "_" + stem
    ext_part = f".{ext}" if dot else ""
    stem = _truncate_utf8(stem, max_bytes - len(ext_part.encode("utf-8")))
    return (stem.rstrip(". ") or "_") + ext_part


def name_from_url(url: str) -> str:
    """The last path segment of ``url``, percent-decoded and sanitised (``""`` when there is none)."""
    path = urlsplit(url).path
    segment = posixpath.basename(path.rstrip("/")) if path else ""
    return sanitize_name(unquote(segment))


def base_name(job: Job, identity: str) -> str:
    """The name a job asks for: its ``filename``, else its URL's last segment, else one from its key."""
    for candidate in (job.filename, job.url):
        if not candidate:
            continue
        name = sanitize_name(candidate) if candidate is job.filename else name_from_url(candidate)
        if name:
            if name.lower() in RESERVED_TOP_LEVEL:
                name = with_suffix(name, identity)
            return name
    return f"download-{identity[:16]}"


def with_suffix(name: str, identity: str) -> str:
    """``name`` with ``-<8 hex of identity>`` before its extension, still within the length bound."""
    tag = f"-{identity[:8]}"
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        stem, ext = name, ""
    ext_part = f".{ext}" if ext else ""
    stem = _truncate_utf8(stem, MAX_NAME_BYTES - len(tag) - len(ext_part.encode("utf-8")))
    return f"{stem}{tag}{ext_part}"


FOREIGN = "(a file no job recorded)"


class NameOwners:
    """Which identity holds each output name, compared case-insensitively (safe on case-insensitive
    filesystems). Built from recorded names and the names of foreign files; a subclass may look
    further (the job store, the folder) for names it was not given."""

    def __init__(self, recorded: Mapping[str, str] | None = None, taken: Iterable[str] = ()):
        self._owner: dict[str, str] = {}  # casefolded name -> identity
        for identity, name in (recorded or {}).items():
            self._owner.setdefault(name.casefold(), identity)
        for name in taken:
            self._owner.setdefault(name.casefold(), FOREIGN)

    def owner(self, name: str) -> str | None:
        """The identity holding ``name`` (:data:`FOREIGN` for a file no job recorded), or ``None``."""
        return self._owner.get(name.casefold())

    def take(self, name: str, identity: str) -> None:
        self._owner[name.casefold()] = identity


def plan_names(jobs: Sequence[tuple[Job, str]], recorded: Mapping[str, str] | None = None,
               taken: Iterable[str] = (), owners: NameOwners | None = None) -> list[str]:
    """One output name per ``(job, identity)``, unique across different identities.

    ``recorded`` maps identities to names an earlier run gave them; those are kept.
    ``taken`` are names of files already in the folder that no identity recorded: no
    job gets them. ``owners`` (default: built from ``recorded`` and ``taken``) says who
    holds a name. The same identity always gets the same name.
    """
    recorded = recorded or {}
    owners = owners if owners is not None else NameOwners(recorded, taken)
    by_identity: dict[str, str] = {}
    out: list[str] = []
    for job, identity in jobs:
        if identity in by_identity:
            out.append(by_identity[identity])
            continue
        name = recorded.get(identity) or base_name(job, identity)
        holder = owners.owner(name)
        if holder is not None and holder != identity:
            name = with_suffix(name, identity)
            n = 1
            while (owners.owner(name) or identity) != identity:
                name = with_suffix(base_name(job, identity), f"{identity[: 8 - len(str(n))]}{n}")
                n += 1
        owners.take(name, identity)
        by_identity[identity] = name
        out.append(name)
    return out
