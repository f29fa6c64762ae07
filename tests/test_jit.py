"""``jit = true``: LuaJIT states keep their JIT compiler on (SPEC §6, docs/design.rst).

LuaJIT never runs hooks in compiled code, so with the JIT on the watchdog's count hook no
longer stops a runaway loop once it is compiled: the master's overrun guard ends it, by
killing the worker (``arbiter.overrun_limit``). These tests show the switch (off by
default), that guard ending a compiled runaway through nginx while the other worker
serves, and the refusal of ``jit = true`` with any other Lua.

Real lupa runtimes, a real server behind a private nginx, the real CLI.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List

import pytest

from luafcgid.arbiter import overrun_limit
from luafcgid.config import ConfigError, from_mapping
from luafcgid.lua import StateCache, runtime
from tests.support import Response, Site, serving, wait_until, workers_of, write_config

try:
    runtime.module("luajit")
except runtime.UnknownRuntime as missing:
    pytest.skip(f"this lupa has no LuaJIT: {missing}", allow_module_level=True)

# Prints whether the JIT compiler is on in the state that runs it, and the worker's pid.
STATUS = """
function main(env, con)
  local stat = io.open("/proc/self/stat"):read("*l")
  con:puts(tostring((jit.status())) .. " " .. stat:match("^(%d+)"))
end
"""
HELLO = 'function main(env, con) con:puts("hello") end'
# Runaways LuaJIT compiles (measured: once they are traces the hook never fires again):
# a bare loop in the handler, and a loop calling a function at the script's top level
# (while the state loads: the request is no less running).
RUNAWAYS = {
    "while.lua": "function main(env, con) while true do end end",
    "toplevel.lua": """
local function step(i) return i + 1 end
local i = 0
while true do i = step(i) end
function main(env, con) con:puts("never") end
""",
}
TIMEOUT = 1


def jit_status(tmp_path: Path, **settings: object) -> bytes:
    script = tmp_path / "status.lua"
    script.write_text(STATUS)
    cache = StateCache(from_mapping({"lua": "luajit", **settings}))
    state = cache.acquire(str(script), "")
    try:
        return state.run({b"REQUEST_URI": b"/status.lua"}, b"", bytes, 1).split(b"\r\n\r\n")[1]
    finally:
        cache.release(state)
        cache.close()


@pytest.mark.slow
def test_the_jit_is_off_by_default_and_on_with_jit_true(tmp_path: Path) -> None:
    assert jit_status(tmp_path).startswith(b"false ")
    assert jit_status(tmp_path, jit=False).startswith(b"false ")
    assert jit_status(tmp_path, jit=True).startswith(b"true ")


@pytest.mark.slow
def test_jit_true_with_another_lua_is_refused_naming_the_key_and_the_lua(
        tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        from_mapping({"lua": "5.4", "jit": True}, "/etc/luafcgid/config.lua")
    assert str(refused.value) == ('/etc/luafcgid/config.lua: jit: true needs lua = "luajit": '
                                  'lua = "5.4" has no JIT compiler (remove jit, or set '
                                  'lua = "luajit")')
    # Not a boolean: the usual type error.
    with pytest.raises(ConfigError, match=r"jit: expected a boolean"):
        from_mapping({"lua": "luajit", "jit": 1})
    # The default Lua (5.4) says so too; jit = false is fine with any Lua.
    with pytest.raises(ConfigError, match=r'lua = "5\.4" has no JIT'):
        from_mapping({"jit": True})
    assert from_mapping({"lua": "5.1", "jit": False}).jit is False
    # And `luafcgid start` stops there: one line, exit 1, no pidfile.
    pidfile = tmp_path / "p.pid"
    config = write_config(tmp_path / "config.lua", lua="5.1", jit=True, pidfile=str(pidfile))
    result = subprocess.run([sys.executable, "-m", "luafcgid", "start", "-F", "-c", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr == (f'{config}: jit: true needs lua = "luajit": lua = "5.1" has no JIT '
                             'compiler (remove jit, or set lua = "luajit")\n')
    assert not pidfile.exists()


def status_of(site: Site) -> List[str]:
    response = site.get("/status.lua")
    assert response.status == 200, response
    return response.body.decode().split()


@pytest.mark.slow
@pytest.mark.parametrize("runaway", sorted(RUNAWAYS))
def test_a_compiled_runaway_is_ended_by_the_master_and_the_other_worker_serves(
        tmp_path: Path, runaway: str) -> None:
    """The hook does not stop it (no 500 at ``timeout``): the master kills its worker at
    ``overrun_limit``, the client gets nginx's 502, a replacement serves; meanwhile every
    other request is answered (but one racing the kill on the stuck worker's other thread,
    which gets a 502 as the runaway does)."""
    scripts = {"status.lua": STATUS, "hello.lua": HELLO, runaway: RUNAWAYS[runaway]}
    # keep_conn off: each request a new connection, which either worker may accept (kept
    # connections would all stay with the worker that survived).
    with Site(tmp_path, scripts, keep_conn=False, lua="luajit", jit=True, timeout=TIMEOUT,
              processes=2, workers=2, sweep=200) as site:
        before = wait_until(lambda: len(serving(site)) == 2 and serving(site),
                            what="two serving workers")
        assert status_of(site)[0] == "true"
        outcome: List[Response] = []
        began = time.monotonic()
        # POST: nginx retries a GET on the next worker when the first one dies under it.
        request = threading.Thread(target=lambda: outcome.append(site.get(
            "/" + runaway, method="POST", body=b"", timeout=40)), daemon=True)
        request.start()
        served = 0
        while request.is_alive() and time.monotonic() - began < overrun_limit(TIMEOUT) + 10:
            sent = time.monotonic() - began
            response = site.get("/hello.lua")
            if response.status == 502 and sent > overrun_limit(TIMEOUT) - 0.5:
                continue  # it raced the kill on the stuck worker's other thread
            assert response.status == 200 and response.body == b"hello", (sent, response)
            served += 1
        request.join(5)
        took = time.monotonic() - began
        assert outcome, f"{runaway} was not ended"
        assert outcome[0].status == 502, outcome[0]
        assert overrun_limit(TIMEOUT) < took < overrun_limit(TIMEOUT) + 3, took
        assert served > 50, served  # the other worker (and thread) served all along
        log = site.server.output()
        script = re.escape(site.script_path(runaway))
        killed = re.search(rf"worker \d \(pid (\d+)\): a request to {script} \(uri "
                           rf"/{re.escape(runaway)}\) has run for \d+\.\d s, past timeout "
                           r"\(1 s\)", log)
        assert killed, log
        assert "or a loop LuaJIT compiled (jit = true)?" in log
        stuck = int(killed.group(1))
        assert stuck in before
        wait_until(lambda: stuck not in workers_of(site.server.pid), timeout=5,
                   what="the stuck worker to be gone")

        def replaced() -> set:
            pids = serving(site)
            return pids if len(pids) == 2 and stuck not in pids else set()

        after = wait_until(replaced, timeout=10, what="a replacement worker")
        assert len(after - before) == 1
        # The replacement runs with the JIT on too, and serves.
        assert wait_until(lambda: status_of(site)[1] in map(str, after - before), timeout=10,
                          what="a request served by the replacement")
        assert status_of(site)[0] == "true"
        assert site.get("/hello.lua").body == b"hello"
        # The watchdog never fired: no 500 for it, no timeout line.
        assert "timeout: the handler ran for" not in log
