"""luafcgid behind every web server Debian ships that speaks FastCGI, for real.

Each recipe is the README's config for that server: Apache 2.4 (mod_proxy_fcgi, the
``SetHandler`` recipe with the default ``ProxyFCGIBackendType FPM`` and the
``ProxyPassMatch`` one), lighttpd 1.4 (mod_fastcgi, with and without Debian's
``broken-scriptfilename``), Caddy 2 and h2o 2.2. Per recipe one luafcgid and one web
server are started (module scope) on free loopback ports or unix sockets in a private
dir, and stopped by pid. A server that is not installed is skipped with its reason.
"""

from __future__ import annotations

import http.client as httpclient
import os
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, NamedTuple

import pytest

from luafcgid import protocol
from luafcgid.workers.threaded import LINGER_ABOVE
from tests.support import (
    H2O,
    Apache,
    Caddy,
    Lighttpd,
    Server,
    WebServer,
    as_root,
    fastcgi_connections,
    fcgi_connect,
    fcgi_request_bytes,
    free_port,
    http,
    read_records,
    wait_until,
    web_user,
    write_config,
    write_scripts,
)

pytestmark = pytest.mark.slow

MIB = 1024 * 1024

SCRIPTS = {
    "hello.lua": 'function main(env, con) con:header("Content-Type", "text/plain") '
                 'con:puts("Hello, world!") end',
    "env.lua": """
        function main(env, con)
            con:header("Content-Type", "text/plain")
            for _, name in ipairs({"SCRIPT_FILENAME", "SCRIPT_NAME", "PATH_INFO",
                                   "DOCUMENT_ROOT", "REQUEST_URI", "QUERY_STRING"}) do
                con:puts(name .. "=" .. (env[name] or "-") .. "\\n")
            end
        end""",
    "echo.lua": "function main(env, con) con:header('Content-Type', 'application/octet-stream') "
                "con:puts(con:gets()) end",
    "upload.lua": """
        function main(env, con)
            local file = con:form().file
            con:header("Content-Type", file.content_type)
            con:header("X-Filename", file.filename)
            con:header("X-Note", con:form().note.data)
            con:puts(file.data)
        end""",
    "stream.lua": """
        function main(env, con)
            con:header("Content-Type", "text/plain")
            con:puts("first\\n")
            con:flush()
            -- wait (busy, at most 10 s) until the test creates the file go.<query>
            local flag = env.DOCUMENT_ROOT .. "/go." .. env.QUERY_STRING
            local deadline = os.time() + 10
            while os.time() < deadline do
                local f = io.open(flag)
                if f then f:close() break end
            end
            con:puts("second\\n")
        end""",
    "flushed.lua": 'function main(env, con) con:puts(string.rep("a", 1000)) con:flush() '
                   'con:puts(string.rep("b", 1000)) end',
    "big.lua": 'local page = string.rep("0123456789abcdef", 65536) '
               'function main(env, con) con:header("Content-Type", "text/plain") '
               'con:puts(page) end',
    "notfound.lua": 'function main(env, con) con:status(404) con:puts("no such thing") end',
    "moved.lua": 'function main(env, con) con:redirect("/hello.lua") end',
    "boom.lua": 'function main(env, con) con:puts("partial") error("kaboom") end',
    "cookies.lua": """
        function main(env, con)
            con:cookie("a", "1", {path = "/"})
            con:cookie("b", "2", {path = "/", httponly = true})
            con:header("Set-Cookie", "c=3")
            con:puts("cookies")
        end""",
}
BIG = b"0123456789abcdef" * 65536


class Recipe(NamedTuple):
    server: type
    options: dict
    transport: str           # how the web server reaches luafcgid: "unix" or "tcp"
    reuses_connections: bool  # keeps FastCGI connections open between requests
    no_path_info: str = "-"   # PATH_INFO without path info ("-": not sent)


RECIPES = {
    "apache-sethandler": Recipe(Apache, {"recipe": "sethandler"}, "unix", True),
    "apache-proxypassmatch": Recipe(Apache, {"recipe": "proxypassmatch"}, "tcp", True),
    "lighttpd": Recipe(Lighttpd, {}, "unix", False),
    "lighttpd-broken-scriptfilename": Recipe(Lighttpd, {"broken_scriptfilename": True}, "tcp",
                                             False),
    "caddy": Recipe(Caddy, {}, "unix", False, no_path_info=""),
    "h2o": Recipe(H2O, {}, "unix", True),
}


class Running(NamedTuple):
    name: str
    recipe: Recipe
    server: WebServer
    luafcgid: Server
    docroot: Path
    listen: str

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def host(self) -> str:
        """The Host header the server's config answers (Caddy's site is its address)."""
        return f"127.0.0.1:{self.port}"

    def get(self, path: str, **kwargs: object):
        return http(self.port, path, **kwargs)

    def logs(self) -> str:
        return f"{self.server.logs()}\n--- luafcgid\n{self.luafcgid.output()}"


@pytest.fixture(scope="module")
def base():
    """A private dir the web server's account can read: pytest's own tmp dirs are 0700."""
    path = Path(tempfile.mkdtemp(prefix="luafcgid-webservers-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module", params=list(RECIPES))
def web(request, base):
    name = request.param
    recipe = RECIPES[name]
    reason = recipe.server.missing()
    if reason:
        pytest.skip(f"{name}: {reason}")
    site = base / name
    docroot = write_scripts(site / "www", SCRIPTS)
    if recipe.transport == "unix":
        listen = str(site / "luafcgid.sock")
    else:
        listen = f"127.0.0.1:{free_port()}"
    settings = {"listen": listen, "processes": 1, "workers": 4, "maxpost": 8 * MIB,
                "pidfile": str(site / "luafcgid.pid"), "timeout": 30, **as_root()}
    if web_user():
        settings["socket_owner"] = web_user()  # the web server's workers connect as it
    luafcgid = Server(write_config(site / "config.lua", **settings), listen).start()
    server = recipe.server(site / "server", docroot, listen, **recipe.options)
    try:
        server.start()
    except Exception:
        luafcgid.stop()
        raise
    yield Running(name, recipe, server, luafcgid, docroot, listen)
    server.stop()
    luafcgid.stop()


def check(web: Running, condition: Callable[[], bool], what: str) -> None:
    """Assert with the web server's and luafcgid's logs at hand."""
    assert condition(), f"{web.name}: {what}\n{web.logs()}"


def test_hello(web):
    reply = web.get("/hello.lua")
    assert (reply.status, reply.body) == (200, b"Hello, world!"), web.logs()
    assert reply.header("Content-Type") == "text/plain"
    assert reply.header("Status") is None  # the CGI Status line is not passed on as a header


@pytest.mark.parametrize("path, script_name, path_info", [
    ("/env.lua?q=1", "/env.lua", None),
    ("/env.lua/extra/path?q=1", "/env.lua", "/extra/path"),
    ("/env.lua/?q=1", "/env.lua", "/"),
])
def test_env_names_the_script_and_its_path_info(web, path, script_name, path_info):
    reply = web.get(path)
    assert reply.status == 200, web.logs()
    env = dict(line.split("=", 1) for line in reply.body.decode().splitlines())
    assert env == {
        "SCRIPT_FILENAME": str(web.docroot / "env.lua"),
        "SCRIPT_NAME": script_name,
        "PATH_INFO": web.recipe.no_path_info if path_info is None else path_info,
        "DOCUMENT_ROOT": str(web.docroot),
        "REQUEST_URI": path,
        "QUERY_STRING": "q=1",
    }, web.logs()


def test_post_of_five_mebibytes_is_echoed_byte_exact(web):
    body = os.urandom(5 * MIB)
    reply = web.get("/echo.lua", method="POST", body=body,
                    headers={"Content-Type": "application/octet-stream"})
    assert reply.status == 200, web.logs()
    assert reply.body == body


def test_multipart_upload_of_one_mebibyte_through_con_form(web):
    data = os.urandom(MIB)
    boundary = uuid.uuid4().hex
    body = b"".join([
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\n".encode(),
        b"hello\r\n",
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
        f"filename=\"blob.bin\"\r\nContent-Type: application/x-test\r\n\r\n".encode(),
        data, f"\r\n--{boundary}--\r\n".encode()])
    reply = web.get("/upload.lua", method="POST", body=body,
                    headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert reply.status == 200, web.logs()
    assert (reply.header("X-Filename"), reply.header("X-Note")) == ("blob.bin", "hello")
    assert reply.header("Content-Type") == "application/x-test"
    assert reply.body == data


def test_flush_reaches_the_client_before_the_handler_returns(web):
    flag = uuid.uuid4().hex
    with socket.create_connection(("127.0.0.1", web.port), timeout=10) as client:
        client.sendall(f"GET /stream.lua?{flag} HTTP/1.1\r\nHost: {web.host}\r\n"
                       "Connection: close\r\n\r\n".encode())
        received = b""
        deadline = time.monotonic() + 10
        try:
            while b"first" not in received and time.monotonic() < deadline:
                chunk = client.recv(4096)
                if not chunk:
                    break
                received += chunk
        finally:
            (web.docroot / f"go.{flag}").write_text("")  # let the handler finish either way
        check(web, lambda: b"first" in received and b"second" not in received,
              f"the flushed part did not arrive alone: {received!r}")
        while True:
            chunk = client.recv(4096)
            if not chunk:
                break
            received += chunk
    assert b"second" in received


@pytest.mark.parametrize("path, status, body", [
    ("/notfound.lua", 404, b"no such thing"),
    ("/boom.lua", 500, None),
    ("/missing.lua", 404, None),
])
def test_error_statuses(web, path, status, body):
    reply = web.get(path)
    assert reply.status == status, web.logs()
    if body is not None:
        assert reply.body == body
    assert b"partial" not in reply.body and b"kaboom" not in reply.body


def test_redirect(web):
    reply = web.get("/moved.lua")
    assert reply.status == 302, web.logs()
    assert reply.header("Location") == "/hello.lua"


def test_several_set_cookie_headers_arrive(web):
    reply = web.get("/cookies.lua")
    assert reply.status == 200, web.logs()
    assert reply.headers_named("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/; HttpOnly", "c=3"]


@pytest.mark.parametrize("path, buffered", [("/big.lua", True), ("/flushed.lua", False)])
def test_head_gets_no_body_and_the_next_response_on_the_connection_is_intact(web, path,
                                                                              buffered):
    get = web.get(path)
    connection = httpclient.HTTPConnection("127.0.0.1", web.port, timeout=10)
    try:
        head = http(web.port, path, method="HEAD", connection=connection)
        assert (head.status, head.body) == (200, b""), web.logs()
        if buffered:  # it keeps the Content-Length a GET gets (both none when chunked)
            assert head.header("Content-Length") == get.header("Content-Length")
        after = http(web.port, "/hello.lua", connection=connection)
    except httpclient.HTTPException as error:
        raise AssertionError(f"{web.name}: the response after a HEAD is broken: {error!r}\n"
                             f"{web.logs()}") from error
    finally:
        connection.close()
    assert (after.status, after.body) == (200, b"Hello, world!")
    # And on the wire: nothing at all follows the head.
    with socket.create_connection(("127.0.0.1", web.port), timeout=10) as client:
        client.sendall(f"HEAD {path} HTTP/1.1\r\nHost: {web.host}\r\n"
                       "Connection: close\r\n\r\n".encode())
        received = b""
        while True:
            chunk = client.recv(65536)
            if not chunk:
                break
            received += chunk
    head_bytes, _, rest = received.partition(b"\r\n\r\n")
    assert head_bytes.startswith(b"HTTP/1.1 200")
    assert b"\r\ncontent-type: text/" in head_bytes.lower()  # the script's head, not a stub
    assert rest == b"", f"{web.name}: a body follows the head of a HEAD: {rest[:100]!r}"


def test_a_hundred_requests_on_one_client_connection(web):
    connection = httpclient.HTTPConnection("127.0.0.1", web.port, timeout=10)
    try:
        for number in range(100):
            if number % 2:
                reply = http(web.port, "/hello.lua", connection=connection)
                assert reply.body == b"Hello, world!", web.logs()
            else:
                reply = http(web.port, f"/env.lua?n={number}", connection=connection)
                assert f"QUERY_STRING=n={number}\n".encode() in reply.body, web.logs()
            if number == 0:
                client_socket = connection.sock
            assert connection.sock is client_socket, f"reconnected at request {number}"
    finally:
        connection.close()
    open_connections = fastcgi_connections(web.luafcgid.pid, web.listen)
    if web.recipe.reuses_connections:
        check(web, lambda: open_connections >= 1,
              "no FastCGI connection kept open: connection reuse is off")
    else:  # as the README says of this server: one FastCGI connection per request
        wait_until(lambda: fastcgi_connections(web.luafcgid.pid, web.listen) == 0, 5,
                   "the server's FastCGI connections to close")


def test_one_mebibyte_answer(web):
    reply = web.get("/big.lua")
    assert reply.status == 200, web.logs()
    assert reply.body == BIG


# --- a FastCGI client that is not a web server: flup's FCGIApp ------------------------------


@pytest.fixture(scope="module")
def backend(base):
    """luafcgid alone on TCP: (its docroot, its address)."""
    site = base / "clients"
    docroot = write_scripts(site / "www", SCRIPTS)
    listen = f"127.0.0.1:{free_port()}"
    settings = {"listen": listen, "processes": 1, "workers": 2,
                "pidfile": str(site / "luafcgid.pid"), **as_root()}
    luafcgid = Server(write_config(site / "config.lua", **settings), listen).start()
    yield docroot, listen
    luafcgid.stop()


@pytest.mark.parametrize("script, body", [("hello.lua", b"Hello, world!"), ("big.lua", BIG)])
def test_a_client_that_sends_an_empty_data_record_after_stdin_gets_its_whole_answer(
        backend, script, body):
    """flup's FCGIApp (no KEEP_CONN) ends each request with an empty DATA record. It must
    not cost the answer: neither refused, nor cut short by a reset, which closing the
    connection with that record unread would send (the kernel then drops the end of a
    large answer it still holds)."""
    docroot, listen = backend
    params = {"REQUEST_METHOD": "GET", "SCRIPT_FILENAME": str(docroot / script)}
    for _ in range(3):
        with fcgi_connect(listen) as client:
            client.sendall(fcgi_request_bytes(params))
            # The DATA record once the answer is under way, as a slow client's would come.
            wait_until(lambda: client.recv(1, socket.MSG_PEEK), 10, "the answer to start")
            client.sendall(protocol.encode_record(protocol.DATA, 1))
            records = read_records(client)
            assert records[-1][0] == protocol.END_REQUEST
            assert b"".join(content for kind, _, content in records
                            if kind == protocol.STDOUT).endswith(b"\r\n\r\n" + body)
            if len(body) > LINGER_ABOVE:  # closed by lingering: it ends cleanly
                assert client.recv(1) == b""
            # (a small answer's connection is closed at once, and the late record may
            # draw a reset: harmless, the client has the whole answer by then)
