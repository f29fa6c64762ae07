"""The slow log (``slowlog``, ``slowlog_timeout``): one entry per request running too long,
with the Lua traceback taken inside the running state, while the request goes on.

Real lupa runtimes, real files; one case through nginx.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator, List

import pytest

from luafcgid.app import Application
from luafcgid.config import from_mapping
from luafcgid.lua import StateCache, slowlog
from tests.support import LUA_BUSY, Site

# Every test waits for slowlog_timeout (real time) or starts a luafcgid.
pytestmark = pytest.mark.slow

# busy() spins for `seconds` of CPU (os.clock: this thread is the one spinning).
SLOW = LUA_BUSY + """
function main(env, con)
  busy(0.6)
  con:puts("done")
end
"""


@pytest.fixture(autouse=True)
def slow_log_back_to_default() -> Iterator[None]:
    yield
    slowlog.open_log(None)


def slow_cache(settings: dict) -> StateCache:
    """The state cache of an application made with ``settings``: the application opens
    the slow log."""
    return Application(from_mapping(settings)).cache


def serve(cache: StateCache, script: str, uri: bytes = b"/slow.lua?x=1") -> bytes:
    state = cache.acquire(script, "")
    try:
        return state.run({b"REQUEST_URI": uri}, b"", bytes, 1)
    finally:
        cache.release(state)


def entries(path: Path) -> List[str]:
    text = path.read_text() if path.exists() else ""
    return re.findall(r"^\S+ \S+ \[pid \d+\] slow request: .*?(?=^\S+ \S+ \[pid|\Z)", text,
                      re.S | re.M)


@pytest.mark.parametrize("lua", ["5.4", "5.1", "luajit"])
def test_one_entry_with_the_traceback_while_the_request_completes(tmp_path: Path,
                                                                   lua: str) -> None:
    path = tmp_path / "slow.log"
    script = tmp_path / "slow.lua"
    script.write_text(SLOW)
    cache = slow_cache({"lua": lua, "slowlog": str(path), "slowlog_timeout": 0.2,
                        "timeout": 10})
    assert serve(cache, str(script)).endswith(b"done")
    found = entries(path)
    assert len(found) == 1, path.read_text()
    entry = found[0]
    assert f"script {script}, uri /slow.lua?x=1, running for 0.2" in entry
    # The traceback of the running state: the spinning function, its line, its caller.
    assert re.search(r"slow\.lua:3: in (upvalue|local|function) 'busy'", entry), entry
    # Lua 5.1 and LuaJIT name the handler by the variable it was called through.
    assert re.search(r"slow\.lua:7: in function '(main|handler)'", entry), entry
    assert "prelude.lua" not in entry


def test_fast_requests_leave_no_entry(tmp_path: Path) -> None:
    path = tmp_path / "slow.log"
    script = tmp_path / "fast.lua"
    script.write_text('function main(env, con) con:puts("quick") end')
    cache = slow_cache({"slowlog": str(path), "slowlog_timeout": 0.2})
    for _ in range(3):
        assert serve(cache, str(script)).endswith(b"quick")
    assert entries(path) == []


def test_without_a_slowlog_file_entries_go_to_the_error_log(tmp_path: Path,
                                                            log_lines: List[str]) -> None:
    script = tmp_path / "slow.lua"
    script.write_text(SLOW)
    cache = slow_cache({"slowlog_timeout": 0.2})
    assert serve(cache, str(script)).endswith(b"done")
    slow = [line for line in log_lines if "slow request" in line]
    assert len(slow) == 1 and "slow.lua:7: in function" in slow[0], log_lines


def test_slow_log_through_the_server(tmp_path: Path) -> None:
    path = tmp_path / "slow.log"
    with Site(tmp_path, {"slow.lua": SLOW}, slowlog=str(path), slowlog_timeout=0.2,
              workers=2) as site:
        response = site.get("/slow.lua?page=2")
        assert response.status == 200 and response.body == b"done", response
    found = entries(path)
    assert len(found) == 1, path.read_text()
    assert f"script {site.script_path('slow.lua')}, uri /slow.lua?page=2" in found[0]
    assert re.search(r"slow\.lua:3: in (upvalue|local|function) 'busy'", found[0])


def test_an_unwritable_slow_log_falls_back_to_the_error_log(tmp_path: Path,
                                                            log_lines: List[str]) -> None:
    script = tmp_path / "slow.lua"
    script.write_text(SLOW)
    missing = tmp_path / "no" / "such" / "dir" / "slow.log"
    cache = slow_cache({"slowlog": str(missing), "slowlog_timeout": 0.2})
    assert any(f"cannot open the slow log {missing}" in line for line in log_lines)
    assert serve(cache, str(script)).endswith(b"done")
    assert sum("slow request: script" in line for line in log_lines) == 1, log_lines
