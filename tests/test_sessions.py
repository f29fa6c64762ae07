"""luafcgid2's Session API over the SQLite store (issue #7 part B).

Real lupa states and a real SQLite file in tmp_path; the last tests go through a real
nginx to a real server with two worker processes sharing one session file.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import stat
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from luafcgid.lua import ScriptError
from tests.lua_site import LuaSite, lua_sites
from tests.support import Site, wait_until

RUNTIMES = ["5.4", "5.1", "luajit"]

# One script for every test: the request says what to do in WHAT, with ARG.
PAGE = """
    function main(env, con)
        local what, arg = env.WHAT, env.ARG
        if what == "login" then
            Session.Start()
            Session.SetVar("auth", "user", arg)
            con:puts("welcome " .. arg)
        elseif what == "whoami" then
            con:puts(tostring(Session.GetVar("auth", "user")))
        elseif what == "logout" then
            Session.Delete()
            con:puts("bye")
        elseif what == "store" then
            Session.SetVar("data", arg, VALUES[arg])
            con:puts("stored")
        elseif what == "fetch" then
            con:puts(SHOW(Session.GetVar("data", arg)))
        elseif what == "realms" then
            con:puts(tostring(Session.HasRealm("auth")) .. " " .. tostring(Session:HasRealm("data"))
                     .. " " .. tostring(Session.GetVar("*", "user")))
        elseif what == "clear" then
            Session.Clear(arg)
            con:puts("cleared")
        elseif what == "late" then
            con:puts("streaming")
            con:flush()
            Session.Start()
        elseif what == "bad" then
            local ok, message = pcall(Session.SetVar, "data", "f", VALUES[arg])
            con:puts(tostring(ok) .. " " .. tostring(message))
        elseif what == "nothing" then
            con:puts("no session used")
        end
    end

    local cyclic = {}
    cyclic.self = cyclic
    VALUES = {
        text = "a\\0b\\255;s3:{}", empty = "", int = 42, negative = -7, float = 1.5,
        tiny = 1e-300, inf = math.huge, yes = true, no = false,
        nested = {list = {1, 2, 3}, [10] = "ten", deep = {deeper = {x = "y"}}, flag = false},
        fn = print, cyclic = cyclic,
    }

    -- a value as text, tables with sorted keys, so Python can compare
    function SHOW(v)
        if type(v) ~= "table" then
            if math.type then return math.type(v) and (math.type(v) .. ":" .. tostring(v))
                or tostring(v) end
            return tostring(v)
        end
        local keys = {}
        for k in pairs(v) do keys[#keys + 1] = k end
        table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
        local parts = {}
        for _, k in ipairs(keys) do parts[#parts + 1] = tostring(k) .. "=" .. SHOW(v[k]) end
        return "{" .. table.concat(parts, ",") .. "}"
    end
"""

BROWSER = {b"REMOTE_ADDR": b"10.0.0.1", b"HTTP_USER_AGENT": b"Firefox",
           b"HTTP_ACCEPT_LANGUAGE": b"fr"}


class Client:
    """A browser: keeps the session cookie the server sets."""

    def __init__(self, site: LuaSite, page: str, identity: Optional[Dict[bytes, bytes]] = None):
        self.site, self.page = site, page
        self.identity = dict(BROWSER if identity is None else identity)
        self.cookie: Optional[str] = None
        self.set_cookies: List[str] = []

    def ask(self, what: str, arg: str = "") -> str:
        params = {b"WHAT": what.encode(), b"ARG": arg.encode(), **self.identity}
        if self.cookie:
            params[b"HTTP_COOKIE"] = b"other=1; XLuaSession=" + self.cookie.encode()
        output = self.site.serve(self.page, params)
        head, _, body = output.partition(b"\r\n\r\n")
        self.set_cookies = re.findall(r"Set-Cookie: ([^\r]*)", head.decode())
        for line in self.set_cookies:
            name, _, rest = line.partition("=")
            if name == "XLuaSession":
                value = rest.split(";")[0]
                self.cookie = value or None
        return body.decode("latin-1")


@pytest.fixture
def make_lua_site_with_sessions(tmp_path):
    """``make_lua_site_with_sessions(lua, **settings)``: an in-process LuaSite whose
    sessions live in tmp_path/sessions.db."""
    yield from lua_sites(tmp_path, session_store=f"sqlite:{tmp_path}/sessions.db")


def rows(tmp_path: Path, table: str) -> int:
    with sqlite3.connect(tmp_path / "sessions.db") as db:
        return db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


@pytest.mark.parametrize("lua", RUNTIMES)
def test_login_whoami_logout(make_lua_site_with_sessions, lua, tmp_path):
    web = make_lua_site_with_sessions(lua)
    page = web.script(PAGE)
    alice = Client(web, page)
    assert alice.ask("whoami") == "nil" and alice.set_cookies == []  # no key, no cookie
    assert alice.ask("login", "alice") == "welcome alice"
    (cookie,) = alice.set_cookies
    assert re.fullmatch(r"XLuaSession=[A-Za-z0-9_]{24}; Path=/; HttpOnly; Secure; "
                        r"Max-Age=3600; Expires=\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT",
                        cookie), cookie
    key = alice.cookie
    assert alice.ask("whoami") == "alice" and alice.cookie == key  # refreshed, same key
    assert alice.ask("nothing") == "no session used" and alice.set_cookies == []
    assert Client(web, page).ask("whoami") == "nil"  # another browser has no session
    assert alice.ask("logout") == "bye"
    assert alice.set_cookies == ["XLuaSession=; Path=/; HttpOnly; Secure; Max-Age=0; "
                                 "Expires=Thu, 01 Jan 1970 00:00:00 GMT"]
    assert rows(tmp_path, "sessions") == 0 and rows(tmp_path, "variables") == 0
    alice.cookie = key  # a stolen or replayed key of a deleted session gets nothing
    assert alice.ask("whoami") == "nil" and alice.set_cookies[0].startswith("XLuaSession=;")


@pytest.mark.parametrize("lua", RUNTIMES)
def test_values_round_trip_with_their_types(make_lua_site_with_sessions, lua):
    web = make_lua_site_with_sessions(lua)
    page = web.script(PAGE)
    browser = Client(web, page)
    browser.ask("login", "x")
    expected = {
        "text": "a\0b\xff;s3:{}", "empty": "", "yes": "true", "no": "false",
        "nested": "{10=ten,deep={deeper={x=y}},flag=false,list={1=1,2=2,3=3}}",
    }
    if lua == "5.4":  # integers stay integers, floats floats
        expected.update({"int": "integer:42", "negative": "integer:-7", "float": "float:1.5",
                         "tiny": "float:1e-300", "inf": "float:inf"})
        expected["nested"] = ("{10=ten,deep={deeper={x=y}},flag=false,"
                              "list={1=integer:1,2=integer:2,3=integer:3}}")
    else:
        expected.update({"int": "42", "negative": "-7", "float": "1.5", "tiny": "1e-300",
                         "inf": "inf"})
    for name in expected:
        assert browser.ask("store", name) == "stored"
    # read back by a new state (another worker) as well as the one that wrote them
    other = make_lua_site_with_sessions(lua)
    reader = Client(other, other.script(PAGE, name="reader.lua"))
    reader.cookie = browser.cookie
    for name, shown in expected.items():
        assert browser.ask("fetch", name) == shown, name
        assert reader.ask("fetch", name) == shown, name


@pytest.mark.parametrize("lua", RUNTIMES)
def test_what_cannot_be_stored_is_a_catchable_error(make_lua_site_with_sessions, lua):
    web = make_lua_site_with_sessions(lua)
    browser = Client(web, web.script(PAGE))
    assert browser.ask("bad", "fn") == ("false Session.SetVar: a function cannot be stored in a "
                                        "session (strings, numbers, booleans and tables of them "
                                        "can)")
    assert browser.ask("bad", "cyclic") == ("false Session.SetVar: a table stored in a session "
                                            "cannot contain itself")
    assert browser.ask("login", "bob") == "welcome bob"  # the state serves on


def test_realms_clear_and_star(make_lua_site_with_sessions, tmp_path):
    web = make_lua_site_with_sessions()
    browser = Client(web, web.script(PAGE))
    browser.ask("login", "carol")
    browser.ask("store", "int")
    assert browser.ask("realms") == "true true carol"
    assert browser.ask("clear", "auth") == "cleared"
    assert browser.ask("realms") == "false true nil"
    assert browser.ask("fetch", "int") == "integer:42"
    browser.ask("login", "carol")
    assert browser.ask("clear", "*") == "cleared"
    assert browser.ask("realms") == "false false nil"
    assert rows(tmp_path, "variables") == 0 and rows(tmp_path, "sessions") == 1


def test_anti_hijack_score(make_lua_site_with_sessions):
    web = make_lua_site_with_sessions()
    page = web.script(PAGE)

    def from_elsewhere(**changes: bytes) -> str:
        """Log in from BROWSER, then ask with its key from a client that differs by ``changes``."""
        owner = Client(web, page)
        owner.ask("login", "dave")
        names = {"address": b"REMOTE_ADDR", "agent": b"HTTP_USER_AGENT",
                 "language": b"HTTP_ACCEPT_LANGUAGE"}
        thief = Client(web, page, {**BROWSER, **{names[k]: v for k, v in changes.items()}})
        thief.cookie = owner.cookie
        answer = thief.ask("whoami")
        if answer == "nil":  # refused: the owner keeps the session
            assert owner.ask("whoami") == "dave"
        return answer

    # weights: address 3, agent 2, language 1, target 3
    assert from_elsewhere(address=b"10.0.0.2") == "dave"  # agent + language = 3
    assert from_elsewhere(agent=b"curl", language=b"de") == "dave"  # address = 3
    assert from_elsewhere(address=b"10.0.0.3", agent=b"curl") == "nil"  # language = 1
    assert from_elsewhere(address=b"10.0.0.3", language=b"de") == "nil"  # agent = 2

    # an accepted client becomes the session's identity (luafcgid2: a roaming phone)
    owner = Client(web, page)
    owner.ask("login", "dave")
    roaming = Client(web, page, {**BROWSER, b"REMOTE_ADDR": b"10.9.9.9"})
    roaming.cookie = owner.cookie
    assert roaming.ask("whoami") == "dave"
    moved_on = Client(web, page, {**BROWSER, b"REMOTE_ADDR": b"10.9.9.9",
                                  b"HTTP_USER_AGENT": b"curl"})
    moved_on.cookie = owner.cookie
    assert moved_on.ask("whoami") == "dave"  # address matches the last use

    lax = make_lua_site_with_sessions(SessionTargetScore=0)
    thief = Client(lax, lax.script(PAGE, name="lax.lua"), {b"REMOTE_ADDR": b"192.0.2.9"})
    thief.cookie = owner.cookie
    assert thief.ask("whoami") == "dave"  # target <= 0: anyone with the key


def test_cookie_settings_and_key_length(make_lua_site_with_sessions):
    web = make_lua_site_with_sessions(
        SessionName="sid", SessionKeyLen=40, SessionCookieSecure=False,
        SessionCookieHttpOnly=False, SessionCookieSameSite="Strict", SessionTime=120)
    page = web.script("function main(env, con) Session.Start() con:puts('x') end")
    output = web.serve(page)
    (cookie,) = re.findall(rb"Set-Cookie: ([^\r]*)", output)
    assert re.fullmatch(rb"sid=[A-Za-z0-9_]{40}; Path=/; SameSite=Strict; Max-Age=120; "
                        rb"Expires=[^;]+ GMT", cookie), cookie


@pytest.mark.slow
def test_expiry_and_sweep(make_lua_site_with_sessions, tmp_path):
    web = make_lua_site_with_sessions(SessionTime=1)
    browser = Client(web, web.script(PAGE))
    browser.ask("login", "erin")
    assert browser.ask("whoami") == "erin"
    with sqlite3.connect(tmp_path / "sessions.db") as db:
        (expires,) = db.execute("SELECT expires FROM sessions").fetchone()
    assert time.time() < expires <= time.time() + 1  # asking slid it to now + SessionTime
    # (asking again would slide it again: watch the clock instead)
    wait_until(lambda: time.time() > expires, timeout=5, what="the session's expiry")
    assert browser.ask("whoami") == "nil"
    assert rows(tmp_path, "sessions") == 1  # expired, not yet swept
    assert web.cache.sessions.sweep() == 1
    assert rows(tmp_path, "sessions") == 0 and rows(tmp_path, "variables") == 0


def test_start_after_the_head_went_out_is_an_error(make_lua_site_with_sessions):
    web = make_lua_site_with_sessions()
    sink: List[bytes] = []
    with pytest.raises(ScriptError) as failure:
        web.serve(web.script(PAGE), {b"WHAT": b"late"}, sink=sink)
    assert failure.value.flushed
    assert "Session.Start: the head was already sent" in failure.value.message


def test_an_unusable_store_fails_the_script_not_the_worker(make_lua_site_with_sessions, tmp_path):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where a directory should be")
    web = make_lua_site_with_sessions(session_store=f"sqlite:{blocked}/sessions.db")
    page = web.script(PAGE)
    with pytest.raises(ScriptError) as failure:
        web.serve(page, {b"WHAT": b"login", b"ARG": b"x"})
    message = failure.value.message
    assert f"Session.Start: session store sqlite:{blocked}/sessions.db" in message
    assert "set session_store" in message
    assert web.serve(page, {b"WHAT": b"nothing"}).endswith(b"no session used")


# --- through nginx: two worker processes, one session file ---------------------------------

WHOAMI = """
    function main(env, con)
        if env.QUERY_STRING == "login" then
            Session.Start()
            Session.SetVar("auth", "user", "frank")
            Session.SetVar("auth", "by", Info.Worker)
        end
        con:puts(Info.Worker .. " " .. tostring(Session.GetVar("auth", "user")))
    end
"""


@pytest.mark.slow
def test_sessions_are_shared_by_the_workers_of_a_host(tmp_path):
    pidfile = tmp_path / "run" / "luafcgid.pid"
    pidfile.parent.mkdir()
    with Site(tmp_path, {"who.lua": WHOAMI}, keep_conn=False, processes=2, workers=1,
                 pidfile=str(pidfile), SessionCookieSecure=False) as web:
        # the default store: a directory the master made beside the pidfile
        sessions_dir = tmp_path / "run" / "luafcgid-sessions"
        assert stat.S_IMODE(os.stat(sessions_dir).st_mode) == 0o700
        login = web.get("/who.lua?login")
        assert login.status == 200 and login.body.endswith(b" frank")
        cookie = login.header("Set-Cookie").split(";")[0]
        seen = set()

        def both_workers_answered() -> bool:
            # keep-conn off: each request a new FastCGI connection, taken by either worker
            reply = web.get("/who.lua", headers={"Cookie": cookie})
            worker, user = reply.body.decode().split()
            assert user == "frank", reply
            seen.add(worker)
            return len(seen) == 2

        wait_until(both_workers_answered, timeout=20, what="both workers to see the session")
        assert (sessions_dir / "sessions.db").exists()


@pytest.mark.slow
def test_the_session_dir_belongs_to_the_workers_user():
    if os.geteuid() != 0:
        pytest.skip("needs root to start workers as another user")
    # pytest's tmp dirs are private to root: nobody must be able to read the scripts
    base = Path(tempfile.mkdtemp(prefix="luafcgid-sessions-"))
    try:
        base.chmod(0o755)
        run = base / "run"
        run.mkdir()
        with Site(base, {"who.lua": WHOAMI}, user="nobody", group="nogroup",
                     pidfile=str(run / "luafcgid.pid"), SessionCookieSecure=False) as web:
            login = web.get("/who.lua?login")
            assert login.status == 200 and login.body.endswith(b" frank"), login
            info = os.stat(run / "luafcgid-sessions")
            assert (info.st_uid, info.st_gid) == (65534, 65534)
            assert os.stat(run / "luafcgid-sessions" / "sessions.db").st_uid == 65534
            cookie = login.header("Set-Cookie").split(";")[0]
            assert web.get("/who.lua", headers={"Cookie": cookie}).body.endswith(b" frank")
    finally:
        shutil.rmtree(base)


@pytest.mark.slow
def test_the_heartbeat_sweeps_expired_sessions(tmp_path):
    database = tmp_path / "sessions.db"
    with Site(tmp_path, {"who.lua": WHOAMI}, sweep=200, SessionTime=1,
                 session_store=f"sqlite:{database}", SessionCookieSecure=False) as web:
        assert web.get("/who.lua?login").body.endswith(b" frank")

        def sessions_left() -> int:
            with sqlite3.connect(database) as db:
                return db.execute("SELECT count(*) FROM sessions").fetchone()[0]

        assert sessions_left() == 1
        # no request touches it: only the worker's heartbeat can remove it
        wait_until(lambda: sessions_left() == 0, timeout=10, what="the sweep")
        with sqlite3.connect(database) as db:
            assert db.execute("SELECT count(*) FROM variables").fetchone()[0] == 0


def test_a_key_the_client_made_up_is_never_adopted(make_lua_site_with_sessions):
    web = make_lua_site_with_sessions()
    browser = Client(web, web.script(PAGE))
    browser.cookie = "chosen_by_the_attacker_1"
    assert browser.ask("login", "gina") == "welcome gina"
    assert browser.cookie != "chosen_by_the_attacker_1" and len(browser.cookie) == 24
    assert browser.ask("whoami") == "gina"
