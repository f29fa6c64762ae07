"""app.py: which script a request names, and what a refused or failing one gets."""

from __future__ import annotations

import os

import pytest

from luafcgid.app import Application
from luafcgid.config import from_mapping
from luafcgid.protocol import Request

HELLO = 'function main(env, con) con:puts("hi") end'


def request(filename, body=b"", too_large=False, **params):
    values = {b"REQUEST_METHOD": b"GET"}
    if filename is not None:
        values[b"SCRIPT_FILENAME"] = filename if isinstance(filename, bytes) else filename.encode()
    values.update({k.encode(): v.encode() for k, v in params.items()})
    return Request(1, True, values, body, too_large)


def status_of(output: bytes) -> int:
    return int(output.split(b"\r\n", 1)[0].split()[1])


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
