"""Entry point of the ``legacy`` plugin: one hook implementation per module."""

from .job_key import job_key

__all__ = ["job_key"]
