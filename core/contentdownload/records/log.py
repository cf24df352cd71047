"""Structured logging: structlog on top of the standard library's logging.

Library code logs through :func:`get_logger`. Without :func:`configure_logging` the
events go to the ``contentdownload`` stdlib logger, so a host program's logging setup
decides where they end up. The CLI calls :func:`configure_logging` to write JSON lines
to ``DIR/logs/download.log`` and warnings to stderr.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import structlog

LOGGER_NAME = "contentdownload"

_SHARED_PROCESSORS: list = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]

_handlers: list[logging.Handler] = []


class EventCounter:
    """A structlog processor counting events by name (for metrics such as decisions logged)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()

    def __call__(self, logger: object, method: str, event: dict) -> dict:
        with self._lock:
            self.counts[str(event.get("event"))] += 1
        return event

    def count(self, name: str) -> None:
        """Count an event that was not logged (see :func:`debug_line`)."""
        with self._lock:
            self.counts[name] += 1

    def get(self, name: str) -> int:
        with self._lock:
            return self.counts[name]


#: Counts every event logged through contentdownload's loggers since import.
EVENTS = EventCounter()


def _configure_structlog() -> None:
    structlog.configure(
        # EVENTS counts before the level filter: metrics must not depend on the log level.
        processors=[EVENTS, structlog.stdlib.filter_by_level, *_SHARED_PROCESSORS, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


if not structlog.is_configured():
    _configure_structlog()


def get_logger(name: str = LOGGER_NAME) -> structlog.stdlib.BoundLogger:
    """A structlog logger under the ``contentdownload`` stdlib logger."""
    return structlog.get_logger(_full_name(name))


def _full_name(name: str) -> str:
    return name if name.startswith(LOGGER_NAME) else f"{LOGGER_NAME}.{name}"


def debug_line(name: str) -> Callable[..., None]:
    """``debug(event, **fields)`` for logger ``name``'s per-job DEBUG lines. Under contentdownload's own structlog
    configuration, while the standard library logger does not take DEBUG, the event is only counted
    (:data:`EVENTS`), at a fraction of the cost of a line the level filter drops; under any other
    configuration (a host program's, ``structlog.testing.capture_logs``) it is logged as any line is."""
    logger, stdlib = get_logger(name), logging.getLogger(_full_name(name))

    def debug(event: str, **fields: Any) -> None:
        if stdlib.isEnabledFor(logging.DEBUG) or not _counts_then_filters(structlog.get_config()["processors"]):
            logger.debug(event, **fields)
        else:
            EVENTS.count(event)

    return debug


def _counts_then_filters(processors: list) -> bool:
    """Whether a chain starts as contentdownload's does (EVENTS, then the level filter): a line below the level is only counted."""
    return len(processors) >= 2 and processors[0] is EVENTS and processors[1] is structlog.stdlib.filter_by_level


class _NoFollowFileHandler(logging.FileHandler):
    """A file handler that refuses to open its file through a symlink.

    When the file cannot take a line (a full or read-only disk), stderr gets one line
    saying so, instead of logging's traceback per record, and later records are dropped.
    """

    failed = False

    def _open(self):  # noqa: ANN202 (logging's hook)
        from contentdownload.records.guard import NOFOLLOW

        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT | NOFOLLOW, 0o644)
        return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's hook)
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            self._give_up(error)
        else:  # a record that cannot be formatted: logging's own report
            super().handleError(record)

    def close(self) -> None:
        try:
            super().close()  # flushes what is buffered
        except OSError as exc:
            self._give_up(exc)

    def _give_up(self, exc: OSError) -> None:
        if self.failed:
            return
        self.failed = True
        detail = exc.strerror or f"{type(exc).__name__}: {exc}"
        sys.stderr.write(f"contentdownload: cannot write the log file {self.baseFilename}: {detail}; later log lines are not written\n")
        sys.stderr.flush()


def configure_logging(level: str = "INFO", log_file: Path | None = None, stderr_level: str = "WARNING") -> None:
    """Send events as JSON lines to ``log_file`` (at ``level``) and as plain text to stderr (at ``stderr_level``)."""
    _configure_structlog()
    root = logging.getLogger(LOGGER_NAME)
    for handler in _handlers:
        root.removeHandler(handler)
        handler.close()
    _handlers.clear()
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        from contentdownload.errors import UsageError

        raise UsageError(f"unknown log level {level!r}: use DEBUG, INFO, WARNING or ERROR")
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = _NoFollowFileHandler(log_file, encoding="utf-8")
        file_handler.setLevel(numeric)
        file_handler.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, structlog.processors.format_exc_info, structlog.processors.JSONRenderer(sort_keys=True)],
                foreign_pre_chain=_SHARED_PROCESSORS,
            )
        )
        _handlers.append(file_handler)
    stderr = logging.StreamHandler()
    stderr.setLevel(max(numeric, logging.getLevelName(stderr_level.upper())))
    stderr.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, structlog.dev.ConsoleRenderer(colors=False)],
            foreign_pre_chain=_SHARED_PROCESSORS,
        )
    )
    _handlers.append(stderr)
    for handler in _handlers:
        root.addHandler(handler)
    root.setLevel(numeric)
    root.propagate = False


def log_traceback(message: str, exc: BaseException) -> None:
    """Write ``exc`` with its traceback to the log file only (never to stderr)."""
    root = logging.getLogger(LOGGER_NAME)
    record = root.makeRecord(root.name, logging.ERROR, __file__, 0, message, (), (type(exc), exc, exc.__traceback__))
    for handler in _handlers:
        if isinstance(handler, _NoFollowFileHandler):
            handler.handle(record)


def close_logging() -> None:
    """Flush and detach the handlers :func:`configure_logging` added, and give the package's logger back
    to the host's logging (its level unset, its records propagated again)."""
    root = logging.getLogger(LOGGER_NAME)
    for handler in _handlers:
        root.removeHandler(handler)
        handler.close()
    _handlers.clear()
    root.setLevel(logging.NOTSET)
    root.propagate = True
