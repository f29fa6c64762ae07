"""The access log through a real nginx: its fields, a custom format, USR1 reopening."""

from __future__ import annotations

import os
import re
import signal
import time

import psutil
import pytest

from luafcgid import config
from tests.support import Site, wait_until

pytestmark = [pytest.mark.nginx, pytest.mark.slow]

SCRIPTS = {
    "hello.lua": 'function main(env, con) con:puts("hello") end',
    "echo.lua": 'function main(env, con) con:puts(con:gets()) end',
    "fail.lua": 'function main(env, con) con:puts("lost") error("boom") end',
    "stream.lua": """function main(env, con)
        con:puts("one") con:flush() con:puts("two!") con:flush() con:status(1) end""",
    "created.lua": 'function main(env, con) con:status(201) con:puts("made") end',
}
# The default format: remote - user [time] "method uri protocol" status bytes durationms
# script pid
DEFAULT_LINE = re.compile(
    r'^(?P<remote>\S+) - (?P<user>\S+) \[(?P<time>\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4})\] '
    r'"(?P<method>\S+) (?P<uri>\S+) (?P<protocol>\S+)" (?P<status>\d{3}) (?P<bytes>\d+) '
    r'(?P<duration>\d+\.\d{3})ms (?P<script>\S+) (?P<pid>\d+)$')


def lines_of(path) -> list:
    return path.read_text().splitlines() if path.exists() else []


def test_default_format_records_every_request(tmp_path):
    access = tmp_path / "access.log"
    with Site(tmp_path, SCRIPTS, access_log=str(access)) as site:
        assert site.get("/hello.lua?x=1").body == b"hello"
        assert site.get("/echo.lua", method="POST", body=b"1234567").body == b"1234567"
        assert site.get("/fail.lua").status == 500
        assert site.get("/missing.lua").status == 404
        assert site.get("/created.lua").status == 201
        streamed = site.get("/stream.lua")  # the status call after a flush is an error
        assert streamed.body.startswith(b"onetwo!")
        worker = psutil.Process(site.server.pid).children()[0].pid
        lines = wait_until(lambda: len(lines_of(access)) == 6 and lines_of(access),
                           what="six access log lines")
    entries = [DEFAULT_LINE.match(line) for line in lines]
    assert all(entries), lines
    seen = [(e["method"], e["uri"], int(e["status"]), int(e["bytes"])) for e in entries]
    failure_page = len(b"500 Internal Server Error\n")
    missing_page = len(b"404 Not Found\n")
    assert seen == [("GET", "/hello.lua?x=1", 200, 5), ("POST", "/echo.lua", 200, 7),
                    ("GET", "/fail.lua", 500, failure_page),
                    ("GET", "/missing.lua", 404, missing_page),
                    ("GET", "/created.lua", 201, 4), ("GET", "/stream.lua", 200, 7)]
    for entry in entries:
        assert entry["remote"] == "127.0.0.1" and entry["protocol"] == "HTTP/1.1"
        assert int(entry["pid"]) == worker
        assert 0 < float(entry["duration"]) < 10000
    assert entries[0]["script"] == site.script_path("hello.lua")


def test_custom_format_and_reopen_on_usr1(tmp_path):
    access = tmp_path / "access.log"
    line_format = "{status} {bytes} {method} {query} {worker} {duration:.0f}"
    with Site(tmp_path, SCRIPTS, access_log=str(access), access_log_format=line_format,
              processes=2) as site:
        for number in range(5):
            assert site.get(f"/hello.lua?n={number}").status == 200
        wait_until(lambda: len(lines_of(access)) == 5, what="five lines")
        status, size, method, query, worker, duration = lines_of(access)[0].split()
        assert (status, size, method, query) == ("200", "5", "GET", "n=0")
        assert worker in ("1", "2") and duration.isdigit()
        os.rename(access, tmp_path / "access.log.1")
        site.server.signal(signal.SIGUSR1)
        # Until every worker reopened, lines still go to the moved file: none is lost.
        number = 5
        deadline = time.monotonic() + 10
        while len(lines_of(access)) < 4 and time.monotonic() < deadline:
            assert site.get(f"/hello.lua?n={number}").status == 200
            number += 1
        wait_until(lambda: len(lines_of(access) + lines_of(tmp_path / "access.log.1"))
                   == number, what="every line written")
    assert len(lines_of(access)) >= 4, "the workers never reopened the access log"
    queries = [line.split()[3] for line in lines_of(tmp_path / "access.log.1")
               + lines_of(access)]
    assert sorted(queries, key=lambda q: int(q[2:])) == [f"n={n}" for n in range(number)]


def test_access_log_format_is_checked():
    with pytest.raises(config.ConfigError, match=r"access_log_format: unknown field \{agent\}"):
        config.from_mapping({"access_log_format": "{status} {agent}"})
    with pytest.raises(config.ConfigError, match="access_log_format: does not format"):
        config.from_mapping({"access_log_format": "{status:q}"})
    settings = config.from_mapping({})
    assert settings.access_log is None  # off by default
