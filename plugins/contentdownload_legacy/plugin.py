"""Entry point of the ``legacy`` plugin: one hook implementation per module."""

from .finalize import finalize
from .job_key import job_key
from .resume import resume_decision
from .stream import stream_io

__all__ = ["job_key", "resume_decision", "stream_io", "finalize"]
