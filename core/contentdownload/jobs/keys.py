"""Deterministic keys: job identity, operation keys and the canary bucket."""

from __future__ import annotations

import functools
import hashlib
import json

from contentdownload.hooks.model import Job
from contentdownload.transfer.urls import identity_url

IDENTITY_VERSION = 1


@functools.lru_cache(maxsize=1 << 12)  # a page of planning (the planner, then the job_key plugin); not a whole list
def identity_key(job: Job) -> tuple[str, str]:
    """The content identity of a job: ``(hex SHA-256, canonical URL)``.

    SHA-256 of canonical JSON (sorted keys, no spaces) of ``{version, work_id,
    artifact_id, url}`` where ``url`` is the identity form of the first candidate URL
    (:func:`~contentdownload.transfer.urls.identity_url`: canonical, no credentials, no signing
    parameters).
    This is the ``streaming`` plugin's job key and what the canary bucket hashes, so it
    is the same in every process and run.
    """
    url = identity_url(job.url)
    payload = {
        "artifact_id": job.artifact_id,
        "url": url,
        "version": IDENTITY_VERSION,
        "work_id": job.work_id,
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest(), url


def path_key(relative_path: str) -> str:
    """The ``legacy`` job key: SHA-256 of the output path relative to the output folder."""
    normalised = relative_path.replace("\\", "/").lstrip("/")
    return hashlib.sha256(f"legacy-v1:{normalised}".encode("utf-8")).hexdigest()


def operation_key(job_key: str, operation: str) -> str:
    """The ledger key of one side effect (``transfer``, ``finalize``, ``manifest``) of a job."""
    return hashlib.sha256(f"{job_key}:{operation}".encode("utf-8")).hexdigest()[:32]


def canary_fraction(key: str) -> float:
    """Map a key to a stable number in [0, 1); a job is in the canary when it is below the ratio."""
    digest = hashlib.sha256(f"canary:{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64
