"""app.py: which script a request names, and what a refused or failing one gets."""

from __future__ import annotations

import os

import pytest

from luafcgid.app import Application
from luafcgid.config import from_mapping
from luafcgid.protocol import Request
from luafcgid.response import body_bytes, error_page, status_of

HELLO = 'function main(env, con) con:puts("hi") end'


def request(filename, body=b"", too_large=False, **params):
    values = {b"REQUEST_METHOD": b"GET"}
    if filename is not None:
        values[b"SCRIPT_FILENAME"] = filename if isinstance(filename, bytes) else filename.encode()
    values.update({k.encode(): v.encode() for k, v in params.items()})
    return Request(1, True, values, body, too_large)


@pytest.fixture
def www(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    (root / "hello.lua").write_text(HELLO)
    return root


def make_app(**settings):
    return Application(from_mapping({"headers": "X-Site: t\r\n", **settings}))


def test_serves_a_script(www):
    output = make_app().handle(request(str(www / "hello.lua")), lambda data: None, 1)
    assert status_of(output) == 200
    assert output.endswith(b"\r\n\r\nhi")


@pytest.mark.parametrize("name, code", [
    ("missing.lua", 404),
    ("notes.txt", 403),
    ("dir.lua", 404),
    ("fifo.lua", 404),
])
def test_refusals(www, name, code):
    (www / "notes.txt").write_text(HELLO)
    (www / "dir.lua").mkdir()
    os.mkfifo(www / "fifo.lua")
    output = make_app().handle(request(str(www / name)), lambda data: None, 1)
    assert status_of(output) == code
    assert b"X-Site: t\r\n" in output
    assert b"hi" not in output.split(b"\r\n\r\n", 1)[1]


def test_root_confinement_resolves_dotdot_and_symlinks(tmp_path, www):
    outside = tmp_path / "outside.lua"
    outside.write_text(HELLO)
    (www / "link.lua").symlink_to(outside)
    app = make_app(root=str(www))
    for name in (str(www / ".." / "outside.lua"), str(www / "link.lua"),
                 str(www) + "//..//outside.lua"):
        assert status_of(app.handle(request(name), lambda data: None, 1)) == 403, name
    assert status_of(app.handle(request(str(www / "hello.lua")), lambda data: None, 1)) == 200
    (www / "inner.lua").symlink_to(www / "hello.lua")
    assert status_of(app.handle(request(str(www / "inner.lua")), lambda data: None, 1)) == 200


def test_symlink_to_a_file_with_another_extension_is_refused(www):
    (www / "data.txt").write_text(HELLO)
    (www / "sneaky.lua").symlink_to(www / "data.txt")
    assert status_of(make_app().handle(request(str(www / "sneaky.lua")), lambda d: None, 1)) == 403


def test_nul_byte_in_name_is_refused(www):
    name = str(www / "hello.lua").encode() + b"\0.lua"
    assert status_of(make_app().handle(request(name), lambda data: None, 1)) == 404


def test_no_script_filename(www, caplog):
    output = make_app().handle(request(None), lambda data: None, 1)
    assert status_of(output) == 500
    assert output.endswith(b"no script\n")


def test_body_too_large_is_413(www):
    output = make_app().handle(request(str(www / "hello.lua"), too_large=True),
                               lambda data: None, 1)
    assert status_of(output) == 413


def test_script_deleted_after_first_request_is_404_once_paths_are_forgotten(www):
    """The worker forgets paths every second: until then the known script is not stat'ed."""
    app = make_app()
    path = www / "hello.lua"
    assert status_of(app.handle(request(str(path)), lambda data: None, 1)) == 200
    path.unlink()
    assert status_of(app.handle(request(str(path)), lambda data: None, 1)) == 200
    app.forget_paths()
    assert status_of(app.handle(request(str(path)), lambda data: None, 1)) == 404


@pytest.mark.parametrize("showerrors", [False, True])
def test_errors_show_lua_text_only_with_showerrors(www, showerrors):
    (www / "boom.lua").write_text('function main(env, con) con:puts("half") error("kaboom") end')
    (www / "bad.lua").write_text("function main(")
    app = make_app(showerrors=showerrors)
    for name, text in (("boom.lua", b"kaboom"), ("bad.lua", b"bad.lua")):
        output = app.handle(request(str(www / name)), lambda data: None, 1)
        assert status_of(output) == 500
        body = output.split(b"\r\n\r\n", 1)[1]
        assert (text in body) is showerrors
        assert b"half" not in body


def test_error_log_names_script_and_traceback(www, log_lines):
    (www / "boom.lua").write_text('function main(env, con) error("kaboom") end')
    make_app().handle(request(str(www / "boom.lua")), lambda data: None, 1)
    text = "\n".join(log_lines)
    assert "boom.lua" in text and "kaboom" in text and "traceback" in text.lower()


def test_script_deleted_before_its_state_is_loaded_again_is_404(www):
    """The heartbeat dropped the state of a deleted script whose path is still known:
    the failed load is a 404, as the next look at the path would say, not a 500."""
    app = make_app()
    path = www / "hello.lua"
    assert status_of(app.handle(request(str(path)), lambda data: None, 1)) == 200
    path.unlink()
    assert app.sweep() == 1
    assert status_of(app.handle(request(str(path)), lambda data: None, 1)) == 404


def test_forget_paths_sees_a_moved_symlink(tmp_path, www):
    app = make_app(root=str(www))
    link = www / "moving.lua"
    link.symlink_to(www / "hello.lua")
    assert status_of(app.handle(request(str(link)), lambda data: None, 1)) == 200
    outside = tmp_path / "out.lua"
    outside.write_text(HELLO)
    link.unlink()
    link.symlink_to(outside)
    app.forget_paths()
    assert status_of(app.handle(request(str(link)), lambda data: None, 1)) == 403


# --- SCRIPT_FILENAME as php-fpm takes it ---------------------------------------------------

ENV = """
function main(env, con)
    for _, name in ipairs({"SCRIPT_FILENAME", "SCRIPT_NAME", "PATH_INFO", "PATH_TRANSLATED",
                           "ORIG_SCRIPT_FILENAME", "ORIG_SCRIPT_NAME", "ORIG_PATH_INFO"}) do
        con:puts(name .. "=" .. (env[name] or "-") .. "\\n")
    end
end
"""


def env_of(output: bytes) -> dict:
    assert status_of(output) == 200, output
    body = output.split(b"\r\n\r\n", 1)[1].decode()
    return dict(line.split("=", 1) for line in body.splitlines())


@pytest.fixture
def env_app(www):
    (www / "env.lua").write_text(ENV)
    return make_app(root=str(www))


@pytest.mark.parametrize("prefix", ["proxy:fcgi://localhost", "proxy:fcgi://127.0.0.1:9000",
                                    "PROXY:FCGI://localhost", "proxy:balancer://cluster"])
def test_apache_proxy_prefix_is_stripped(www, env_app, prefix):
    """Apache's default ProxyFCGIBackendType FPM: ``proxy:fcgi://host[:port]/path``."""
    script = str(www / "env.lua")
    for _ in range(2):  # the first looks at the file, the second knows it
        env = env_of(env_app.handle(request(prefix + script + "?a=b", SCRIPT_NAME="/env.lua"),
                                    lambda data: None, 1))
        assert env["SCRIPT_FILENAME"] == script
        assert env["ORIG_SCRIPT_FILENAME"] == "-"  # php-fpm strips it in place: no ORIG_ name
        assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("/env.lua", "-")
    assert env_app.real_paths == {script.encode(): script}


def test_proxy_prefix_without_a_path_is_refused(env_app, log_lines):
    output = env_app.handle(request("proxy:fcgi://localhost"), lambda data: None, 1)
    assert status_of(output) == 500
    assert any("not an absolute path" in line for line in log_lines)


@pytest.mark.parametrize("prefix, tail, sent, expected", [
    # Apache's ProxyPassMatch "^/(.*\.lua(/.*)?)$": no PATH_INFO, SCRIPT_NAME has the tail too
    ("proxy:fcgi://localhost", "/extra/path", {"SCRIPT_NAME": "/env.lua/extra/path"},
     {"SCRIPT_NAME": "/env.lua", "PATH_INFO": "/extra/path", "PATH_TRANSLATED": "{www}/extra/path",
      "ORIG_SCRIPT_NAME": "/env.lua/extra/path", "ORIG_PATH_INFO": "-"}),
    ("proxy:fcgi://localhost", "/", {"SCRIPT_NAME": "/env.lua/"},
     {"SCRIPT_NAME": "/env.lua", "PATH_INFO": "/", "PATH_TRANSLATED": "{www}/",
      "ORIG_SCRIPT_NAME": "/env.lua/", "ORIG_PATH_INFO": "-"}),
    # lighttpd's broken-scriptfilename: its own PATH_INFO stands, and it adds a "/" to the
    # name of a request without path info
    ("", "/extra/path", {"SCRIPT_NAME": "/env.lua", "PATH_INFO": "/extra/path"},
     {"SCRIPT_NAME": "/env.lua", "PATH_INFO": "/extra/path", "PATH_TRANSLATED": "{www}/extra/path",
      "ORIG_SCRIPT_NAME": "-", "ORIG_PATH_INFO": "-"}),
    ("", "/", {"SCRIPT_NAME": "/env.lua"},
     {"SCRIPT_NAME": "/env.lua", "PATH_INFO": "-", "PATH_TRANSLATED": "{www}",
      "ORIG_SCRIPT_NAME": "-", "ORIG_PATH_INFO": "-"}),
    # mod_fastcgi's Action: PATH_INFO holds the script's name as well
    ("", "/x", {"SCRIPT_NAME": "/cgi-bin/lua", "PATH_INFO": "/env.lua/x"},
     {"SCRIPT_NAME": "/env.lua", "PATH_INFO": "/x", "PATH_TRANSLATED": "{www}/x",
      "ORIG_SCRIPT_NAME": "/cgi-bin/lua", "ORIG_PATH_INFO": "/env.lua/x"}),
])
def test_path_after_the_script_is_split_off_as_php_fpm_does(www, env_app, prefix, tail, sent,
                                                           expected):
    name = f"{prefix}{www}/env.lua{tail}"
    env = env_of(env_app.handle(request(name, DOCUMENT_ROOT=str(www) + "/", **sent),
                                lambda data: None, 1))
    assert env == {"SCRIPT_FILENAME": str(www / "env.lua"),
                   "ORIG_SCRIPT_FILENAME": f"{www}/env.lua{tail}",
                   **{key: value.format(www=www) for key, value in expected.items()}}


def test_path_translated_without_document_root_and_scripts_in_directories(www, env_app):
    """No DOCUMENT_ROOT: PATH_TRANSLATED is the script's path less SCRIPT_NAME, plus
    PATH_INFO. A directory with the extension is walked through to the script in it."""
    (www / "app.lua").mkdir()
    (www / "app.lua" / "env.lua").write_text((www / "env.lua").read_text())
    env = env_of(env_app.handle(request(f"proxy:fcgi://localhost{www}/app.lua/env.lua/x/y",
                                        SCRIPT_NAME="/app.lua/env.lua/x/y"),
                                lambda data: None, 1))
    assert env["SCRIPT_FILENAME"] == str(www / "app.lua" / "env.lua")
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("/app.lua/env.lua", "/x/y")
    assert env["PATH_TRANSLATED"] == str(www) + "/x/y"


@pytest.mark.parametrize("name, code", [
    ("notes.txt/x.lua", 404),      # a file of another extension is never the script
    ("notes.txt/extra", 403),      # no name with an allowed extension at all
    ("missing.lua/extra", 404),
    ("dir.lua/extra", 404),        # a directory is not a script
    ("link.lua/extra", 403),       # a symlink out of root, walked back to
    ("sneaky.lua/extra", 403),     # a .lua symlink to a .txt file
    ("../outside.lua/extra", 403),
])
def test_the_walk_back_keeps_every_check(tmp_path, www, name, code):
    (www / "notes.txt").write_text(HELLO)
    (www / "dir.lua").mkdir()
    (tmp_path / "outside.lua").write_text(HELLO)
    (www / "link.lua").symlink_to(tmp_path / "outside.lua")
    (www / "sneaky.lua").symlink_to(www / "notes.txt")
    app = make_app(root=str(www))
    output = app.handle(request(f"{www}/{name}", DOCUMENT_ROOT=str(www)), lambda data: None, 1)
    assert status_of(output) == code
    assert not output.endswith(b"hi")
    assert app.real_paths == {}


def test_the_walk_back_stops_short_of_the_document_root(tmp_path):
    """A DOCUMENT_ROOT that names a file (a misconfiguration) is never taken for the script."""
    (tmp_path / "site.lua").write_text(HELLO)
    app = make_app()
    name = str(tmp_path / "site.lua" / "index.lua")
    beneath = request(name, DOCUMENT_ROOT=str(tmp_path / "site.lua"))
    assert status_of(app.handle(beneath, lambda data: None, 1)) == 404
    assert status_of(app.handle(request(name), lambda data: None, 1)) == 200


def test_split_names_use_the_path_cache_and_made_up_ones_do_not_grow_it(www, env_app):
    script = str(www / "env.lua")
    for number in range(50):
        name = f"proxy:fcgi://localhost{script}/{number}"
        env = env_of(env_app.handle(request(name, SCRIPT_NAME=f"/env.lua/{number}"),
                                    lambda data: None, 1))
        assert env["PATH_INFO"] == f"/{number}"
        missing = env_app.handle(request(f"{www}/nope{number}.lua/x"), lambda data: None, 1)
        assert status_of(missing) == 404
    assert env_app.real_paths == {script.encode(): script}
    # Known for a second: a deleted script is still found by its name, without a stat ...
    (www / "env.lua").unlink()
    (www / "env.lua").mkdir()
    assert status_of(env_app.handle(request(script + "/more"), lambda data: None, 1)) == 200
    # ... and gone once the worker's tick forgets the paths.
    env_app.forget_paths()
    assert status_of(env_app.handle(request(script + "/more"), lambda data: None, 1)) == 404


def test_relative_script_filename_is_refused_not_taken_from_the_working_directory(
        www, monkeypatch, log_lines):
    monkeypatch.chdir(www)
    output = make_app().handle(request("hello.lua", DOCUMENT_ROOT=str(www)), lambda d: None, 1)
    assert status_of(output) == 500
    assert not output.endswith(b"hi")
    assert any("hello.lua: SCRIPT_FILENAME is not an absolute path" in line for line in log_lines)


# --- HEAD -----------------------------------------------------------------------------------

STREAM = """
function main(env, con)
    con:header("X-Method", env.REQUEST_METHOD)
    con:puts("first ")
    con:flush()
    con:puts("second")
    con:flush()
    con:puts("last")
end
"""


def get_and_head(app, name):
    """GET then HEAD: (GET's flushed output + its output, HEAD's flushed output, its output)."""
    answers = []
    for method in ("GET", "HEAD"):
        sent = []
        output = app.handle(request(name, REQUEST_METHOD=method), sent.append, 1)
        answers += (b"".join(sent), output)
    return answers


@pytest.mark.parametrize("name", ["hello.lua", "missing.lua", "notes.txt"])
def test_head_gets_the_head_of_a_get_with_its_content_length(www, name):
    (www / "notes.txt").write_text(HELLO)
    get_sent, get, head_sent, head = get_and_head(make_app(), str(www / name))
    get_head, get_body = get.split(b"\r\n\r\n", 1)
    assert get_body and b"Content-Length: %d\r\n" % len(get_body) in get_head + b"\r\n"
    assert head == get_head + b"\r\n\r\n"
    assert get_sent == head_sent == b""


@pytest.mark.parametrize("buffering", [True, False])
def test_head_of_a_streamed_answer_sends_the_head_only(www, buffering):
    (www / "stream.lua").write_text(STREAM)
    get_sent, get, sent, head = get_and_head(make_app(buffering=buffering),
                                             str(www / "stream.lua"))
    assert (get_sent + get).endswith(b"\r\n\r\nfirst secondlast")
    assert sent.startswith(b"Status: 200 OK\r\n") and sent.endswith(b"\r\n\r\n")
    assert b"X-Method: HEAD\r\n" in sent
    assert b"first" not in sent and b"second" not in sent
    assert head == b""


def test_head_of_the_status_page_has_no_body(www):
    app = make_app(ping_path="/ping")
    output = app.handle(request(None, SCRIPT_NAME="/ping", REQUEST_METHOD="HEAD"),
                        lambda data: None, 1)
    assert output.endswith(b"Content-Length: 4\r\n\r\n")


def test_the_server_s_own_answer_has_one_head_shape_that_the_access_log_reads_back() -> None:
    body = b"503 Service Unavailable\nbusy; try again\n"
    page = error_page(503, b"X-Served-By: me\r\n", "busy; try again", b"Retry-After: 1\r\n")
    assert page == (b"Status: 503 Service Unavailable\r\n"
                    b"Content-Type: text/plain; charset=utf-8\r\n"
                    b"X-Served-By: me\r\nRetry-After: 1\r\n"
                    b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    assert status_of(page) == 503
    assert body_bytes(page, len(page)) == len(body)
    # A head that does not start with Status (never ours) logs status 0, all bytes as body.
    assert status_of(b"Content-Type: text/html\r\n\r\nhi") == 0
    assert body_bytes(b"no head at all", 14) == 14
