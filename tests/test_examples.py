"""The bundled examples, served with the bundled config, through nginx."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.showcase_client import Visitor, sqlite_driver_missing
from tests.support import Nginx, Server, free_port, http

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def examples():
    # not pytest's tmp dir: the workers run as "nobody" and keep sessions beside the pidfile
    base = Path(tempfile.mkdtemp(prefix="luafcgid-examples-"))
    base.chmod(0o755)
    listen = f"127.0.0.1:{free_port()}"
    config = (EXAMPLES / "config.lua").read_text()
    config = re.sub(r'(?m)^listen = .*$', f'listen = "{listen}"', config)
    config = re.sub(r'(?m)^pidfile = .*$', f'pidfile = "{base}/examples.pid"', config)
    # notes.lua's database, in a directory the workers' user (nobody when root) can write
    notes = base / "notes"
    notes.mkdir()
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(notes, nobody.pw_uid, nobody.pw_gid)
    config = re.sub(r'(?m)^(\s*)notes_db = .*$', rf'\1notes_db = "{notes}/notes.db",', config)
    (base / "config.lua").write_text(config)
    server = Server(base / "config.lua", listen).start()
    nginx = Nginx(base / "nginx", EXAMPLES, listen).start()
    yield nginx
    nginx.stop()
    server.stop()
    shutil.rmtree(base)


def get(nginx, path, **kwargs):
    return http(nginx.port, path, **kwargs)


def test_hello(examples):
    reply = get(examples, "/hello.lua")
    assert (reply.status, reply.body) == (200, b"Hello, world!\n")


def test_env_lists_params_and_query(examples):
    body = get(examples, "/env.lua?colour=blue&colour=red").body
    assert b"<th>SCRIPT_FILENAME</th>" in body
    assert b"colour = blue, red" in body


def test_form_posts_to_itself(examples):
    reply = get(examples, "/form.lua", method="POST", body=b"name=%3Cb%3EAda",
                headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert b"Hello, &lt;b&gt;Ada!" in reply.body


def test_api(examples):
    reply = get(examples, "/api.lua?id=1")
    assert reply.header("Content-Type") == "application/json"
    assert reply.body == b'{"name":"apple","price":1.25}'
    assert get(examples, "/api.lua?id=9").status == 404
    assert get(examples, "/api.lua", method="DELETE").status == 405


def test_counter_persists(examples):
    counts = [int(re.search(rb"served (\d+)", get(examples, "/counter.lua").body).group(1))
              for _ in range(6)]
    assert max(counts) >= 2  # 2 processes, 1 state each at this load: some state counted twice


def test_stream(examples):
    assert get(examples, "/stream.lua").body == b"".join(b"line %d\n" % i for i in range(1, 6))


def test_legacy_globals(examples):
    reply = get(examples, "/legacy.lua", headers={"Cookie": "theme=dark"})
    assert reply.header("X-Example") == "luafcgid2"
    assert b"Method: GET" in reply.body and b"Cookie theme = dark" in reply.body


def test_session_sign_in_visits_sign_out(examples):
    assert b"Sign in" in get(examples, "/session.lua").body
    login = get(examples, "/session.lua", method="POST", body=b"name=%3Ci%3EAda",
                headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert (login.status, login.header("Location")) == (303, "session.lua")
    cookie = login.header("Set-Cookie").split(";")[0]
    assert cookie.startswith("XLuaSession=")
    for visit in (1, 2, 3):  # whichever worker answers, the session is the same
        body = get(examples, "/session.lua", headers={"Cookie": cookie}).body
        assert b"Hello, &lt;i&gt;Ada: visit %d of this session." % visit in body
    logout = get(examples, "/session.lua?action=logout", headers={"Cookie": cookie})
    assert logout.header("Set-Cookie").startswith("XLuaSession=;")
    assert b"Sign in" in get(examples, "/session.lua", headers={"Cookie": cookie}).body


def test_notes_board(examples):
    reason = sqlite_driver_missing("5.4")
    if reason:
        pytest.skip(reason)
    visitor = Visitor(examples.port)
    visitor.sign_in("Ada")
    assert visitor.post({"action": "post", "body": "<b>first</b>"}).status == 303
    page = visitor.get().body
    assert b"<p>&lt;b&gt;first&lt;/b&gt;</p>" in page and b"luafcgid examples" in page
    note = visitor.notes()[0]
    assert (note["author"], note["text"]) == ("Ada", "<b>first</b>")
    assert visitor.post({"action": "post", "body": "forged"}, token=None).status == 403
