"""Entry point of the ``streaming`` plugin: one hook implementation per module."""

from .fast import stream_io_async
from .finalize import finalize, finalize_async
from .job_key import job_key
from .resume import resume_decision
from .stream import stream_io

__all__ = ["job_key", "resume_decision", "stream_io", "stream_io_async", "finalize", "finalize_async"]
