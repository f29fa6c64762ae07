"""`luafcgid request`: a FastCGI client against a real server, no web server in between."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from luafcgid.cli import main
from tests.support import Server, as_root, free_port, write_config, write_scripts

pytestmark = pytest.mark.slow

SCRIPTS = {
    "hello.lua": 'function main(env, con) con:puts("hello") end',
    "env.lua": """function main(env, con)
        con:header("Content-Type", "text/plain")
        con:header("X-Seen", "yes")
        local names = {}
        for name in pairs(env) do names[#names + 1] = name end
        table.sort(names)
        for _, name in ipairs(names) do con:puts(name .. "=" .. env[name] .. "\\n") end
        con:puts("BODY=" .. (con:gets() or "") .. "\\n")
    end""",
    "fail.lua": 'function main(env, con) error("boom") end',
    "sub/deep.lua": 'function main(env, con) con:puts("deep " .. env.SCRIPT_NAME) end',
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("request")
    docroot = write_scripts(base / "www", SCRIPTS)
    listen = str(base / "fcgi.sock")
    config = write_config(base / "config.lua", listen=listen, processes=1, root=str(docroot),
                          pidfile=str(base / "p.pid"), ping_path="/ping", **as_root())
    server = Server(config, listen).start()
    server.docroot = docroot
    yield server
    server.stop()


def run(*args: str, stdin: bytes = b""):
    return CliRunner().invoke(main, ["request", *args], input=stdin)


def env_of(result) -> dict:
    return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)


def test_url_against_the_configs_root_sets_the_cgi_params(server):
    result = run("-c", str(server.config), "-H", "X-Token: abc", "-H", "Content-Type: text/x",
                 "-X", "PUT", "-d", "payload", "/env.lua?a=1&b=2")
    assert result.exit_code == 0, result.stderr
    env = env_of(result)
    docroot = str(server.docroot)
    assert env["SCRIPT_FILENAME"] == f"{docroot}/env.lua"
    assert env["SCRIPT_NAME"] == "/env.lua" and env["DOCUMENT_ROOT"] == docroot
    assert env["QUERY_STRING"] == "a=1&b=2" and env["REQUEST_URI"] == "/env.lua?a=1&b=2"
    assert env["REQUEST_METHOD"] == "PUT" and env["BODY"] == "payload"
    assert env["CONTENT_LENGTH"] == "7" and env["CONTENT_TYPE"] == "text/x"
    assert env["HTTP_X_TOKEN"] == "abc" and env["REMOTE_ADDR"] == "127.0.0.1"
    assert env["GATEWAY_INTERFACE"] == "CGI/1.1" and env["SERVER_PROTOCOL"] == "HTTP/1.1"


def test_a_script_path_and_the_head(server, monkeypatch):
    monkeypatch.chdir(server.docroot)
    result = run("--connect", server.listen, "-i", "sub/deep.lua")
    assert result.exit_code == 0, result.stderr
    head, _, body = result.stdout_bytes.partition(b"\n\n")
    assert head.startswith(b"Status: 200 OK\nContent-Type: text/html")
    # No root given: the script's absolute path is its SCRIPT_NAME too.
    assert body == b"deep " + str(server.docroot / "sub/deep.lua").encode()
    inside_root = run("-c", str(server.config), str(server.docroot / "sub/deep.lua"))
    assert inside_root.stdout == "deep /sub/deep.lua"


def test_post_body_from_a_file_and_from_stdin(server, tmp_path):
    (tmp_path / "body").write_bytes(b"from a file")
    from_file = run("-c", str(server.config), "-d", f"@{tmp_path / 'body'}", "/env.lua")
    assert env_of(from_file)["BODY"] == "from a file"
    assert env_of(from_file)["REQUEST_METHOD"] == "POST"
    assert env_of(from_file)["CONTENT_TYPE"] == "application/x-www-form-urlencoded"
    from_stdin = run("-c", str(server.config), "-d", "@-", "/env.lua", stdin=b"piped")
    assert env_of(from_stdin)["BODY"] == "piped"


def test_ping_without_a_root(server):
    result = run("--connect", server.listen, "/ping")
    assert (result.exit_code, result.stdout) == (0, "pong")


def test_exit_status_for_health_checks(server, tmp_path):
    """A real process, as systemd or a container would run it: 5xx and no server fail."""
    command = [sys.executable, "-m", "luafcgid", "request", "-c", str(server.config)]
    ok = subprocess.run(command + ["/hello.lua"], capture_output=True, timeout=30)
    assert (ok.returncode, ok.stdout) == (0, b"hello")
    missing = subprocess.run(command + ["/missing.lua"], capture_output=True, timeout=30)
    assert missing.returncode == 0 and missing.stdout.startswith(b"404")
    failed = subprocess.run(command + ["/fail.lua"], capture_output=True, timeout=30)
    assert failed.returncode == 1 and b"answered 500" in failed.stderr
    nobody = f"127.0.0.1:{free_port()}"
    refused = subprocess.run(command + ["--connect", nobody, "/hello.lua"],
                             capture_output=True, timeout=30)
    assert refused.returncode == 1 and f"cannot connect to {nobody}".encode() in refused.stderr


def test_bad_header_is_a_usage_error(server):
    result = run("-c", str(server.config), "-H", "no colon", "/hello.lua")
    assert result.exit_code == 1 and "expected 'Name: value'" in result.stderr


def test_a_url_path_without_a_root_is_taken_from_the_current_directory(server, monkeypatch):
    """`api.lua?id=1` (a file here) and `/api.lua?id=1` (a URL path) ask for the same
    script when no root is known, as `php -S` serves the current directory."""
    monkeypatch.chdir(server.docroot)
    relative = run("--connect", server.listen, "env.lua?id=1")
    absolute = run("--connect", server.listen, "/env.lua?id=1")
    for result in (relative, absolute):
        assert result.exit_code == 0, result.stderr
        env = env_of(result)
        assert env["SCRIPT_FILENAME"] == str(server.docroot / "env.lua")
        assert env["QUERY_STRING"] == "id=1"
    assert env_of(absolute)["DOCUMENT_ROOT"] == str(server.docroot)


def test_a_missing_script_without_a_root_hints_at_the_option(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run("--connect", server.listen, "/hello.lua")
    assert result.exit_code == 0 and result.stdout.startswith("403")  # outside its root
    assert ("no document root given (--root DIR, or root in the config): /hello.lua was "
            f"taken from the current directory {tmp_path}") in result.stderr
    rooted = run("--connect", server.listen, "--root", str(server.docroot), "/hello.lua")
    assert (rooted.exit_code, rooted.stdout, rooted.stderr) == (0, "hello", "")
