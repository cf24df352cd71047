"""Files on disk: their SHA-256, and whether one is still the file a record describes.

Shared by the core and the plugins, so that every stage judges a file the same way.
"""

from __future__ import annotations

import hashlib
from pathlib import Path



def sha256_file(path: Path) -> str:
    """The SHA-256 (lowercase hex) of the file at ``path``."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def file_matches(path: Path, size: int | None, sha256: str | None, mtime_ns: int | None = None) -> bool:
    """Whether the file at ``path`` is the recorded one: same size, and same mtime or same SHA-256.

    With ``mtime_ns`` unknown the SHA-256 decides; with neither known, size alone does.
    """
    try:
        st = Path(path).stat()
    except OSError:
        return False
    if size is not None and st.st_size != size:
        return False
    if mtime_ns is not None and st.st_mtime_ns == mtime_ns:
        return True
    return sha256 is None or sha256_file(Path(path)) == sha256.lower()
