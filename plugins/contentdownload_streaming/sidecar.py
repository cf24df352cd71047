"""The part's sidecar: a small JSON file next to ``KEY.part`` that says what the part holds.

It records the URL the bytes came from, the validators the server sent with them
(``ETag``, ``Last-Modified``), the full size announced, the content coding, and the
*committed* byte count: how many bytes of the part were on disk (fsynced) when the
sidecar was written. A resume continues from the committed count, never from the part's
size, so bytes written after the last checkpoint of a crashed process are not trusted.

The file is replaced atomically (temporary file, fsync, ``os.replace``), so it is either
the old or the new version, never a mix.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import attrs

from contentdownload.errors import UsageError
from contentdownload.transfer.urls import identity_url, redact_url

SIDECAR_VERSION = 1


def url_identity(url: str) -> str:
    """The form of ``url`` a sidecar stores and compares: canonical, no credentials, no signature."""
    try:
        return identity_url(url)
    except UsageError:
        return redact_url(url)


@attrs.frozen
class Sidecar:
    """What a part holds.

    ``url``: :func:`url_identity` of the URL requested. ``etag`` / ``last_modified``:
    the validators of the response the bytes came from. ``expected_total``: the full
    size the server announced, when known. ``committed``: bytes of the part known to be
    on disk. ``content_encoding``: the response's content coding (``None`` for identity).
    ``resumable``: whether a Range request may continue the part (false for decoded
    bodies and servers that said ``Accept-Ranges: none``). ``final_url``: where redirects
    led. ``updated``: Unix time of the last write.
    """

    url: str
    committed: int
    etag: str | None = None
    last_modified: str | None = None
    expected_total: int | None = None
    content_encoding: str | None = None
    resumable: bool = True
    final_url: str | None = None
    updated: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to disk."""
        return {"version": SIDECAR_VERSION, **attrs.asdict(self)}

    @classmethod
    def from_json(cls, data: Any) -> "Sidecar":
        """Parse a sidecar object; raises ``ValueError`` when it is not one this version wrote."""
        if not isinstance(data, dict) or data.get("version") != SIDECAR_VERSION:
            raise ValueError("not a version 1 sidecar")
        url, committed = data.get("url"), data.get("committed")
        if not isinstance(url, str) or not isinstance(committed, int) or isinstance(committed, bool) or committed < 0:
            raise ValueError("sidecar without a URL or a committed count")
        total = data.get("expected_total")
        if total is not None and (not isinstance(total, int) or isinstance(total, bool) or total < 0):
            raise ValueError("sidecar with a bad expected_total")
        optional = {}
        for name in ("etag", "last_modified", "content_encoding", "final_url"):
            value = data.get(name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"sidecar with a bad {name}")
            optional[name] = value
        return cls(
            url=url,
            committed=committed,
            expected_total=total,
            resumable=bool(data.get("resumable", False)),
            updated=float(data.get("updated") or 0.0),
            **optional,
        )


def load(path: Path) -> Sidecar:
    """Read a sidecar; ``FileNotFoundError`` when there is none, ``ValueError`` when it is corrupt."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError("sidecar is not UTF-8") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"sidecar is not JSON: {exc}") from exc
    return Sidecar.from_json(data)


def save(path: Path, sidecar: Sidecar, *, durable: bool = True) -> None:
    """Write ``sidecar`` atomically (fsynced before the rename when ``durable``)."""
    sidecar = attrs.evolve(sidecar, updated=time.time())
    tmp = path.with_name(path.name + ".tmp")
    data = json.dumps(sidecar.to_json(), sort_keys=True).encode("utf-8")
    with open(tmp, "wb") as fh:
        fh.write(data)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)


def remove(path: Path) -> None:
    """Delete a sidecar (and a leftover temporary file) if present."""
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".tmp").unlink(missing_ok=True)
