"""Signals and recycling with real processes, under a stream of requests through nginx.

Each test counts the requests that failed (printed; run with -s to see the figures).
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

from tests.support import (
    RequestLoop,
    Site,
    http,
    serving,
    wait_until,
    workers_of,
    write_config,
)

pytestmark = [pytest.mark.nginx, pytest.mark.slow]


HELLO = 'function main(env, con) con:header("Content-Type", "text/plain") con:puts("hello") end'
# Holds on to 1 MiB more on every request: drives the worker's RSS up.
GROW = """
big = big or {}
function main(env, con)
    big[#big + 1] = string.rep("x", 1048576 - 8) .. string.format("%8d", #big)
    con:puts("grown")
end"""
# Says it started, then waits (bounded) for the test to let it finish.
SLOW = """
function main(env, con)
    local dir = env.DOCUMENT_ROOT
    io.open(dir .. "/started", "w"):close()
    local deadline = os.time() + 10
    while os.time() < deadline do
        local flag = io.open(dir .. "/go")
        if flag then flag:close() break end
    end
    con:puts("slow done")
end"""
SCRIPTS = {"hello.lua": HELLO, "grow.lua": GROW, "slow.lua": SLOW}


def is_hello(response) -> bool:
    return response.status == 200 and response.body == b"hello"


def rewrite_config(site: Site, **changes: object) -> None:
    site.settings.update(changes)
    write_config(site.config, **site.settings)


def start_site(tmp_path: Path, **settings: object) -> Site:
    return Site(tmp_path, SCRIPTS, **{"processes": 2, "sweep": 100, **settings}).start()


@pytest.fixture
def make_running_site(tmp_path):
    """``make_running_site(**settings)``: a started Site (luafcgid + nginx) on tmp_path;
    every one made is stopped after the test."""
    sites = []

    def make(**settings: object) -> Site:
        sites.append(start_site(tmp_path, **settings))
        return sites[-1]

    yield make
    for site in sites:
        site.stop()


def test_killed_worker_is_replaced_and_no_request_fails_after(make_running_site):
    site = make_running_site()
    with RequestLoop(site.port, ["/hello.lua"], is_hello, clients=4) as loop:
        loop.wait_for(200)
        before = wait_until(lambda: serving(site) if len(serving(site)) == 2 else None)
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: len(serving(site) - before) == 1 and victim not in
                   workers_of(site.server.pid), what="a replacement for the killed worker")
        failed_at_kill = loop.failed
        loop.wait_for(500)
        failed_after = loop.failed - failed_at_kill
    print(f"\nkill -9: {failed_at_kill} failed while the worker died, {failed_after} after its "
          f"replacement was up, of {loop.total}")
    assert failed_after == 0, loop.failures


def test_hup_changes_headers_with_no_failed_request(make_running_site):
    site = make_running_site(headers="X-Gen: 1\r\n")
    seen = []

    def check(response) -> bool:
        seen.append(response.header("X-Gen"))
        return is_hello(response) and response.header("X-Gen") in ("1", "2")

    with RequestLoop(site.port, ["/hello.lua"], check, clients=4) as loop:
        loop.wait_for(200)
        old = workers_of(site.server.pid)
        rewrite_config(site, headers="X-Gen: 2\r\n")
        site.server.signal(signal.SIGHUP)
        wait_until(lambda: not old & workers_of(site.server.pid) and
                   len(serving(site)) == 2, what="the old workers to be replaced")
        loop.wait_for(200)
    print(f"\nHUP: {loop.failed} failed of {loop.total}")
    assert loop.failed == 0, loop.failures
    assert seen[0] == "1"
    assert set(seen[-100:]) == {"2"}


def test_hup_with_a_broken_config_keeps_serving(make_running_site):
    site = make_running_site()
    with RequestLoop(site.port, ["/hello.lua"], is_hello, clients=2) as loop:
        loop.wait_for(100)
        old = workers_of(site.server.pid)
        site.config.write_text(site.config.read_text() + 'processes = "many"\n')
        site.server.signal(signal.SIGHUP)
        wait_until(lambda: "reload refused" in site.server.output(), what="the refusal logged")
        loop.wait_for(200)
    assert "processes" in site.server.output()
    assert workers_of(site.server.pid) == old
    assert loop.failed == 0, loop.failures


def test_max_requests_recycles_with_no_failed_request(make_running_site):
    site = make_running_site(max_requests=150, max_requests_jitter=50)
    pids = set()
    with RequestLoop(site.port, ["/hello.lua"], is_hello, clients=4) as loop:
        def recycled_enough() -> bool:
            pids.update(workers_of(site.server.pid))
            return len(pids) >= 6
        wait_until(recycled_enough, timeout=30, what="workers to retire and be replaced")
    retired = site.server.output().count("(max_requests)")
    print(f"\nmax_requests: {retired} retirements, {loop.failed} failed of {loop.total}")
    assert retired >= 4
    assert loop.failed == 0, loop.failures


def test_max_memory_recycles_with_no_failed_request(make_running_site):
    site = make_running_site(max_memory=80)
    with RequestLoop(site.port, ["/grow.lua", "/hello.lua"],
                     lambda r: r.status == 200 and r.body in (b"grown", b"hello"),
                     clients=4) as loop:
        wait_until(lambda: site.server.output().count("over max_memory") >= 3, timeout=30,
                   what="workers over max_memory to be replaced")
        loop.wait_for(100)
    recycled = site.server.output().count("over max_memory")
    print(f"\nmax_memory: {recycled} recycles, {loop.failed} failed of {loop.total}")
    assert loop.failed == 0, loop.failures


def test_term_lets_a_slow_request_finish_then_cleans_up(tmp_path, make_running_site):
    socket_path = tmp_path / "fcgi.sock"
    site = make_running_site(listen=str(socket_path), processes=1)
    pidfile = Path(site.settings["pidfile"])
    answer = {}
    client = threading.Thread(target=lambda: answer.update(r=site.get("/slow.lua")))
    client.start()
    wait_until(lambda: (site.docroot / "started").exists(), what="the slow request to start")
    site.server.signal(signal.SIGTERM)
    # Stopping: new clients are refused at once, while the slow request goes on.
    wait_until(lambda: not socket_path.exists(), what="the socket file to go")
    assert client.is_alive()
    (site.docroot / "go").touch()
    client.join(15)
    assert answer["r"].status == 200 and answer["r"].body == b"slow done"
    assert site.server.process.wait(15) == 0
    assert not pidfile.exists()
    assert not Path(str(pidfile) + ".status").exists()


def test_ttin_and_ttou_change_the_number_of_workers(make_running_site):
    site = make_running_site()
    master = site.server.pid
    wait_until(lambda: len(workers_of(master)) == 2)
    site.server.signal(signal.SIGTTIN)
    wait_until(lambda: len(serving(site)) == 3 and len(workers_of(master)) == 3,
               what="a third worker")
    # One at a time: the kernel merges a signal sent while the same one is still pending.
    site.server.signal(signal.SIGTTOU)
    wait_until(lambda: len(workers_of(master)) == 2, what="two workers left")
    site.server.signal(signal.SIGTTOU)
    wait_until(lambda: len(workers_of(master)) == 1, what="one worker left")
    assert is_hello(site.get("/hello.lua"))


def test_usr1_reopens_the_log_of_master_and_workers(tmp_path, make_running_site):
    logfile = tmp_path / "luafcgid.log"
    site = make_running_site(logfile=str(logfile), loglevel="info")
    os.rename(logfile, tmp_path / "luafcgid.log.1")
    site.server.signal(signal.SIGUSR1)
    wait_until(lambda: logfile.exists() and "log reopened" in logfile.read_text(),
               what="the master to reopen its log")
    # The master passes USR1 on; the workers' next lines go to the new file.
    wait_until(lambda: http(site.port, "/missing.lua").status == 404 and
               "missing.lua" in logfile.read_text(), what="a worker's line in the new log")
