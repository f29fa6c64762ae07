"""The error log through a real nginx: line format, loglevel, Lua tracebacks, and the two
logrotate patterns (copytruncate; move then USR1)."""

from __future__ import annotations

import re
import shutil
import signal
import time

import pytest

from tests.support import Site, wait_until

pytestmark = [pytest.mark.nginx, pytest.mark.slow]

SCRIPTS = {
    "note.lua": 'function main(env, con) con:log("mark " .. env.QUERY_STRING) con:puts("ok") end',
    "fail.lua": """local function inner() error("boom in inner") end
function main(env, con) inner() end""",
}
# A record's first line: time with milliseconds, [pid], level.
RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \[(\d+)\] "
                    r"(DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def marks(*paths) -> list:
    found = []
    for path in paths:
        if path.exists():
            found += re.findall(r"note\.lua: mark n=(\d+)", path.read_text())
    return sorted(int(mark) for mark in found)


def test_loglevel_line_format_and_lua_traceback(tmp_path):
    logfile = tmp_path / "error.log"
    with Site(tmp_path, SCRIPTS, logfile=str(logfile), loglevel="warning") as site:
        assert site.get("/note.lua?n=1").body == b"ok"
        assert site.get("/fail.lua").status == 500
        text = wait_until(lambda: "boom in inner" in logfile.read_text() and logfile.read_text(),
                          what="the script error in the log")
    assert "mark n=1" not in text  # con:log is info: below loglevel "warning"
    assert " INFO " not in text
    error_line = next(line for line in text.splitlines() if "boom in inner" in line)
    assert RECORD.match(error_line) and " ERROR " in error_line
    assert "fail.lua" in error_line
    traceback = text[text.index(error_line):]
    assert "stack traceback:" in traceback
    assert re.search(r"fail\.lua:1: in (local|upvalue|function) '?inner'?", traceback), traceback
    # Every line is a record's first line or a continuation of a traceback.
    for line in text.splitlines():
        assert RECORD.match(line) or line.startswith(("\t", "stack traceback:", " ")), line


def test_copytruncate_keeps_writing_at_the_start_of_the_file(tmp_path):
    logfile = tmp_path / "error.log"
    with Site(tmp_path, SCRIPTS, logfile=str(logfile)) as site:
        for number in range(20):
            site.get(f"/note.lua?n={number}")
        wait_until(lambda: marks(logfile) == list(range(20)), what="20 marks")
        size_before = logfile.stat().st_size
        shutil.copyfile(logfile, tmp_path / "error.log.1")
        with open(logfile, "r+b") as file:
            file.truncate(0)
        site.get("/note.lua?n=20")
        wait_until(lambda: marks(logfile) == [20], what="the mark after the truncation")
    data = logfile.read_bytes()
    assert b"\0" not in data, "the server wrote at its old offset, leaving a hole"
    assert RECORD.match(data.decode().splitlines()[0])
    assert len(data) < size_before
    assert marks(tmp_path / "error.log.1") == list(range(20))


def test_move_then_usr1_loses_no_line(tmp_path):
    logfile = tmp_path / "error.log"
    moved = tmp_path / "error.log.1"
    with Site(tmp_path, SCRIPTS, logfile=str(logfile), processes=2) as site:
        for number in range(10):
            site.get(f"/note.lua?n={number}")
        logfile.rename(moved)
        site.server.signal(signal.SIGUSR1)
        wait_until(lambda: logfile.exists() and "USR1: log reopened" in logfile.read_text(),
                   what="the master to reopen its log")
        number = 10
        deadline = time.monotonic() + 10
        # Until both workers reopened, their lines go to the moved file; none may be lost.
        while len(marks(logfile)) < 6 and time.monotonic() < deadline:
            site.get(f"/note.lua?n={number}")
            number += 1
        wait_until(lambda: marks(logfile, moved) == list(range(number)),
                   what="every mark in one file or the other")
    assert len(marks(logfile)) >= 6, "the workers never reopened the log"
    assert set(marks(moved)) >= set(range(10))


def test_every_line_is_a_record_or_its_continuation_never_blank(tmp_path):
    """A syntax error has no traceback: its entry is one line, with no blank line after it;
    slow log entries in the error log carry the time and pid once, as every record does."""
    logfile = tmp_path / "error.log"
    scripts = {"syntax.lua": "function main(env, con) con:puts( end",
               "slow.lua": "function main(env, con) local t = os.clock() "
                           "while os.clock() - t < 0.3 do end con:puts('ok') end"}
    with Site(tmp_path, scripts, logfile=str(logfile), slowlog_timeout=0.1) as site:
        assert site.get("/syntax.lua").status == 500
        assert site.get("/slow.lua").body == b"ok"
        text = wait_until(lambda: "slow request" in logfile.read_text() and logfile.read_text(),
                          what="the slow request in the error log")
    lines = text.splitlines()
    syntax = next(index for index, line in enumerate(lines) if "syntax.lua:1:" in line)
    assert RECORD.match(lines[syntax + 1]), lines[syntax:syntax + 2]
    assert "" not in lines, text
    slow = next(line for line in lines if "slow request" in line)
    assert re.match(RECORD.pattern + r"slow request: script ", slow), slow
