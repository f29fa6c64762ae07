"""Fixtures shared by the test modules."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterator, List

import pytest

from luafcgid.log import log
from tests.lua_site import LuaSite, lua_sites


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


@pytest.fixture
def make_lua_site(tmp_path: Path) -> Iterator[Callable[..., LuaSite]]:
    """``make_lua_site(lua="5.4", **settings)``: an in-process LuaSite on tmp_path with those
    settings (no server); closed after the test."""
    yield from lua_sites(tmp_path)
