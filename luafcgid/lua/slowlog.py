"""The slow log (``slowlog``, ``slowlog_timeout``): one entry per request that runs too long.

The Lua watchdog (``prelude.lua``) takes the traceback inside the running state when a
request passes ``slowlog_timeout`` and calls :func:`record`; the request keeps running.
Entries go to the ``luafcgid.slow`` logger: to the ``slowlog`` file when one is set, else
to the error log, whose own line format already carries the time and the pid. The file
handler is a ``WatchedFileHandler``: it reopens the file when logrotate moved it, with no
signal needed (entries are rare, so its stat per entry is free).

A request stuck in a C call (``os.execute``) runs no Lua hook, so no traceback can be
taken: the master, which kills such a worker, writes that entry (:func:`record_killed`).
"""

from __future__ import annotations

import itertools
import logging
import logging.handlers
import os
from typing import Optional

from luafcgid.log import log

slow_log = logging.getLogger("luafcgid.slow")
# The time and the pid of the worker that ran the request (the master writes some entries).
ENTRY_FORMAT = "%(asctime)s [pid %(worker_pid)d] %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
# Entries recorded by this process (next() on a count is atomic: threads share it).
_entries = itertools.count()
_recorded = 0


def recorded() -> int:
    """How many slow requests this process has logged (the status page's figure)."""
    return _recorded


def open_log(path: Optional[str]) -> None:
    """Send slow log entries to ``path``; None: to the error log."""
    for handler in list(slow_log.handlers):
        slow_log.removeHandler(handler)
        handler.close()
    slow_log.setLevel(logging.WARNING)
    slow_log.propagate = True
    if path is None:
        return
    try:
        handler = logging.handlers.WatchedFileHandler(path, mode="a", encoding="utf-8")
    except OSError as error:
        # A worker that cannot write its slow log still serves.
        log.error("cannot open the slow log %s (%s): slow requests go to the error log; "
                  "check the path and that the workers' user may write it", path,
                  error.strerror)
        return
    handler.setFormatter(logging.Formatter(ENTRY_FORMAT, DATE_FORMAT))
    slow_log.addHandler(handler)
    slow_log.propagate = False


def record(script: str, uri: Optional[bytes], elapsed: float, traceback: bytes) -> None:
    """One entry: time, pid, script, URI, elapsed seconds, then the Lua traceback."""
    global _recorded
    _recorded = next(_entries) + 1
    where = os.fsdecode(uri) if uri else "-"
    slow_log.warning("slow request: script %s, uri %s, running for %.3f s\n%s", script, where,
                     elapsed, traceback.decode("utf-8", "replace"),
                     extra={"worker_pid": os.getpid()})


def record_killed(worker_number: int, pid: int, script: str, uri: str,
                  elapsed: float) -> None:
    """The master's entry for a request it killed with its worker (no traceback exists)."""
    slow_log.warning("slow request: script %s, uri %s, running for %.3f s in worker %d "
                     "(pid %d), stuck outside Lua (a C call such as os.execute: no Lua "
                     "traceback); the worker was killed", script, uri or "-", elapsed,
                     worker_number, pid, extra={"worker_pid": pid})
