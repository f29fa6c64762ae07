"""The handler timeout (SPEC §4): the Lua watchdog stops runaways inside the state, the
state is dropped and its worker keeps serving; the memory cap end to end; the master
replaces a worker stuck in a call no hook can stop.

Real lupa runtimes (5.4, 5.1, LuaJIT), real servers behind a private nginx.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import List

import psutil
import pytest

from luafcgid.arbiter import overrun_limit
from luafcgid.config import from_mapping
from luafcgid.lua import ScriptError, StateCache
from luafcgid.lua import state as state_module
from tests.support import Site, wait_until

RUNTIMES = ("5.4", "5.1", "luajit")
TIMEOUT = 0.3
# How late the watchdog may stop a loop on a loaded test machine.
MARGIN = 1.0

# Reads the worker's pid from /proc: "the same worker" is the same pid.
PID = """
function main(env, con)
  local stat = io.open("/proc/self/stat"):read("*l")
  con:puts(stat:match("^(%d+)"))
end
"""

RUNAWAYS = {
    "while.lua": "function main(env, con) while true do end end",
    # Swallows every error, the watchdog's included.
    "pcall.lua": """
function main(env, con)
  while true do
    pcall(function() while true do end end)
  end
end
""",
    "coroutine.lua": """
function main(env, con)
  local co = coroutine.create(function() while true do end end)
  coroutine.resume(co)
  con:puts("the loop ended?")
end
""",
    "wrap.lua": """
function main(env, con)
  local step = coroutine.wrap(function()
    while true do pcall(coroutine.yield) end
  end)
  while true do step() end
end
""",
    "toplevel.lua": "while true do end\nfunction main(env, con) con:puts('never') end",
}


def write(directory: Path, name: str, source: str) -> str:
    path = directory / name
    path.write_text(source)
    return str(path)


def run(cache: StateCache, script: str) -> bytes:
    """Serve one request in a thread, so that a watchdog that failed fails the test instead
    of hanging it (the runaway thread is left spinning: nothing can stop it)."""
    outcome: List[object] = []

    def request() -> bytes:
        state = cache.acquire(script, "")
        try:
            return state.run({b"REQUEST_URI": b"/x"}, b"", bytes, 1)
        finally:
            cache.release(state)

    def serve() -> None:
        try:
            outcome.append(request())
        except BaseException as error:
            outcome.append(error)

    worker = threading.Thread(target=serve, daemon=True)
    worker.start()
    worker.join(TIMEOUT + MARGIN + 5)
    assert outcome, f"{script} was not stopped"
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


@pytest.mark.slow
@pytest.mark.parametrize("lua", RUNTIMES)
def test_watchdog_stops_every_runaway_and_the_cache_serves_on(tmp_path: Path, lua: str) -> None:
    cache = StateCache(from_mapping({"lua": lua, "timeout": TIMEOUT}))
    ok = write(tmp_path, "ok.lua", 'function main(env, con) con:puts("fine") end')
    assert run(cache, ok).endswith(b"fine")
    for name, source in RUNAWAYS.items():
        script = write(tmp_path, name, source)
        began = time.monotonic()
        with pytest.raises(ScriptError) as failure:
            run(cache, script)
        took = time.monotonic() - began
        assert TIMEOUT <= took < TIMEOUT + MARGIN, (name, took)
        error = failure.value
        # elapsed = now - start, deadline = start + timeout: equal up to float rounding.
        assert error.timeout and TIMEOUT - 1e-6 <= error.elapsed < TIMEOUT + MARGIN, name
        assert f"timeout = {TIMEOUT:g} s" in error.message
        assert re.search(r"ran for 0\.\d{3} s", error.message), error.message
        assert run(cache, ok).endswith(b"fine"), name
    # Timed-out states are dropped (they were cut anywhere); the good one stays.
    assert cache.loaded() == {ok: 1}
    assert cache.oldest_running() == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("lua", RUNTIMES)
def test_timeout_traceback_shows_where_the_loop_ran(tmp_path: Path, lua: str) -> None:
    cache = StateCache(from_mapping({"lua": lua, "timeout": TIMEOUT}))
    script = write(tmp_path, "spin.lua", "local function spin()\n  while true do end\nend\n"
                                         "function main(env, con) spin() end\n")
    with pytest.raises(ScriptError) as failure:
        run(cache, script)
    # Lua shortens long paths from the left: the end of the name is what is certain.
    assert "spin.lua:2: in " in failure.value.traceback
    assert "prelude.lua" not in failure.value.traceback


@pytest.mark.slow
@pytest.mark.parametrize("lua", RUNTIMES)
def test_a_state_idle_for_longer_than_timeout_serves_its_next_request(
        tmp_path: Path, lua: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """No deadline survives a request: the load's and the last request's are disarmed.

    With the hook on every instruction, a stale deadline would be found by the prelude's
    first instructions of the next request (with the real count: now and then, at random).
    """
    monkeypatch.setattr(state_module, "HOOK_COUNT", 1)
    cache = StateCache(from_mapping({"lua": lua, "timeout": TIMEOUT}))
    script = write(tmp_path, "idle.lua", 'function main(env, con) con:puts("ok") end')
    assert run(cache, script).endswith(b"ok")
    time.sleep(TIMEOUT + 1.1)  # idle past the old deadline, and past its whole second
    state = cache.acquire(script, "")
    try:
        assert state.run({}, b"", bytes, 1).endswith(b"ok")
    finally:
        cache.release(state)


@pytest.mark.slow
def test_a_slow_request_within_timeout_is_not_stopped(tmp_path: Path) -> None:
    cache = StateCache(from_mapping({"timeout": 5}))
    script = write(tmp_path, "busy.lua", """
function main(env, con)
  local start = os.clock()
  while os.clock() - start < 0.3 do end
  con:puts("done")
end
""")
    assert run(cache, script).endswith(b"done")


def test_oldest_running_request_is_reported(tmp_path: Path) -> None:
    seen: List[float] = []
    cache = StateCache(from_mapping({"timeout": 5}))
    script = write(tmp_path, "ask.lua", "function main(env, con) con:flush() end")
    state = cache.acquire(script, "")
    state.run({}, b"", lambda data: seen.append(cache.oldest_running()), 1)
    cache.release(state)
    assert len(seen) == 1 and 0.0 < seen[0] < 1.0
    assert cache.oldest_running() == 0.0


# --- through nginx ---------------------------------------------------------------------------


def pid_of(site: Site) -> int:
    response = site.get("/pid.lua")
    assert response.status == 200, response
    return int(response.body)


@pytest.mark.slow
@pytest.mark.parametrize("lua", RUNTIMES)
def test_timeout_through_the_server(tmp_path: Path, lua: str) -> None:
    """In a worker process, where PUC Lua's main thread runs under the compiled watchdog
    (no hook until the deadline: speedups.c) and coroutines under the count hook."""
    runaways = ("while.lua", "pcall.lua", "coroutine.lua", "wrap.lua")
    scripts = {"pid.lua": PID, **{name: RUNAWAYS[name] for name in runaways}}
    with Site(tmp_path, scripts, lua=lua, timeout=1, workers=2) as site:
        worker = pid_of(site)
        for name in runaways:
            began = time.monotonic()
            response = site.get("/" + name)
            assert response.status == 500, response
            assert 1.0 <= time.monotonic() - began < 1.0 + MARGIN + 1.0
            assert pid_of(site) == worker
        log = site.server.output()
        for name in runaways:
            assert re.search(re.escape(site.script_path(name)) + r".*timeout: the handler ran "
                             r"for 1\.\d{3} s \(timeout = 1 s\)", log), log


@pytest.mark.slow
def test_memory_cap_through_the_server(tmp_path: Path) -> None:
    scripts = {"pid.lua": PID, "hog.lua": """
function main(env, con)
  local hoard = {}
  for i = 1, 1e7 do hoard[i] = ("x"):rep(64) .. i end
end
"""}
    with Site(tmp_path, scripts, state_memory=4 * 1024 * 1024, workers=2) as site:
        worker = pid_of(site)
        assert site.get("/hog.lua").status == 500
        assert pid_of(site) == worker
        assert site.get("/hog.lua").status == 500
        assert pid_of(site) == worker
        assert "not enough memory" in site.server.output()


@pytest.mark.slow
def test_a_request_stuck_in_a_c_call_is_killed_with_its_children_and_named(
        tmp_path: Path) -> None:
    """os.execute blocks in C: no hook runs, so the master acts once the request passes
    timeout + margin: KILL for the worker and the processes under it (not a graceful stop,
    which would let it run to its end), the script and URI in the log and the slow log."""
    child_pid = tmp_path / "child.pid"
    # The inner sh becomes `sleep`: a grandchild of the worker, as a script's would be.
    stuck = (f"function main(env, con) os.execute([[sh -c 'echo $$ > {child_pid}; "
             "exec sleep 30']]) con:puts('finished') end")
    slow_log = tmp_path / "slow.log"
    scripts = {"pid.lua": PID, "stuck.lua": stuck}
    with Site(tmp_path, scripts, timeout=1, sweep=200, workers=2, slowlog=str(slow_log),
              slowlog_timeout=0.5) as site:
        stuck_worker = pid_of(site)
        began = time.monotonic()
        # POST: nginx retries a GET on the next worker when the first one dies under it.
        response = site.get("/stuck.lua?id=7", method="POST", body=b"", timeout=40)
        took = time.monotonic() - began
        # Killed under the request at the limit (graceful_timeout, 30 s, plays no part).
        assert response.status == 502, response
        assert overrun_limit(1) < took < overrun_limit(1) + 3, took
        sleeper = int(child_pid.read_text())
        wait_until(lambda: not psutil.pid_exists(sleeper) or
                   psutil.Process(sleeper).status() == psutil.STATUS_ZOMBIE,
                   timeout=5, what="the script's child process to be killed")
        assert wait_until(lambda: pid_of(site) != stuck_worker, timeout=10,
                          what="a replacement worker")
        log = site.server.output()
        script = re.escape(site.script_path("stuck.lua"))
        assert re.search(rf"worker 1 \(pid {stuck_worker}\): a request to {script} \(uri "
                         r"/stuck\.lua\?id=7\) has run for \d+\.\d s, past timeout \(1 s\)",
                         log), log
        assert "killing the worker and the processes it started" in log
    entry = slow_log.read_text()
    assert re.search(rf"\[pid {stuck_worker}\] slow request: script {script}, uri "
                     r"/stuck\.lua\?id=7, running for \d+\.\d+ s in worker 1", entry), entry
    assert "no Lua traceback" in entry


@pytest.mark.slow
def test_a_graceful_stop_leaves_no_process_a_cut_off_request_started(tmp_path: Path) -> None:
    """TERM while a request waits in os.execute: past graceful_timeout the request is cut
    off, and its child process goes with it (whichever of the worker or the master ends
    it), not left running after the server is gone."""
    child_pid = tmp_path / "child.pid"
    scripts = {"stuck.lua": f"function main(env, con) os.execute([[sh -c 'echo $$ > "
                            f"{child_pid}; exec sleep 30']]) end"}
    site = Site(tmp_path, scripts, graceful_timeout=1, workers=2).start()
    try:
        request = threading.Thread(target=lambda: site.get("/stuck.lua", method="POST",
                                                           body=b"", timeout=30), daemon=True)
        request.start()
        sleeper = int(wait_until(lambda: child_pid.exists() and child_pid.read_text().strip(),
                                 what="the script's child process"))
        assert site.server.stop() == 0  # first: nginx would wait for the request
    finally:
        site.stop()
    wait_until(lambda: not psutil.pid_exists(sleeper) or
               psutil.Process(sleeper).status() == psutil.STATUS_ZOMBIE,
               timeout=5, what="the script's child process to be gone")
