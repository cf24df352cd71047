"""Per-job DEBUG lines: logged through structlog when DEBUG is on, only counted when it is off."""

from __future__ import annotations

import logging

from contentdownload.records.log import EVENTS, debug_line


class _Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_debug_line_is_logged_at_debug_and_counted_either_way():
    logger = logging.getLogger("contentdownload.test_debug_line")
    kept, level = _Kept(), logger.level
    logger.addHandler(kept)
    line = debug_line("contentdownload.test_debug_line")
    try:
        logger.setLevel(logging.INFO)
        before = EVENTS.get("a_job_line")
        line("a_job_line", job_key="k1")
        assert kept.records == [] and EVENTS.get("a_job_line") == before + 1
        logger.setLevel(logging.DEBUG)
        line("a_job_line", job_key="k2")
        assert len(kept.records) == 1 and kept.records[0].msg["job_key"] == "k2"
        assert EVENTS.get("a_job_line") == before + 2
    finally:
        logger.removeHandler(kept)
        logger.setLevel(level)


def test_under_another_structlog_configuration_a_debug_line_is_logged_as_any_line():
    from structlog.testing import capture_logs

    logger = logging.getLogger("contentdownload.test_debug_line")
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        with capture_logs() as captured:
            debug_line("contentdownload.test_debug_line")("a_captured_line", job_key="k3")
    finally:
        logger.setLevel(level)
    assert [(e["event"], e["job_key"], e["log_level"]) for e in captured] == [("a_captured_line", "k3", "debug")]
