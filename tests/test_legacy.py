"""The originals' own scripts and config files run unchanged (issue 14).

luafcgid is SnarkyClark/luafcgid (C, 2011), luafcgid2 is EssGeeEich/luafcgid (C++, 2018);
file:line below point into their sources. Each test is written from what the original's
code or manual does. Points tested elsewhere, where an older test was changed to the
originals' behaviour: 3 (reset) and 5 (gets) in test_lua_api.py
(test_reset_discards_the_buffered_body_only, test_gets_reads_the_body_once), 4 in
test_lua_api.py (test_a_head_set_once_sent_is_dropped_and_the_page_completes) and here
through nginx, 7 partly in test_lua_api.py (test_luafcgid_module), 11 and the typo
check in test_config.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import List

import pytest

from luafcgid import config
from tests.lua_site import RUNTIMES, response
from tests.support import Nginx, Server, as_root, fcgi_call, http, lua_literal, wait_until

# --- the originals' own files, as they ship ------------------------------------------------

# luafcgid: examples/dumpenv.lua
LUAFCGID_DUMPENV = """\
-- utilies for processing a FCGI request
local lf = require("luafcgid")

function main(env, con)
\t-- gotta give Lua some props
\tcon:header("X-Powered-By", "Lua")
\t
\tcon:puts("<h1>Environment</h1><pre>\\n")
\tfor n, v in pairs(env) do
\t\tcon:puts(string.format("%s = %s\\n", n, v))
\tend
\tcon:puts("</pre>\\n")

\tif env.REQUEST_METHOD == "GET" then
\t\ts = {}  -- string sets are faster then calling req:puts() all the time
\t\tparams = lf.parse(env.QUERY_STRING)
\t\ttable.insert(s, "<h1>GET Params</h1><pre>\\n")
\t\tfor n, v in pairs(params) do
\t\t\ttable.insert(s, string.format("%s = %s\\n", n, v))
\t\tend
\t\ttable.insert(s, "</pre>\\n")
\t\tcon:puts(table.concat(s))
\tend

\tif env.REQUEST_METHOD == "POST" then
\t\tcon:puts("<h1>POST</h1>\\n")
\t\tcon:puts(string.format("<textarea>%s</textarea>", con:gets()))
\tend
end
"""

# luafcgid2: examples/dumpenv.lua (its closing comment block shortened)
LUAFCGID2_DUMPENV = """\
function DumpTable(tbl, prefix)
\tif type(tbl) == "table" then
\t\tfor k,v in pairs(tbl) do
\t\t\tif type(k) == "table" then
\t\t\t\tk = "[table]"
\t\t\tend
\t\t\t
\t\t\tDumpTable(v, prefix .. "." .. k)
\t\tend
\telse
\t\tSend(string.format("%s = %s\\n", prefix, tostring(tbl)))
\tend
end

function main()
\tSend("<h1>Environment</h1><pre>\\n")
\tfor n, v in pairs(Env) do
\t\tSend(string.format("%s = %s\\n", n, v))
\tend
\tSend("</pre>\\n")

\tif Env.REQUEST_METHOD == "GET" then
\t\t-- String tables aren't faster than multiple Send calls anymore.
\t\tparams = lf.parse(Env.QUERY_STRING)
\t\tSend("<h1>GET Params</h1><pre>\\n")
\t\tfor n, v in pairs(params) do
\t\t\tSend(string.format("%s = %s\\n", n, v))
\t\tend
\t\tSend("</pre>\\n")
\tend

\tif Env.REQUEST_METHOD == "POST" then
\t\tSend("<h1>POST</h1>\\n")
\t\tSend(string.format("<textarea>%s</textarea>", Receive()))
\tend
\t
\tSend("<h1>Info</h1><pre>\\n")
\tfor k,v in pairs(Info) do
\t\tSend(string.format("Info.%s = %s\\n", k, v))
\tend
\t
\tSend("</pre><h1>Debug</h1><pre>\\n")
\tfor k,v in pairs(ThreadData()) do
\t\tSend(string.format("%s = %s\\n", k, v))
\tend
\tSend("</pre><h1>Config</h1><pre>\\n")
\tDumpTable(Config or {}, "Config")
\tSend("</pre>")
\t
\t--[[
\t\tThese are all the exposed functions/variables: (...)
\t]]
end
"""

# luafcgid: scripts/etc/config.lua
LUAFCGID_CONFIG = """\
--[[ configuration script for luafcgid ]]--

-- port or socket path to listen to
-- listen = "127.0.0.1:9000"
listen = "/var/tmp/luafcgid.sock"

-- number of worker threads
workers = 4

-- max number of Lua VM states (NOTE: value needs to be larger then or equal to "workers")
states = workers * 2

-- max number of instances of an individual script allowed
clones = states

-- housekeeping sweep cycle in milliseconds
sweep = 5000

-- number of search cycles before creating
-- a new Lua VM state for a requested script
retries = 1

-- do we show errors in browser?
showerrors = true

-- do we perform output buffering?
buffering = true

-- starting buffer size for custom HTTP headers\x20
headersize = 64

-- starting buffer size for HTTP body\x20
bodysize = 1024

-- custom headers to add to all requests
headers = "X-Powered-By: Lua\\r\\n"

-- handler function name
handler = "main"

-- default HTTP status
httpstatus = "200 OK"

-- default HTTP content type
contenttype = "text/html"

-- max POST size allowed
maxpost = 1024 * 1024

-- full or relative path to logfile
logfile = "/var/log/luafcgid/luafcgid.log"
"""

# luafcgid2: scripts/luafcgid2-config.lua
LUAFCGID2_CONFIG = """\
--[[ Configuration script for luafcgid2 ]]--

-- Amount of worker threads
WorkerThreads = 4

-- Number of default Lua states initially loaded
LuaStates = 1

-- Max number of Lua states (will be loaded as needed, but will never unload)
LuaMaxStates = 6

-- Max number of times to search for a free Lua state before creating a new ad-hoc one
LuaMaxSearchRetries = 3

-- Starting buffer size for custom HTTP headers
HeadersSize = 128

-- Starting buffer size for HTTP body
BodySize = 2048

-- Starting buffer is split in [BodySectors] number of [BodySize] byte chunks
-- Thanks to C++11, this method can vastly improve performance
BodySectors = 4

-- Time (in ms) that we consider a file to be unchanged
-- It is suggested to increase this value as your server needs to manage more users \
and is under heavier load
-- Having more threads will kind of ignore this variable.
MinFileInfoTime = 5000

-- Calculate a file's checksum to see if it changed
-- It is only calculated at most every [MinFileInfoTime] ms
UseFileChecksum = true

-- Sets the cookie name for the session key. Must be lower-case.
SessionName = "XLuaSession"

-- For how much time should we keep the session data alive for, while unused?
-- In seconds.
SessionTime = 3600

-- Length (in bytes) of the generated Session Keys
SessionKeyLen = 24

-- Transmit the session cookie through HTTPS-only? (Sets the Secure attribute)
SessionCookieSecure = true

-- Transmit the session cookie through HTTP only, disabling JS access? (Sets the HttpOnly attribute)
SessionCookieHttpOnly = true

-- Select a SameSite directive for cookies. Allowed values are: Strict, Lax. \
Leave empty for no SameSite directive.
SessionCookieSameSite = ""

-- Scoring system for Session Key attribution. This system helps to avoid Session Key hijacking.
-- What's our score target? A score of >= SessionTargetScore will allow an user to proceed.
-- To disable the Score System, set this variable to <= 0.
SessionTargetScore = 3

-- How many "points" does a request gain if the IP address matches?
SessionIpScore = 3
-- How many "points" does a request gain if the UserAgent matches?
SessionUserAgentScore = 2
-- How many "points" does a request gain if the Language matches?
SessionLanguageScore = 1


-- Custom HTTP headers. Will be added to every request.
DefaultHeaders = "X-Powered-By: luafcgid2\\r\\n"

-- Default HTTP status.
DefaultHttpStatus = "200 OK"

-- Default Content-Type
DefaultContentType = "text/html"

-- Max POST upload size allowed
MaxPostSize = 1048576 -- 1MB

-- Log File Path
LogFilePath = "/var/log/luafcgid2/luafcgid2.log"

-- Port or Socket path to listen to
listen = "/var/tmp/luafcgid2.sock"

-- Load this *file* at the top of all scripts
-- Please note that this file is only loaded once.
StartupScript = ""

-- Entrypoint
entrypoint = "main"

-- Config table, can be accessed from the scripts.
Config = {
\tentrypoint = entrypoint,
\tstring_example = "Test config string",
\ttable_example = {
\t\t"abc","def","ghi",
\t\tnumber=42
\t}
}
"""


def private(sample: str, base: Path, **places: str) -> str:
    """The sample with its system paths (socket, log file) moved into ``base``, and a
    pidfile (and, as root, ``user``) added: nothing else of it changes."""
    for key, value in places.items():
        sample, found = re.subn(rf'(?m)^{key} = ".*"$', f"{key} = {lua_literal(value)}", sample)
        assert found == 1, key
    extra = {"pidfile": str(base / "luafcgid.pid"), "processes": 1, **as_root()}
    return sample + "".join(f"{key} = {lua_literal(value)}\n" for key, value in extra.items())


def serve(base: Path, config_text: str, scripts: dict) -> tuple:
    """luafcgid on ``config_text`` (which listens on base/fcgi.sock), nginx in front."""
    docroot = base / "www"
    docroot.mkdir()
    for name, source in scripts.items():
        (docroot / name).write_text(source)
    config_path = base / "config.lua"
    config_path.write_text(config_text)
    listen = str(base / "fcgi.sock")
    server = Server(config_path, listen).start()
    try:
        nginx = Nginx(base / "nginx", docroot, listen).start()
    except Exception:
        server.stop()
        raise
    return server, nginx


@pytest.fixture
def running():
    """``running(base, config_text, scripts)``: started, and stopped after the test."""
    started: List[tuple] = []

    def start(base: Path, config_text: str, scripts: dict) -> tuple:
        started.append(serve(base, config_text, scripts))
        return started[-1]

    yield start
    for server, nginx in started:
        nginx.stop()
        server.stop()


# --- the originals' samples through nginx ------------------------------------------------


@pytest.mark.slow
def test_luafcgid_dumpenv_and_config_run_unchanged(tmp_path, running):
    """luafcgid's examples/dumpenv.lua on its scripts/etc/config.lua: GET lists env (with
    LUAFCGID_VERSION, main.c:67-69) and the parsed query, POST echoes con:gets()."""
    log = tmp_path / "luafcgid.log"
    text = private(LUAFCGID_CONFIG, tmp_path, listen=str(tmp_path / "fcgi.sock"),
                   logfile=str(log))
    server, nginx = running(tmp_path, text, {"dumpenv.lua": LUAFCGID_DUMPENV})
    reply = http(nginx.port, "/dumpenv.lua?a=1&b=x+y")
    assert reply.status == 200, reply
    assert reply.headers_named("X-Powered-By") == ["Lua", "Lua"]  # config's + script's
    body = reply.body.decode()
    assert "<h1>Environment</h1><pre>\n" in body
    assert "\nLUAFCGID_VERSION = 1\n" in body
    assert "\nREQUEST_METHOD = GET\n" in body and "\nQUERY_STRING = a=1&b=x+y\n" in body
    params = body.split("<h1>GET Params</h1><pre>\n")[1].split("</pre>")[0]
    assert sorted(params.splitlines()) == ["a = 1", "b = x y"]
    reply = http(nginx.port, "/dumpenv.lua", method="POST", body=b"posted=yes",
                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert reply.status == 200
    assert reply.body.endswith(b"<h1>POST</h1>\n<textarea>posted=yes</textarea>")
    assert "GET Params" not in reply.body.decode()
    assert reply.header("X-ElapsedTime") is None  # a luafcgid config: no luafcgid2 header


@pytest.mark.slow
def test_luafcgid2_dumpenv_and_config_run_unchanged(tmp_path, running):
    """luafcgid2's examples/dumpenv.lua used to answer 500 on every GET (no global lf). On
    its own config: Env, the GET params through lf.parse, Info, ThreadData, the Config
    table, Receive() on POST, and X-ElapsedTime (statepool.cpp:336-338)."""
    log = tmp_path / "luafcgid2.log"
    text = private(LUAFCGID2_CONFIG, tmp_path, listen=str(tmp_path / "fcgi.sock"),
                   LogFilePath=str(log))
    server, nginx = running(tmp_path, text, {"dumpenv.lua": LUAFCGID2_DUMPENV})
    reply = http(nginx.port, "/dumpenv.lua?a=1&b=2")
    assert reply.status == 200, (reply, log.read_text())
    assert reply.header("X-Powered-By") == "luafcgid2"
    assert re.fullmatch(r"\d+", reply.header("X-ElapsedTime") or "")
    body = reply.body.decode()
    assert "\nREQUEST_METHOD = GET\n" in body
    params = body.split("<h1>GET Params</h1><pre>\n")[1].split("</pre>")[0]
    assert sorted(params.splitlines()) == ["a = 1", "b = 2"]
    assert re.search(r"\nInfo\.State = \d+\n", body) and re.search(r"\nInfo\.Thread = \d+\n",
                                                                     body)
    script = os.path.realpath(tmp_path / "www" / "dumpenv.lua")
    assert f"\n{script} = 1\n" in body  # ThreadData(): this script, one state
    config_lines = body.split("<h1>Config</h1><pre>\n")[1].split("</pre>")[0].splitlines()
    assert sorted(config_lines) == [
        "Config.entrypoint = main", "Config.string_example = Test config string",
        "Config.table_example.1 = abc", "Config.table_example.2 = def",
        "Config.table_example.3 = ghi", "Config.table_example.number = 42"]
    reply = http(nginx.port, "/dumpenv.lua", method="POST", body=b"x=1")
    assert reply.status == 200
    assert "<h1>POST</h1>\n<textarea>x=1</textarea>" in reply.body.decode()
    # its ignored settings are said where the operator looks: the log file
    ignored = [line for line in log.read_text().splitlines() if "have no effect" in line]
    assert len(ignored) == 1 and " INFO " in ignored[0]
    for key in ("LuaStates", "BodySectors", "MinFileInfoTime", "UseFileChecksum"):
        assert key in ignored[0]


@pytest.mark.slow
def test_a_late_header_no_longer_cuts_the_page_off(tmp_path, running):
    """Point 4 through nginx: a header after con:flush() (or with buffering off) used to
    raise, and the client got a truncated 200. The page now completes (request.c:49-69)
    and the log names the script and the line."""
    page = textwrap.dedent("""\
        function main(env, con)
            con:puts("first ")
            con:flush()
            con:header("X-Late", "1")
            con:puts("second")
        end
    """)
    text = f'listen = "{tmp_path / "fcgi.sock"}"\n' + private("", tmp_path)
    server, nginx = running(tmp_path, text, {"late.lua": page})
    reply = http(nginx.port, "/late.lua")
    assert (reply.status, reply.body, reply.header("X-Late")) == (200, b"first second", None)
    script = tmp_path / "www" / "late.lua"
    wait_until(lambda: f'{script}: line 4: con:header("X-Late") ignored' in server.output(),
               what="the warning in the log")


# --- the points, in a Lua state --------------------------------------------------------------


@pytest.mark.parametrize("lua", RUNTIMES)
def test_luafcgid2_globals_lf_and_local_config(make_lua_site, lua):
    """Point 1: luafcgid2's header chunk defines LUAFCGID, LUAFCGID_VERSION and lf in every
    state (settings.cpp:10-17); LocalConfig is Config[SERVER_NAME] per request
    (settings.cpp:139-150, statepool.cpp:265-276), nil when there is none."""
    web = make_lua_site(lua=lua, Config={"a.example": {"greeting": "hello a"}, "other": 1})
    page = web.script("""
        function main()
            Send(tostring(LUAFCGID) .. " " .. LUAFCGID_VERSION .. " ")
            local n, v = lf.parse_pair("x%20y=1=2")
            Send(n .. "|" .. v .. "|" .. lf.parse("a=1=2").a .. "|" .. lf.urlencode("a b")
                 .. "|" .. lf.urldecode("a+b") .. "|" .. lf.serialize({1}) .. " ")
            Send(LocalConfig and LocalConfig.greeting or "none")
        end
    """)
    served = web.serve(page, {b"SERVER_NAME": b"a.example"})
    assert served == response(b"true 2 x y|1|1|a+b|a b|{1} hello a")
    assert web.serve(page, {b"SERVER_NAME": b"b.example"}) == response(
        b"true 2 x y|1|1|a+b|a b|{1} none")
    assert web.serve(page) == response(b"true 2 x y|1|1|a+b|a b|{1} none")


def test_lf_is_usable_before_and_after_a_script_writes_to_it(make_lua_site):
    """lf fills itself at its first read or pairs(): a script may add its own helpers
    first, and they stay."""
    web = make_lua_site()
    page = web.script("""
        function lf.shout(s) return s:upper() end
        function main()
            local names = 0
            for _ in pairs(lf) do names = names + 1 end
            Send(lf.shout(lf.urldecode("a+b")) .. " " .. tostring(names > 5))
        end
    """)
    assert web.serve(page) == response(b"A B true")


def test_env_carries_luafcgid_version(make_lua_site):
    """Point 2: luafcgid puts LUAFCGID_VERSION (1, main.h:4) in every env (main.c:67-69)."""
    web = make_lua_site()
    page = web.script("""
        function main(env, con)
            con:puts(math.type and math.type(env.LUAFCGID_VERSION) or type(env.LUAFCGID_VERSION))
            con:puts(" " .. env.LUAFCGID_VERSION .. " " .. LUAFCGID_VERSION)
        end
    """)
    assert web.serve(page) == response(b"integer 1 2")


def test_relative_file_names_resolve_against_the_script_directory(make_lua_site, tmp_path,
                                                                  monkeypatch):
    """Point 6: luafcgid chdir()ed to the script's directory before each request
    (main.c:296-303). Two scripts in two directories, the process's working directory a
    third with decoys: each script sees its own files, without any chdir."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name in ("data.txt", "inc.lua"):
        (elsewhere / name).write_text("return 'wrong'" if name.endswith(".lua") else "wrong")
    monkeypatch.chdir(elsewhere)
    web = make_lua_site()
    source = """
        function main(env, con)
            local f = assert(io.open("data.txt"))
            local parts = {f:read("*a"), dofile("inc.lua"), loadfile("inc.lua")()}
            f:close()
            for line in io.lines("data.txt") do parts[#parts + 1] = line end
            local out = io.output("out.txt") io.write("written") out:close() io.output(io.stdout)
            local input = io.input("out.txt") parts[#parts + 1] = io.read("*a")
            input:close() io.input(io.stdin)
            assert(os.rename("out.txt", "moved.txt"))
            parts[#parts + 1] = tostring(os.remove("moved.txt"))
            parts[#parts + 1] = tostring(io.open(env.SCRIPT_FILENAME) ~= nil)  -- absolute
            parts[#parts + 1] = select(2, io.open("missing.txt"))
            con:puts(table.concat(parts, "|"))
        end
    """
    pages = []
    for name in ("one", "two"):
        directory = tmp_path / name
        directory.mkdir()
        (directory / "data.txt").write_text(f"data of {name}")
        (directory / "inc.lua").write_text(f"return 'inc of {name}'")
        pages.append(web.script(source, name=f"{name}/page.lua"))
    for name, page in zip(("one", "two"), pages):
        expected = (f"data of {name}|inc of {name}|inc of {name}|data of {name}|written|true|"
                    f"true|{tmp_path / name}/missing.txt: No such file or directory")
        served = web.serve(page)
        assert served == response(expected.encode()), served
        assert not (tmp_path / name / "moved.txt").exists()
    assert sorted(path.name for path in elsewhere.iterdir()) == ["data.txt", "inc.lua"]


@pytest.mark.parametrize("lua", RUNTIMES)
def test_luafcgid_module_behaves_as_the_original(make_lua_site, lua):
    """Point 7, from luafcgid.lua: urlencode escapes all but [A-Za-z0-9 ] (then " " → "+",
    lines 29-36) and passes nil and "" through, urldecode(nil) is nil (39-46), a pair's
    value ends at the next "=" (pattern "([^=]*)=([^=]*)", line 51), serialize gives ""
    for what it has no literal for (lines 5-26)."""
    web = make_lua_site(lua=lua)
    page = web.script("""
        local luafcgid = require("luafcgid")
        function main(env, con)
            local u = luafcgid.urlencode
            con:puts(table.concat({tostring(u(nil)), u(""), u("Az09 -_.~*!'()/?&=%+"),
                tostring(luafcgid.urldecode(nil)), luafcgid.urldecode("%41+%4"),
                luafcgid.parse("a=1=2&b==3&=4").a, luafcgid.parse("a=1=2&b==3&=4").b,
                luafcgid.parse("a=1=2&b==3&=4")[""],
                "[" .. luafcgid.serialize(nil) .. "]", "[" .. luafcgid.serialize(print) .. "]",
                "[" .. luafcgid.serialize(coroutine.create(print)) .. "]"}, "|"))
        end
    """)
    assert web.serve(page) == response(
        b"nil||Az09+%2D%5F%2E%7E%2A%21%27%28%29%2F%3F%26%3D%25%2B|nil|A %4|1||4|[]|[]|[]")


def test_response_table_is_luafcgid2s(make_lua_site):
    """Point 8: Response as settings.cpp:19-26 has it, every code and phrase, no more;
    con:status takes its phrase from there, and Python's for the codes it lacks."""
    web = make_lua_site()
    page = web.script("""
        function main()
            local lines = {}
            for code, line in pairs(Response) do lines[#lines + 1] = code .. "=" .. line end
            table.sort(lines)
            Send(table.concat(lines, "\\n"))
            if Env.QUERY_STRING then RespStatus(tonumber(Env.QUERY_STRING)) end
        end
    """)
    expected = {
        100: "Continue", 101: "Switching Protocols", 102: "Processing", 103: "Early Hints",
        200: "OK", 201: "Created", 202: "Accepted", 203: "Non-Authoritative Information",
        204: "No Content", 205: "Reset Content", 206: "Partial Content", 207: "Multi-Status",
        208: "Already Reported", 226: "IM Used", 300: "Multiple Choices",
        301: "Moved Permanently", 302: "Found", 303: "See Other", 304: "Not Modified",
        305: "Use Proxy", 306: "Switch Proxy", 307: "Temporary Redirect",
        308: "Permanent Redirect", 400: "Bad Request", 401: "Unauthorized",
        402: "Payment Required", 403: "Forbidden", 404: "Not Found",
        405: "Method Not Allowed", 406: "Not Acceptable",
        407: "Proxy Authentication Required", 408: "Request Timeout", 409: "Conflict",
        410: "Gone", 411: "Length Required", 412: "Precondition Failed",
        413: "Payload Too Large", 414: "URI Too Long", 415: "Unsupported Media Type",
        416: "Range Not Satisfiable", 417: "Expectation Failed", 418: "I'm a teapot",
        421: "Misdirected Request", 422: "Unprocessable Entity", 423: "Locked",
        424: "Failed Dependency", 426: "Upgrade Required", 428: "Precondition Required",
        429: "Too Many Requests", 431: "Request Header Fields Too Large",
        451: "Unavailable For Legal Reasons", 500: "Internal Server Error",
        501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable",
        504: "Gateway Timeout", 505: "HTTP Version Not Supported",
        506: "Variant Also Negotiates", 507: "Insufficient Storage", 508: "Loop Detected",
        510: "Not Extended", 511: "Network Authentication Required",
    }
    lines = sorted(f"{code}={code} {phrase}" for code, phrase in expected.items())
    assert web.serve(page) == response("\n".join(lines).encode())
    body = "\n".join(lines).encode()
    assert web.serve(page, {b"QUERY_STRING": b"413"}) == response(body, b"413 Payload Too Large")
    assert web.serve(page, {b"QUERY_STRING": b"425"}) == response(body, b"425 Too Early")


@pytest.mark.slow
def test_x_elapsed_time_for_luafcgid2_configs(make_lua_site):
    """Point 9: luafcgid2 sent X-ElapsedTime (ms) after the content type on every answer
    (statepool.cpp:321-338). A config that uses one of luafcgid2's own names is a
    luafcgid2 config and turns elapsed_time_header on; set it to choose."""
    assert not config.from_mapping({}).elapsed_time_header
    assert not config.from_mapping({"workers": 2, "SessionName": "s"}).elapsed_time_header
    assert config.from_mapping({"WorkerThreads": 2}).elapsed_time_header
    assert config.from_mapping({"LuaStates": 1}).elapsed_time_header
    assert not config.from_mapping({"WorkerThreads": 2,
                                    "elapsed_time_header": False}).elapsed_time_header
    source = """
        function main(env, con)
            local stop = os.clock() + 0.05
            while os.clock() < stop do end
            con:puts("done")
        end
    """
    web = make_lua_site(WorkerThreads=2, DefaultHeaders="X-A: 1")
    served = web.serve(web.script(source))
    found = re.fullmatch(rb"Status: 200 OK\r\nContent-Type: text/html\r\nX-ElapsedTime: (\d+)"
                         rb"\r\nX-A: 1\r\nContent-Length: 4\r\n\r\ndone", served)
    assert found, served
    assert 40 <= int(found.group(1)) < 5000
    plain = make_lua_site(headers="X-A: 1")
    assert plain.serve(plain.script(source, name="plain.lua")) == response(
        b"done", headers=b"X-A: 1\r\n")


def test_positional_cookie_of_the_nikkiii_fork(make_lua_site):
    """Point 10: nikkiii's con:cookie(name, value, expires, path, domain), expires in
    seconds since the epoch (request.c:87-126 of that fork), beside the options table."""
    web = make_lua_site()
    page = web.script("""
        function main(env, con)
            con:cookie("a", "1", 0, "/p", "example.org")
            con:cookie("b", 2, nil, "/q")
            con:cookie("c", "3", "86400")
            con:cookie("d", "4", {path = "/", httponly = true})
            con:cookie("e", "5")
        end
    """)
    assert web.serve(page) == response(b"", headers=(
        b"Set-Cookie: a=1; Path=/p; Domain=example.org; Expires=Thu, 01 Jan 1970 00:00:00 GMT"
        b"\r\nSet-Cookie: b=2; Path=/q\r\n"
        b"Set-Cookie: c=3; Expires=Fri, 02 Jan 1970 00:00:00 GMT\r\n"
        b"Set-Cookie: d=4; Path=/; HttpOnly\r\nSet-Cookie: e=5\r\n"))


# --- config files --------------------------------------------------------------------------


def test_original_samples_load_unchanged(tmp_path):
    """Both samples, comments and all, load as they are; luafcgid's is no luafcgid2 config."""
    (tmp_path / "a.lua").write_text(LUAFCGID_CONFIG)
    (tmp_path / "b.lua").write_text(LUAFCGID2_CONFIG)
    first, second = config.load(str(tmp_path / "a.lua")), config.load(str(tmp_path / "b.lua"))
    assert (first.workers, first.states, first.clones, first.sweep) == (4, 8, 8, 5000)
    assert first.headers == b"X-Powered-By: Lua\r\n" and not first.elapsed_time_header
    assert (second.workers, second.states, second.retries) == (4, 6, 3)
    assert second.elapsed_time_header
    assert second.script_config["table_example"] == {1: "abc", 2: "def", 3: "ghi",
                                                     "number": 42}


EXTRAS = """
base = "/srv"                      -- the file's own variables, as global as the settings
helpers = {f = function() end, out = io.stdout}
function housekeeping() end        -- luafcgid's manual: a config may define callbacks
"""


@pytest.mark.slow
def test_extra_globals_start_with_one_warning_on_stderr(tmp_path):
    """The originals read the globals they knew and ignored the others (config.c:57-78,
    settings.cpp:153-184): a config with its own globals and functions starts, and the
    warning naming them reaches the log of the started server (stderr without logfile)."""
    listen = str(tmp_path / "fcgi.sock")
    text = f"listen = {lua_literal(listen)}\nworkers = 2\n" + EXTRAS + private("", tmp_path)
    (tmp_path / "config.lua").write_text(text)
    server = Server(tmp_path / "config.lua", listen).start()
    try:
        # served: the master is past its start (a TERM before it sets its handlers kills it)
        answer = fcgi_call(listen, {"SCRIPT_FILENAME": str(tmp_path / "missing.lua")})
        assert answer.startswith(b"Status: 404")
        wait_until(lambda: "ignoring globals" in server.output(), what="the warning")
    finally:
        stopped = server.stop()
    warnings = [line for line in server.output().splitlines() if "ignoring globals" in line]
    assert len(warnings) == 1 and " WARNING " in warnings[0]
    assert warnings[0].endswith(
        f"config {tmp_path / 'config.lua'}: ignoring globals that are not luafcgid "
        "settings: base, helpers, housekeeping() (make them local to silence this)")
    assert stopped == 0


@pytest.mark.slow
def test_a_likely_typo_is_still_refused_at_start(tmp_path):
    (tmp_path / "config.lua").write_text(EXTRAS + "wrkers = 4\n")
    result = subprocess.run([sys.executable, "-m", "luafcgid", "start", "-F", "-c",
                             str(tmp_path / "config.lua")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"{tmp_path / 'config.lua'}: wrkers: unknown key "
                                     "(did you mean workers?)")
