"""Test helpers shipped with the package, for the project's own tests and for plugin authors.

- :class:`LoopbackServer` and :class:`Fault` (``contentdownload.testing.server``): a real
  HTTP/1.1 server on loopback with validators, ranges, conditional requests, gzip,
  redirects and faults on demand, counting what went on the wire.
- ``contentdownload.testing.conformance``: the contract checks the built-in plugins pass,
  runnable against any plugin (``job_key`` checks in ``contentdownload.testing.jobkeys``;
  ``contentdownload.testing.probe`` sees what each ``stream_io`` call did).
- ``contentdownload.testing.pg``: a throwaway PostgreSQL from ``initdb``/``pg_ctl``.
- :func:`capture_events`: the structlog events logged inside a ``with`` block.
"""

from __future__ import annotations

from typing import Any

from structlog.testing import capture_logs as capture_events

__all__ = ["LoopbackServer", "Fault", "capture_events"]


def __getattr__(name: str) -> Any:
    if name in ("LoopbackServer", "Fault"):
        from contentdownload.testing import server

        return getattr(server, name)
    raise AttributeError(name)
