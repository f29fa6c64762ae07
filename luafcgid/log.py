"""Error log: one line per event, with time, pid and level.

The master and every worker write to the same file (``logfile`` in the config,
stderr when unset). Opening in append mode keeps lines from different processes
whole; USR1 calls :func:`reopen` so logrotate's move-then-signal pattern works.
"""

from __future__ import annotations

import logging
import sys
from typing import Optional

LOGGER_NAME = "luafcgid"
LINE_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(message)s"
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "notice": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

log = logging.getLogger(LOGGER_NAME)
log.propagate = False


def setup(logfile: Optional[str] = None, level: str = "info") -> None:
    """Send the luafcgid log to ``logfile`` (stderr when None) at ``level``."""
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    if logfile:
        handler: logging.Handler = logging.FileHandler(logfile, mode="a", encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LINE_FORMAT))
    log.addHandler(handler)
    log.setLevel(LEVELS.get(level.lower(), logging.INFO))


def reopen() -> None:
    """Reopen the log file (USR1), so a rotated file is let go."""
    for handler in log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.acquire()
            try:
                handler.close()
                handler.stream = handler._open()
            finally:
                handler.release()
