"""The error log and the access log.

Error log: one line per event, with time, pid and level (a script error adds its Lua
traceback on the lines below). The master and every worker write to the same file
(``logfile`` in the config, stderr when unset). The file is opened in append mode
(O_APPEND): lines from different processes stay whole, and after logrotate's
``copytruncate`` the next line lands at the start of the emptied file, not past a hole.

Access log (``access_log``, ``access_log_format``): one line per request, written by the
worker that answered it with a single ``write()`` on an O_APPEND descriptor, so the
lines of several workers and threads never mix. The format is a Python format string
over the fields of :data:`ACCESS_FIELDS` (``{status}``, ``{duration:.1f}``, ...).

USR1 calls :func:`reopen`, which reopens both, so logrotate's move-then-signal pattern
works.
"""

from __future__ import annotations

import logging
import os
import string
import sys
import time
from typing import Iterable, List, Mapping, Optional, Tuple

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

# Lines about the config file that wait for setup(): `start` reads the config before it
# knows where the log goes, and a line logged then would reach nobody.
_pending: List[Tuple[int, str]] = []


def setup(logfile: Optional[str] = None, level: str = "info") -> None:
    """Send the luafcgid log to ``logfile`` (stderr when None) at ``level``."""
    global _pending
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
    pending, _pending = _pending, []
    for line_level, message in pending:
        log.log(line_level, message)


def config_notices(notices: Iterable[Tuple[int, str]]) -> None:
    """Log ``(level, message)`` lines about the config just read: now when the log is set
    up (a reload in the master), else at the next :func:`setup` (``start``). Only the last
    config's lines wait: a command that reads the config and never sets up the log
    (``stop``, ``status``) leaves nothing behind for a later one."""
    global _pending
    notices = list(notices)
    if log.handlers:
        _pending = []
        for level, message in notices:
            log.log(level, message)
    else:
        _pending = notices


def reopen() -> None:
    """Reopen the log files (USR1), so rotated files are let go."""
    for handler in log.handlers:
        if isinstance(handler, logging.FileHandler):
            # setStream swaps under the handler's lock: no line is lost or half-written.
            handler.setStream(handler._open()).close()
    if access_log is not None:
        access_log.reopen()


# --- the access log ------------------------------------------------------------------------

# Field → what it holds (the README's table is made from the same list).
ACCESS_FIELDS = {
    "time": "local time the request ended, as in nginx's log: 24/Nov/2026:17:57:57 +0000",
    "remote": "client address (REMOTE_ADDR)",
    "user": "REMOTE_USER, - when none",
    "method": "REQUEST_METHOD",
    "uri": "REQUEST_URI (the path and query the client asked for)",
    "query": "QUERY_STRING",
    "protocol": "SERVER_PROTOCOL",
    "status": "response status code (an integer)",
    "bytes": "body bytes sent, head excluded (an integer)",
    "duration": "milliseconds from the complete request to the last byte sent (a float)",
    "script": "SCRIPT_FILENAME",
    "pid": "pid of the worker process that answered",
    "worker": "number of that worker process",
}
DEFAULT_ACCESS_FORMAT = ('{remote} - {user} [{time}] "{method} {uri} {protocol}" {status} '
                         '{bytes} {duration:.3f}ms {script} {pid}')
# A CGI param that is missing shows as "-", as in nginx's log.
_PARAM_FIELDS = (("remote", b"REMOTE_ADDR"), ("user", b"REMOTE_USER"),
                 ("method", b"REQUEST_METHOD"), ("uri", b"REQUEST_URI"),
                 ("query", b"QUERY_STRING"), ("protocol", b"SERVER_PROTOCOL"),
                 ("script", b"SCRIPT_FILENAME"))
_SAMPLE = {**{name: "-" for name in ACCESS_FIELDS}, "status": 200, "bytes": 0,
           "duration": 0.0, "pid": 1, "worker": 1}

access_log: Optional[AccessLog] = None


def check_access_format(line_format: str) -> str:
    """``line_format`` if it formats; ValueError saying what is wrong otherwise."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(line_format) if name]
    except ValueError as error:
        raise ValueError(f"not a format string: {error}") from None
    for name in names:
        if name not in ACCESS_FIELDS:
            raise ValueError(f"unknown field {{{name}}}; the fields are "
                             + ", ".join(ACCESS_FIELDS))
    try:
        line_format.format_map(_SAMPLE)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as error:
        raise ValueError(f"does not format: {error}") from None
    return line_format


class AccessLog:
    """One worker process's access log: ``write`` is called once per request."""

    def __init__(self, path: str, line_format: str, worker_number: int) -> None:
        self.path = path
        self.line_format = line_format + "\n"
        self.worker_number = worker_number
        self.fd = self._open()
        self.failing = False
        self._second = -1
        self._stamp = ""

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def reopen(self) -> None:
        """Point the descriptor at a new file at ``path``; dup2 swaps it atomically, so
        threads writing meanwhile land in the old file or the new one, never nowhere."""
        try:
            fresh = self._open()
        except OSError as error:
            log.error("cannot reopen the access log %s (%s): still writing to the old file",
                      self.path, error.strerror)
            return
        os.dup2(fresh, self.fd)
        os.close(fresh)

    def write(self, params: Mapping[bytes, bytes], status: int, body_bytes: int,
              duration: float) -> None:
        """One line for a request: ``duration`` in seconds."""
        now = time.time()
        second = int(now)
        if second != self._second:  # strftime once a second, not once a request
            self._stamp = time.strftime("%d/%b/%Y:%H:%M:%S %z", time.localtime(now))
            self._second = second
        fields = {name: params.get(key, b"-").decode("utf-8", "replace") or "-"
                  for name, key in _PARAM_FIELDS}
        fields.update(time=self._stamp, status=status, bytes=body_bytes,
                      duration=duration * 1000.0, pid=os.getpid(), worker=self.worker_number)
        line = self.line_format.format_map(fields).encode("utf-8", "replace")
        try:
            os.write(self.fd, line)
        except OSError as error:
            if not self.failing:
                log.error("cannot write to the access log %s (%s); lines are lost until "
                          "it works again", self.path, error.strerror)
            self.failing = True
            return
        self.failing = False


def open_access_log(path: str, line_format: str, worker_number: int) -> Optional[AccessLog]:
    """Open this process's access log (the one :func:`reopen` reopens); None if it cannot."""
    global access_log
    try:
        access_log = AccessLog(path, line_format, worker_number)
    except OSError as error:
        log.error("cannot open the access log %s (%s): serving without it; make the file "
                  "writable by the workers' user", path, error.strerror)
        access_log = None
    return access_log
