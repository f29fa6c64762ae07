"""Fixtures shared by the test modules."""

from __future__ import annotations

import logging
from typing import Iterator, List

import pytest

from luafcgid.log import log


@pytest.fixture
def log_lines() -> Iterator[List[str]]:
    """Messages logged by luafcgid (in this process) while the test runs."""
    lines: List[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = Collect()
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    yield lines
    log.removeHandler(handler)
    log.setLevel(level)
