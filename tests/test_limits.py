"""Every limit at its edge, through a real nginx: one below answers normally, one above gets
the documented answer (never a dropped connection, so never a 502), the log names the limit
and the key that raises it, and the worker serves the next request."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from luafcgid import protocol
from tests.support import Site, fcgi_call, fcgi_connect, wait_until

pytestmark = [pytest.mark.nginx, pytest.mark.slow]

HEADERS = """
function main(env, con)
    local count = 0
    for name in pairs(env) do
        if name:find("^HTTP_X_") then count = count + 1 end
    end
    con:puts(count)
end"""
ECHO = "function main(env, con) con:puts(#con:gets()) end"
HELLO = 'function main(env, con) con:puts("hello") end'
# Says it started, then holds its thread until the test creates the flag (at most 10 s).
HOLD = """
function main(env, con)
    local dir = env.DOCUMENT_ROOT
    io.open(dir .. "/started." .. env.QUERY_STRING, "w"):close()
    local deadline = os.time() + 10
    while os.time() < deadline do
        local flag = io.open(dir .. "/go")
        if flag then flag:close() break end
    end
    con:puts("held")
end"""
SCRIPTS = {"headers.lua": HEADERS, "echo.lua": ECHO, "hello.lua": HELLO, "hold.lua": HOLD}


def raw_http(port: int, header_lines: list) -> tuple:
    """A GET with exactly these header lines (http.client would fold nothing, but caps at 100)."""
    request = ("GET /headers.lua HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
               + "".join(f"{line}\r\n" for line in header_lines) + "\r\n").encode()
    with fcgi_connect(f"127.0.0.1:{port}") as sock:
        sock.sendall(request)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), head.decode("latin-1"), body


@pytest.fixture(scope="module")
def running_site(tmp_path_factory):
    base = tmp_path_factory.mktemp("limits")
    with Site(base, SCRIPTS, processes=1, workers=2, max_params=16384, maxpost=4096) as running:
        yield running


def test_a_thousand_headers_are_taken(running_site):
    # The request nginx 1.22 passes with its default buffers; the old 1000-pair cap dropped it.
    lines = [f"X-{number}: v" for number in range(990)]
    status, _, body = raw_http(running_site.port, lines)
    # max_params = 16384 here: 990 short headers are ~15 KiB of params.
    assert (status, body) == (200, b"990")


def test_params_at_and_over_max_params(running_site):
    below = [f"X-Big-{number}: {'a' * 4000}" for number in range(3)]   # ~12 KiB of params
    status, _, body = raw_http(running_site.port, below)
    assert (status, body) == (200, b"3")
    over = [f"X-Big-{number}: {'a' * 4000}" for number in range(5)]    # ~20 KiB
    status, head, body = raw_http(running_site.port, over)
    assert status == 431, head
    assert b"431 Request Header Fields Too Large" in body
    assert raw_http(running_site.port, below)[0] == 200  # the next request is served
    log = wait_until(lambda: "over max_params" in running_site.server.output()
                     and running_site.server.output())
    assert "over max_params (16384 bytes): answered 431; raise max_params" in log
    assert "prematurely" not in running_site.nginx.error_log()


def test_body_at_and_over_maxpost(running_site):
    assert running_site.get("/echo.lua", method="POST", body=b"x" * 4096).body == b"4096"
    over = running_site.get("/echo.lua", method="POST", body=b"x" * 4097)
    assert over.status == 413
    assert running_site.get("/echo.lua", method="POST", body=b"y").body == b"1"
    assert "over maxpost (4096 bytes), answered 413" in running_site.server.output()


def test_at_max_connections_an_idle_connection_makes_room(tmp_path):
    site = Site(tmp_path, SCRIPTS, processes=1, workers=2, max_connections=2)
    site.server.start()
    try:
        params = {"SCRIPT_FILENAME": site.script_path("hello.lua")}
        idle = [fcgi_connect(site.listen) for _ in range(2)]
        for sock in idle:  # each carries a request, then sits between requests
            assert fcgi_call(site.listen, params, sock=sock, keep_conn=True).endswith(b"hello")
        assert fcgi_call(site.listen, params).endswith(b"hello")  # a third one is taken
        # The oldest idle connection was let go to make room: it reads end of stream.
        idle[0].settimeout(5)
        assert idle[0].recv(1) == b""
        assert fcgi_call(site.listen, params, sock=idle[1], keep_conn=True).endswith(b"hello")
    finally:
        for sock in idle:
            sock.close()
        site.server.stop()


def test_a_full_worker_answers_503_with_retry_after(tmp_path):
    with Site(tmp_path, SCRIPTS, processes=1, workers=3, max_connections=2) as site:
        docroot: Path = site.docroot
        held = [threading.Thread(target=site.get, args=(f"/hold.lua?{n}",)) for n in range(2)]
        for thread in held:
            thread.start()
        for n in range(2):
            wait_until(lambda n=n: (docroot / f"started.{n}").exists(), what="a held request")
        began = time.monotonic()
        response = site.get("/hello.lua")
        waited = time.monotonic() - began
        assert response.status == 503, response
        assert response.header("Retry-After") == "1"
        assert 0.5 < waited < 5  # it waited in the backlog for another worker, first
        (docroot / "go").touch()
        for thread in held:
            thread.join(15)
        assert site.get("/hello.lua").body == b"hello"
        log = site.server.output()
        nginx_log = site.nginx.error_log()
    assert "2 connections (max_connections) and more waiting for 1 s: answered 1 with 503" in log
    assert "upstream prematurely closed" not in nginx_log


def test_get_values_tells_the_connection_cap(tmp_path):
    site = Site(tmp_path, SCRIPTS, processes=1, max_connections=7)
    site.server.start()
    try:
        with fcgi_connect(site.listen) as sock:
            sock.sendall(protocol.encode_record(protocol.GET_VALUES, 0, protocol.encode_pairs(
                [(b"FCGI_MAX_CONNS", b""), (b"FCGI_MAX_REQS", b"")])))
            reply = b""
            while len(reply) < 8 or len(reply) < 8 + int.from_bytes(reply[4:6], "big"):
                reply += sock.recv(4096)
        assert reply[1] == protocol.GET_VALUES_RESULT
        length = int.from_bytes(reply[4:6], "big")
        assert protocol.decode_pairs(reply[8:8 + length]) == {b"FCGI_MAX_CONNS": b"7",
                                                              b"FCGI_MAX_REQS": b"4"}
    finally:
        site.server.stop()
