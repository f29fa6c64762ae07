"""The whole path through real parts: HTTP → nginx → FastCGI → luafcgid → Lua and back."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import time

import psutil
import pytest

from tests.support import (
    Site,
    fcgi_call,
    fcgi_connect,
    fcgi_request_bytes,
    read_records,
    wait_until,
)

pytestmark = pytest.mark.slow

SCRIPTS = {
    "hello.lua": 'function main(env, con) con:header("Content-Type", "text/plain") '
                 'con:puts("Hello, world!") end',
    "echo.lua": "function main(env, con) con:header('Content-Type', 'application/octet-stream') "
                "con:puts(con:gets()) end",
    "headers.lua": """
        function main(env, con)
            con:status(201)
            con:header("Set-Cookie", "a=1; Path=/")
            con:header("Set-Cookie: b=2; Path=/")
            con:header("X-Method", env.REQUEST_METHOD)
            con:puts("created")
        end""",
    "notfound.lua": 'function main(env, con) con:status(404) con:puts("no such thing") end',
    "flags.lua": """
        -- a module: wait (busy, at most 10 s) until the test creates the file go.<name>
        return function(env)
            local flag = env.DOCUMENT_ROOT .. "/go." .. env.QUERY_STRING
            local deadline = os.time() + 10
            while os.time() < deadline do
                local f = io.open(flag)
                if f then f:close() return end
            end
        end""",
    "stream.lua": """
        local wait_for_flag = require("flags")
        function main(env, con)
            con:header("Content-Type", "text/plain")
            con:puts("first\\n")
            con:flush()
            wait_for_flag(env)
            con:puts("second\\n")
        end""",
    "slow.lua": """
        local wait_for_flag = require("flags")
        function main(env, con)
            io.open(env.DOCUMENT_ROOT .. "/started." .. env.QUERY_STRING, "w"):close()
            wait_for_flag(env)
            con:puts("slow done")
        end""",
    "counter.lua": "hits = 0 function main(env, con) hits = hits + 1 con:puts(hits) end",
    "syntax.lua": "function main(env, con) con:puts('x' end",
    "boom.lua": 'function main(env, con) con:puts("partial") error("kaboom") end',
    "nohandler.lua": "x = 1",
    "legacy.lua": 'function main() RespContentType("text/plain") Header("X-Legacy", "yes") '
                  'Send("legacy " .. Env.REQUEST_METHOD .. " " .. (Cookies.sid or "-")) end',
    "helper.lua": 'local lf = require("luafcgid") function main(env, con) '
                  'local q = lf.parse(env.QUERY_STRING) con:puts(q.a .. "|" .. q.b[2]) end',
    "notes.txt": "function main(env, con) con:puts('must not run') end",
}


@pytest.fixture(scope="module")
def running_site(tmp_path_factory):
    base = tmp_path_factory.mktemp("site")
    with Site(base, SCRIPTS, nginx_buffering=False, workers=4, maxpost=2 * 1024 * 1024,
              headers="X-Powered-By: luafcgid\r\n", timeout=30, sweep=300) as running:
        yield running


def test_get_hello(running_site):
    reply = running_site.get("/hello.lua")
    assert reply.status == 200
    assert reply.body == b"Hello, world!"
    assert reply.header("Content-Type") == "text/plain"
    assert reply.header("X-Powered-By") == "luafcgid"
    assert reply.header("Content-Length") == "13"


def test_post_one_mebibyte_is_echoed_byte_exact(running_site):
    body = os.urandom(1024 * 1024)
    reply = running_site.get("/echo.lua", method="POST", body=body,
                     headers={"Content-Type": "application/octet-stream"})
    assert reply.status == 200
    assert reply.body == body


def test_status_and_repeated_headers(running_site):
    reply = running_site.get("/headers.lua", method="PUT", body=b"")
    assert reply.status == 201
    assert reply.headers_named("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
    assert reply.header("X-Method") == "PUT"
    assert reply.header("X-Powered-By") == "luafcgid"
    assert reply.body == b"created"


def test_script_status_404_keeps_its_body(running_site):
    reply = running_site.get("/notfound.lua")
    assert (reply.status, reply.body) == (404, b"no such thing")


def test_flush_streams_before_the_handler_returns(running_site):
    with socket.create_connection(("127.0.0.1", running_site.port), timeout=10) as client:
        client.sendall(b"GET /stream.lua?one HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        received = b""
        deadline = time.monotonic() + 10
        while b"first" not in received and time.monotonic() < deadline:
            received += client.recv(4096)
        assert b"first" in received
        assert b"second" not in received  # the handler is still waiting for the flag
        (running_site.docroot / "go.one").write_text("")
        while not received.endswith(b"0\r\n\r\n"):
            chunk = client.recv(4096)
            if not chunk:
                break
            received += chunk
    assert b"second" in received


def test_state_persists_between_requests(running_site):
    first = int(running_site.get("/counter.lua").body)
    second = int(running_site.get("/counter.lua").body)
    assert second == first + 1


def test_luafcgid2_globals_through_nginx(running_site):
    reply = running_site.get("/legacy.lua", headers={"Cookie": "sid=abc; other=1"})
    assert reply.status == 200
    assert reply.body == b"legacy GET abc"
    assert reply.header("Content-Type") == "text/plain"
    assert reply.header("X-Legacy") == "yes"


def test_helper_module(running_site):
    assert running_site.get("/helper.lua?a=x+y&b=1&b=2").body == b"x y|2"


def test_missing_script_is_404(running_site):
    reply = running_site.get("/nothere.lua")
    assert reply.status == 404
    assert reply.header("X-Powered-By") == "luafcgid"


def test_deleted_script_is_404_within_a_second(running_site):
    """Known scripts are not stat'ed per request: the worker looks again every second."""
    doomed = running_site.docroot / "doomed.lua"
    doomed.write_text('function main(env, con) con:puts("alive") end')
    assert running_site.get("/doomed.lua").body == b"alive"
    doomed.unlink()
    deleted_at = time.monotonic()
    statuses = []

    def gone() -> bool:
        statuses.append(running_site.get("/doomed.lua").status)
        return statuses[-1] == 404

    wait_until(gone, timeout=5, what="the deleted script to be a 404")
    assert time.monotonic() - deleted_at < 2.5
    assert set(statuses) <= {200, 404}  # served from its state, then 404: never a 500


def test_errors_are_500_without_details(running_site):
    for path in ("/syntax.lua", "/boom.lua", "/nohandler.lua"):
        reply = running_site.get(path)
        assert reply.status == 500, path
        assert b"kaboom" not in reply.body and b"partial" not in reply.body
        assert reply.header("X-Powered-By") == "luafcgid"
    log = running_site.server.output()
    assert "boom.lua" in log and "kaboom" in log and "traceback" in log.lower()
    assert "syntax.lua" in log


def test_body_over_maxpost_is_413(running_site):
    reply = running_site.get("/echo.lua", method="POST", body=b"x" * (3 * 1024 * 1024))
    assert reply.status == 413
    assert running_site.get("/hello.lua").status == 200


def test_extension_not_allowed_is_403(running_site):
    head = fcgi_call(running_site.listen, {"SCRIPT_FILENAME": running_site.script_path("notes.txt"),
                                   "REQUEST_METHOD": "GET"})
    assert head.startswith(b"Status: 403")
    assert b"must not run" not in head


def test_no_script_filename_is_500(running_site):
    reply = fcgi_call(running_site.listen, {"REQUEST_METHOD": "GET"})
    assert reply.startswith(b"Status: 500")
    assert b"no script" in reply


def test_cgi_fcgi_direct_request(running_site):
    env = {"SCRIPT_FILENAME": running_site.script_path("hello.lua"), "REQUEST_METHOD": "GET",
           "PATH": os.environ.get("PATH", "")}
    done = subprocess.run(["cgi-fcgi", "-bind", "-connect", running_site.listen], env=env,
                          capture_output=True, timeout=20)
    assert b"Status: 200 OK" in done.stdout
    assert done.stdout.endswith(b"Hello, world!")


def test_keep_conn_reuses_upstream_connections(running_site):
    port = int(running_site.listen.rsplit(":", 1)[1])
    client = http.client.HTTPConnection("127.0.0.1", running_site.port, timeout=10)
    for _ in range(200):
        client.request("GET", "/hello.lua")
        assert client.getresponse().read() == b"Hello, world!"
    client.close()
    worker_conns = [c for proc in psutil.Process(running_site.server.pid).children(recursive=True)
                    for c in proc.net_connections("tcp")
                    if c.laddr and c.laddr.port == port and c.status == "ESTABLISHED"]
    # 200 sequential requests, one kept-alive upstream connection (nginx may open a second)
    assert 1 <= len(worker_conns) <= 2


def test_keep_conn_on_a_raw_connection(running_site):
    with fcgi_connect(running_site.listen) as sock:
        for _ in range(3):
            out = fcgi_call(running_site.listen,
                            {"SCRIPT_FILENAME": running_site.script_path("hello.lua")},
                            sock=sock, keep_conn=True)
            assert out.endswith(b"Hello, world!")


def test_connection_closed_without_keep_conn(running_site):
    with fcgi_connect(running_site.listen) as sock:
        sock.sendall(fcgi_request_bytes({"SCRIPT_FILENAME": running_site.script_path("hello.lua")}))
        records = read_records(sock, until_end_request=False)  # reads to end of stream
    assert records[-1][0] == 3  # END_REQUEST, then the server closed


def test_idle_kept_alive_connections_hold_no_thread(running_site):
    """workers = 4 threads; 100 idle kept-alive connections and 100 silent ones."""
    idle = []
    try:
        for _ in range(100):
            sock = fcgi_connect(running_site.listen)
            fcgi_call(running_site.listen,
                      {"SCRIPT_FILENAME": running_site.script_path("hello.lua")},
                      sock=sock, keep_conn=True)
            idle.append(sock)
        for _ in range(100):
            idle.append(fcgi_connect(running_site.listen))
        started = time.monotonic()
        reply = running_site.get("/hello.lua", timeout=5)
        assert reply.status == 200
        assert time.monotonic() - started < 2
    finally:
        for sock in idle:
            sock.close()


def test_script_change_is_picked_up_after_sweep(running_site):
    path = running_site.docroot / "changing.lua"
    path.write_text('function main(env, con) con:puts("v1") end')
    assert running_site.get("/changing.lua").body == b"v1"
    path.write_text('function main(env, con) con:puts("v2") end')
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    wait_until(lambda: running_site.get("/changing.lua").body == b"v2", timeout=15,
               what="the changed script to be served")


def test_a_slow_script_does_not_hold_up_other_connections(running_site):
    """The thread running a long Lua call hands the event loop to another thread."""
    slow = [socket.create_connection(("127.0.0.1", running_site.port), timeout=15)
            for _ in range(2)]
    try:
        for number, client in enumerate(slow):
            client.sendall(f"GET /slow.lua?s{number} HTTP/1.1\r\nHost: x\r\n"
                           "Connection: close\r\n\r\n".encode())
        wait_until(lambda: all((running_site.docroot / f"started.s{n}").exists() for n in range(2)),
                   what="both slow requests to run")
        for _ in range(20):
            started = time.monotonic()
            assert running_site.get("/hello.lua", timeout=5).body == b"Hello, world!"
            assert time.monotonic() - started < 1
        for number, client in enumerate(slow):
            (running_site.docroot / f"go.s{number}").write_text("")
            reply = b""
            while chunk := client.recv(4096):
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"slow done")
    finally:
        for client in slow:
            client.close()


def test_an_idle_worker_uses_no_cpu_and_wakes_for_the_next_slow_request(tmp_path):
    """The standby thread stops polling when nothing runs, and is woken by the next request."""
    scripts = {"hello.lua": SCRIPTS["hello.lua"], "flags.lua": SCRIPTS["flags.lua"],
               "slow.lua": SCRIPTS["slow.lua"]}
    with Site(tmp_path, scripts, workers=2, sweep=10000) as idle_site:
        for _ in range(20):
            assert idle_site.get("/hello.lua").status == 200
        worker = psutil.Process(idle_site.server.pid).children()[0]
        time.sleep(1.5)  # the standby parks after 1 s of idle polls
        before = sum(worker.cpu_times()[:2])
        time.sleep(3)
        assert sum(worker.cpu_times()[:2]) - before < 0.015  # polling costs ~0.04 s here
        with socket.create_connection(("127.0.0.1", idle_site.port), timeout=15) as slow:
            slow.sendall(b"GET /slow.lua?idle HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            wait_until(lambda: (idle_site.docroot / "started.idle").exists(),
                       what="the slow request to run")
            started = time.monotonic()
            assert idle_site.get("/hello.lua", timeout=5).status == 200
            assert time.monotonic() - started < 1
            (idle_site.docroot / "go.idle").write_text("")
            assert slow.recv(4096).startswith(b"HTTP/1.1 200")
