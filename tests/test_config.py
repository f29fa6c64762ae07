"""The config file (SPEC §6): real Lua files on disk, loaded with luafcgid.config."""

from __future__ import annotations

import dataclasses
import grp
import logging
import os
import pwd
from pathlib import Path

import lupa.lua54
import pytest

from luafcgid import config
from luafcgid.config import ConfigError, Settings
from luafcgid.log import log

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# luafcgid2's scripts/luafcgid2-config.lua, as shipped.
LUAFCGID2_SAMPLE = r'''--[[ Configuration script for luafcgid2 ]]--
WorkerThreads = 4
LuaStates = 1
LuaMaxStates = 6
LuaMaxSearchRetries = 3
HeadersSize = 128
BodySize = 2048
BodySectors = 4
MinFileInfoTime = 5000
UseFileChecksum = true
SessionName = "XLuaSession"
SessionTime = 3600
SessionKeyLen = 24
SessionCookieSecure = true
SessionCookieHttpOnly = true
SessionCookieSameSite = ""
SessionTargetScore = 3
SessionIpScore = 3
SessionUserAgentScore = 2
SessionLanguageScore = 1
DefaultHeaders = "X-Powered-By: luafcgid2\r\n"
DefaultHttpStatus = "200 OK"
DefaultContentType = "text/html"
MaxPostSize = 1048576 -- 1MB
LogFilePath = "/var/log/luafcgid2/luafcgid2.log"
listen = "/var/tmp/luafcgid2.sock"
StartupScript = ""
entrypoint = "main"
Config = {
	entrypoint = entrypoint,
	string_example = "Test config string",
	table_example = {
		"abc","def","ghi",
		number=42
	}
}
'''

# luafcgid's config.lua (2011) and its later Debian sample, which computes settings.
LUAFCGID_SAMPLE = """-- configuration script for luafcgid
workers = 5 \t-- number of worker threads
states = 10\t\t-- number of Lua VM states
sweep = 10000\t-- housekeeping sweep cycle in milliseconds
retries = 3\t\t-- number of search cycles before creating
"""

LUAFCGID_DEBIAN_SAMPLE = r"""
listen = "/var/tmp/luafcgid.sock"
workers = 4
states = workers * 2
clones = states
sweep = 5000
retries = 1
showerrors = true
buffering = true
headersize = 64
bodysize = 1024
headers = "X-Powered-By: Lua\r\n"
handler = "main"
httpstatus = "200 OK"
contenttype = "text/html"
maxpost = 1024 * 1024
logfile = "/var/log/luafcgid/luafcgid.log"
"""


def write(tmp_path: Path, source: str, name: str = "config.lua") -> str:
    target = tmp_path / name
    target.write_text(source)
    return str(target)


def refused(path: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    return caught.value


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def log_lines():
    records = Records()
    level = log.level
    log.addHandler(records)
    log.setLevel(logging.INFO)
    yield records.messages
    log.removeHandler(records)
    log.setLevel(level)


# --- defaults and the key table ------------------------------------------------------------


def test_defaults_are_spec_6():
    settings = config.defaults()
    assert settings.path == ""
    assert settings.listen == "127.0.0.1:9000"
    assert settings.processes == (os.cpu_count() or 1)
    assert (settings.workers, settings.states, settings.clones) == (4, 8, 8)
    assert (settings.sweep, settings.retries) == (10000, 1)
    assert settings.showerrors is False and settings.buffering is True
    assert (settings.headersize, settings.bodysize) == (64, 1024)
    assert settings.headers == b""
    assert (settings.handler, settings.httpstatus, settings.contenttype) == (
        "main", "200 OK", "text/html")
    assert settings.maxpost == 1048576
    assert settings.logfile is None and settings.startup is None and settings.root is None
    assert settings.script_config == {}
    assert settings.extensions == (".lua",)
    assert settings.pidfile == "/run/luafcgid.pid"
    assert settings.user is None and settings.group is None
    assert settings.socket_mode == 0o660 and settings.socket_owner is None
    assert settings.allowed_clients is None
    assert settings.backlog == 1024
    assert settings.timeout == 30 and settings.graceful_timeout == 30
    assert (settings.max_requests, settings.max_requests_jitter) == (0, 0)
    assert (settings.max_memory, settings.state_memory) == (0, 0)
    assert settings.loglevel == "info" and settings.lua == "5.4"
    assert settings.session["SessionName"] == "XLuaSession"


def test_an_empty_file_gives_the_defaults(tmp_path):
    path = write(tmp_path, "-- nothing set\n")
    assert dataclasses.replace(config.load(path), path="") == config.defaults()


def test_every_key_has_a_settings_field():
    init_fields = {f.name for f in dataclasses.fields(Settings) if f.init}
    from_keys = {config.FIELDS.get(key, key) for key in config.KEYS}
    assert init_fields - {"path", "session"} == from_keys


def test_states_and_clones_follow_workers_unless_set():
    assert (config.from_mapping({"workers": 3}).states, config.from_mapping(
        {"workers": 3}).clones) == (6, 6)
    assert config.from_mapping({"states": 5}).clones == 5
    assert config.from_mapping({"states": 5, "clones": 2}).clones == 2


def test_settings_are_frozen_and_do_not_share_config_tables():
    first, second = config.defaults(), config.defaults()
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.workers = 9  # type: ignore[misc]
    first.script_config["x"] = 1
    assert second.script_config == {}


# --- compatible config files ---------------------------------------------------------------


def test_luafcgid2_sample_config_loads(tmp_path, log_lines):
    path = write(tmp_path, LUAFCGID2_SAMPLE)
    settings = config.load(path)
    assert settings.path == path
    assert (settings.workers, settings.states, settings.retries) == (4, 6, 3)
    assert (settings.headersize, settings.bodysize) == (128, 2048)
    assert settings.headers == b"X-Powered-By: luafcgid2\r\n"
    assert (settings.httpstatus, settings.contenttype) == ("200 OK", "text/html")
    assert settings.maxpost == 1048576
    assert settings.logfile == "/var/log/luafcgid2/luafcgid2.log"
    assert settings.listen == "/var/tmp/luafcgid2.sock"
    assert settings.startup is None
    assert settings.handler == "main"
    assert settings.script_config == {
        "entrypoint": "main",
        "string_example": "Test config string",
        "table_example": {1: "abc", 2: "def", 3: "ghi", "number": 42},
    }
    assert settings.session == {
        "SessionName": "XLuaSession", "SessionTime": 3600, "SessionKeyLen": 24,
        "SessionCookieSecure": True, "SessionCookieHttpOnly": True,
        "SessionCookieSameSite": "", "SessionTargetScore": 3, "SessionIpScore": 3,
        "SessionUserAgentScore": 2, "SessionLanguageScore": 1,
    }
    ignored = [line for line in log_lines if "no effect" in line]
    assert len(ignored) == 1
    for key in ("LuaStates", "BodySectors", "MinFileInfoTime", "UseFileChecksum"):
        assert key in ignored[0]
    assert path in ignored[0]


def test_luafcgid2_session_settings_are_kept(tmp_path):
    path = write(tmp_path, 'SessionName = "sid" SessionTime = 60 SessionCookieSameSite = "Lax"')
    session = config.load(path).session
    assert (session["SessionName"], session["SessionTime"]) == ("sid", 60)
    assert session["SessionCookieSameSite"] == "Lax"
    assert session["SessionKeyLen"] == 24


def test_luafcgid_2011_sample_config_loads(tmp_path):
    settings = config.load(write(tmp_path, LUAFCGID_SAMPLE))
    assert (settings.workers, settings.states, settings.sweep, settings.retries) == (5, 10,
                                                                                    10000, 3)
    assert settings.clones == 10


def test_luafcgid_debian_sample_computes_settings_from_settings(tmp_path):
    settings = config.load(write(tmp_path, LUAFCGID_DEBIAN_SAMPLE))
    assert (settings.workers, settings.states, settings.clones) == (4, 8, 8)
    assert settings.maxpost == 1024 * 1024
    assert settings.showerrors is True
    assert settings.headers == b"X-Powered-By: Lua\r\n"
    assert settings.logfile == "/var/log/luafcgid/luafcgid.log"


def test_examples_config_loads():
    settings = config.load(str(EXAMPLES / "config.lua"))
    assert settings.listen == "127.0.0.1:9000"
    assert (settings.processes, settings.workers) == (2, 4)
    assert settings.showerrors is True
    assert settings.extensions == (".lua",)
    assert settings.pidfile.startswith("/tmp/")
    assert settings.script_config == {"site_name": "luafcgid examples",
                                      "notes_db": "/tmp/luafcgid-examples-notes.db"}
    assert settings.lookup("site_name") == "luafcgid examples"


# --- aliases ---------------------------------------------------------------------------------


ALIAS_SAMPLES = {
    # alias: (Lua value, canonical value)
    "WorkerThreads": ("3", 3),
    "LuaMaxStates": ("5", 5),
    "LuaMaxSearchRetries": ("2", 2),
    "HeadersSize": ("100", 100),
    "BodySize": ("200", 200),
    "DefaultHeaders": ('"X-A: 1\\n"', b"X-A: 1\r\n"),
    "entrypoint": ('"serve"', "serve"),
    "Entrypoint": ('"serve"', "serve"),
    "DefaultHttpStatus": ('"404 Not Found"', "404 Not Found"),
    "DefaultContentType": ('"text/plain"', "text/plain"),
    "MaxPostSize": ("10", 10),
    "LogFilePath": ('"/tmp/luafcgid-test.log"', "/tmp/luafcgid-test.log"),
    "StartupScript": ('"startup.lua"', "{tmp}/startup.lua"),
    "Listen": ('"127.0.0.1:9001"', "127.0.0.1:9001"),
}


def test_alias_samples_cover_every_alias():
    assert set(ALIAS_SAMPLES) == set(config.ALIASES)


@pytest.mark.parametrize("alias", sorted(ALIAS_SAMPLES))
def test_alias_sets_its_canonical_key(tmp_path, alias):
    (tmp_path / "startup.lua").write_text("started = true\n")
    source, expected = ALIAS_SAMPLES[alias]
    if isinstance(expected, str):
        expected = expected.format(tmp=tmp_path)
    settings = config.load(write(tmp_path, f"{alias} = {source}\n"))
    key = config.ALIASES[alias]
    assert getattr(settings, key) == expected
    seen = expected.decode() if isinstance(expected, bytes) else expected
    assert settings.lookup(alias) == settings.lookup(key) == seen


def test_a_key_and_its_alias_together_are_refused(tmp_path):
    path = write(tmp_path, "workers = 4\nWorkerThreads = 5\n")
    error = refused(path)
    assert str(error).startswith(f"{path}: workers: ")
    assert "WorkerThreads" in str(error) and "set twice" in str(error)


# --- what the file may do --------------------------------------------------------------------


def test_numbers_as_strings_where_luafcgid_read_them_with_lua_isnumber(tmp_path):
    """luafcgid read its numeric settings with lua_isnumber (main.c:31-40, config.c:59-78):
    a string Lua reads as a number counts; anything else keeps the usual refusal."""
    source = ('workers = "4"\nstates = " 8 "\nclones = "0x8"\nsweep = "1e3"\n'
              'maxpost = "+1024"\nbacklog = "\\t64\\n"\nretries = "2.0"\nwatchdog = "60"\n')
    settings = config.load(write(tmp_path, source))
    assert (settings.workers, settings.states, settings.clones, settings.sweep) == (4, 8, 8,
                                                                                   1000)
    assert (settings.maxpost, settings.backlog, settings.retries) == (1024, 64, 2)
    assert isinstance(settings.workers, int) and isinstance(settings.retries, int)
    for source, reason in [('workers = "4x"', "expected an integer, got a string ('4x')"),
                           ('workers = ""', "expected an integer, got a string ('')"),
                           ('workers = "2.5"', "expected an integer, got a number (2.5)"),
                           ('workers = "0"', "must be >= 1, got 0"),
                           ('workers = "inf"', "expected an integer, got a string ('inf')")]:
        error = refused(write(tmp_path, source + "\n"))
        assert (error.key, error.reason) == ("workers", reason), source


@pytest.mark.parametrize("text, number", [
    ("4", 4), (" 4 ", 4), ("\t\n4\v\f\r", 4), ("-4", -4), ("+4", 4), ("0x1F", 31),
    ("-0X10", -16), ("1e3", 1000.0), (".5", 0.5), ("5.", 5.0), ("0x1p4", 16.0),
    ("0x.8", 0.5), ("4x", None), ("", None), ("inf", None), ("nan", None), ("1_000", None),
    ("0x", None), ("e3", None), ("4 4", None), ("--4", None),
])
def test_lua_number_reads_what_lua_reads(text, number):
    assert config.lua_number(text) == number
    if number is not None:
        assert type(config.lua_number(text)) is type(number)
    # the reference: Lua itself
    lua = lupa.lua54.LuaRuntime()
    assert lua.eval("tonumber")(text) == number


EXTRA_GLOBALS = """
workers = 2
base = "/srv"
helpers = {f = function() end, out = io.stdout, bad = "\\xff"}
function housekeeping() end
lf = nil
"""


def test_other_globals_are_ignored_with_one_warning(tmp_path, log_lines):
    """The originals read the globals they knew and ignored the others (config.c:57-78,
    settings.cpp:153-184); luafcgid's manual lets a config define callbacks. What such a
    global holds (a function, userdata, bytes) is not even looked at."""
    path = write(tmp_path, EXTRA_GLOBALS)
    settings = config.load(path)
    assert settings.workers == 2
    assert settings.lookup("base") is None
    assert log_lines == [f"config {path}: ignoring globals that are not luafcgid settings: "
                         "base, helpers, housekeeping() (make them local to silence "
                         "this)"]


@pytest.mark.parametrize("name", ["base", "app", "db", "DEBUG", "helpers", "docroot",
                                  "site_name", "path", "log", "secret", "threads", "timezone",
                                  "locale", "root_dir", "listen_on", "states_count"])
def test_names_an_original_config_may_use_are_not_typos(tmp_path, name):
    settings = config.load(write(tmp_path, f'{name} = "x"\n'))
    empty = config.load(write(tmp_path, "", name="empty.lua"))
    assert dataclasses.replace(settings, path="") == dataclasses.replace(empty, path="")



def test_locals_are_not_settings_and_lua_arithmetic_works(tmp_path):
    source = "local per_core = 2\nworkers = 8 / 2\nstates = workers * per_core\n"
    settings = config.load(write(tmp_path, source))
    assert (settings.workers, settings.states) == (4, 8)
    assert isinstance(settings.workers, int)


def test_standard_library_is_there_but_not_taken_as_settings(tmp_path):
    source = 'Config = {upper = string.upper("x"), n = #table.concat({"a", "b"})}\n'
    settings = config.load(write(tmp_path, source))
    assert settings.script_config == {"upper": "X", "n": 2}


def test_the_config_cannot_reach_python(tmp_path):
    source = ('Config = {python = python == nil and package.loaded.python == nil,'
              ' debug = debug == nil and package.loaded.debug == nil}\n')
    assert config.load(write(tmp_path, source)).script_config == {"python": True, "debug": True}
    error = refused(write(tmp_path, "x = debug.getregistry().Py_None.__class__\n"))
    assert "attempt to index a nil value (global 'debug')" in str(error)


def test_config_tables_become_dicts_with_int_keys_for_sequences(tmp_path):
    source = 'Config = {list = {"a", "b"}, nested = {deep = {1.5, true}}, [7] = "seven"}\n'
    assert config.load(write(tmp_path, source)).script_config == {
        "list": {1: "a", 2: "b"}, "nested": {"deep": {1: 1.5, 2: True}}, 7: "seven"}


def test_relative_paths_resolve_against_the_config_directory(tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "startup.lua").write_text("-- startup\n")
    (tmp_path / "www").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "www")
    source = ('startup = "lib/startup.lua" logfile = "log/error.log" pidfile = "run.pid"\n'
              'root = "link" listen = "./fcgi.sock"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    path = write(tmp_path, source)
    cwd = os.getcwd()
    os.chdir(elsewhere)
    try:
        settings = config.load(os.path.relpath(path))
    finally:
        os.chdir(cwd)
    assert settings.path == path
    assert settings.startup == str(tmp_path / "lib" / "startup.lua")
    assert settings.logfile == str(tmp_path / "log" / "error.log")
    assert settings.pidfile == str(tmp_path / "run.pid")
    assert settings.root == os.path.realpath(tmp_path / "www")
    assert settings.listen == str(tmp_path / "fcgi.sock")


def test_empty_strings_mean_none_for_startup_and_logfile(tmp_path):
    settings = config.load(write(tmp_path, 'StartupScript = "" LogFilePath = ""\n'))
    assert settings.startup is None and settings.logfile is None


@pytest.mark.parametrize("value, expected", [
    ('"127.0.0.1:9000"', "127.0.0.1:9000"),
    ('"localhost:8000"', "localhost:8000"),
    ('"[::1]:9000"', "[::1]:9000"),
    ('":9000"', ":9000"),
    ('"*:9000"', "*:9000"),
    ("9001", "127.0.0.1:9001"),
    ('"9002"', "127.0.0.1:9002"),
    ('"/run/luafcgid.sock"', "/run/luafcgid.sock"),
])
def test_listen_forms(tmp_path, value, expected):
    assert config.load(write(tmp_path, f"listen = {value}\n")).listen == expected


@pytest.mark.parametrize("raw, expected", [
    ("X-A: 1\nX-B:2\r\n\r\nX-C:  3  ", b"X-A: 1\r\nX-B: 2\r\nX-C: 3\r\n"),
    ("Link: <http://example.org/>; rel=next\r\n", b"Link: <http://example.org/>; rel=next\r\n"),
    ("\n\r\n", b""),
    ("", b""),
])
def test_headers_are_normalised_to_crlf_lines(raw, expected):
    assert config.from_mapping({"headers": raw}).headers == expected


def test_socket_mode_string_or_number():
    assert config.from_mapping({"socket_mode": "0660"}).socket_mode == 0o660
    assert config.from_mapping({"socket_mode": "600"}).socket_mode == 0o600
    assert config.from_mapping({"socket_mode": 0o666}).socket_mode == 0o666


def test_allowed_clients_and_extensions_from_lua_lists(tmp_path):
    source = 'allowed_clients = {"127.0.0.1", "0:0::1"}\nextensions = {".lua", ".luac"}\n'
    settings = config.load(write(tmp_path, source))
    assert settings.allowed_clients == ("127.0.0.1", "::1")
    assert settings.extensions == (".lua", ".luac")


def test_user_group_and_socket_owner_must_exist():
    me = pwd.getpwuid(os.getuid())
    my_group = grp.getgrgid(os.getgid()).gr_name
    settings = config.from_mapping({"user": me.pw_name, "group": my_group,
                                    "socket_owner": f"{me.pw_name}:{my_group}"})
    assert (settings.user, settings.group) == (me.pw_name, my_group)
    assert settings.socket_owner == f"{me.pw_name}:{my_group}"


def test_httpstatus_code_gets_its_phrase():
    assert config.from_mapping({"httpstatus": 404}).httpstatus == "404 Not Found"
    assert config.from_mapping({"httpstatus": "299 Fine"}).httpstatus == "299 Fine"


# --- lookup ----------------------------------------------------------------------------------


def test_lookup(tmp_path):
    source = ('workers = 3\nheaders = "X-A: 1"\n'
              'Config = {site = "s", workers = "shadowed", list = {"a"}}\n')
    settings = config.load(write(tmp_path, source))
    assert settings.lookup("workers") == 3
    assert settings.lookup("WorkerThreads") == 3
    assert settings.lookup("handler") == settings.lookup("entrypoint") == "main"
    assert settings.lookup("headers") == "X-A: 1\r\n"
    assert settings.lookup("extensions") == {1: ".lua"}
    assert settings.lookup("Config") == settings.script_config
    assert settings.lookup("site") == "s"
    assert settings.lookup("list") == {1: "a"}
    assert settings.lookup("SessionName") == "XLuaSession"
    assert settings.lookup("nothing") is None
    assert settings.lookup("root") is None


# --- lua runtimes ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["5.1", "5.3", "5.4", "luajit"])
def test_lua_setting(tmp_path, name):
    assert config.load(write(tmp_path, f'lua = "{name}"\n')).lua == name


# --- refused configs -------------------------------------------------------------------------


BAD_VALUES = [
    # (source, key named, words of the reason)
    ('workers = "4x"', "workers", "expected an integer, got a string ('4x')"),
    ('WorkerThreads = "4"', "WorkerThreads", "expected an integer"),
    ("workers = 2.5", "workers", "expected an integer"),
    ("workers = true", "workers", "expected an integer"),
    ("workers = 0", "workers", "must be >= 1"),
    ("WorkerThreads = 0", "WorkerThreads", "must be >= 1"),
    ("states = 0", "states", "must be >= 1"),
    ("clones = 0", "clones", "must be >= 1"),
    ("states = 4 clones = 5", "clones", "must be <= states (4)"),
    ("sweep = 99", "sweep", "must be >= 100"),
    ("retries = -1", "retries", "must be >= 0"),
    ("showerrors = 1", "showerrors", "expected a boolean"),
    ("timeout = 0", "timeout", "must be > 0"),
    ('timeout = "30"', "timeout", "expected a number"),
    ("timeout = math.huge", "timeout", "expected a finite number"),
    ("graceful_timeout = -1", "graceful_timeout", "must be >= 0"),
    ("maxpost = -1", "maxpost", "must be >= 0"),
    ("backlog = 0", "backlog", "must be >= 1"),
    ("max_requests = -5", "max_requests", "must be >= 0"),
    ("socket_mode = 0660", "socket_mode", 'write the mode as a string, "0660"'),
    ('socket_mode = "0999"', "socket_mode", "expected an octal mode"),
    ('loglevel = "verbose"', "loglevel", "expected one of"),
    ('lua = "6.0"', "lua", "expected one of"),
    ('extensions = {"lua"}', "extensions", 'starting with "."'),
    ('extensions = ".lua"', "extensions", "expected a list"),
    ("extensions = {}", "extensions", "at least one"),
    ('allowed_clients = {"example.org"}', "allowed_clients", "does not appear to be an IP"),
    ('listen = "127.0.0.1:0"', "listen", "1..65535"),
    ('listen = "127.0.0.1:70000"', "listen", "1..65535"),
    ('listen = "127.0.0.1"', "listen", "host:port"),
    ('listen = "[zz]:9000"', "listen", "not an IPv6 address"),
    ('listen = "::1:9000"', "listen", "write IPv6 as [::1]:port"),
    ('listen = "/' + "x" * 120 + '"', "listen", "longer than 107 bytes"),
    ('headers = "no colon here"', "headers", '"Name: value"'),
    ('headers = "X-A: 1\\rX-B: 2"', "headers", "stray carriage return"),
    ("headers = 5", "headers", "expected a string"),
    ('handler = "1abc"', "handler", "Lua global function"),
    ('httpstatus = "OK"', "httpstatus", "a status like"),
    ('contenttype = "text/html\\r\\nX: y"', "contenttype", "single line"),
    ('startup = "missing.lua"', "startup", "no such file"),
    ('root = "missing-dir"', "root", "not a directory"),
    ('user = "no-such-user-luafcgid"', "user", "no such user"),
    ('socket_owner = "root:no-such-group-luafcgid"', "socket_owner", "no such group"),
    ("Config = 5", "Config", "expected a table"),
    ("Config = {f = print}", "Config.f", "a function cannot be a setting"),
    ("Config = {out = io.stdout}", "Config.out", "a Lua userdata cannot be a setting"),
    ('Config = {s = "\\xff"}', "Config.s", "not valid UTF-8"),
    ("local t = {} t.t = t Config = t", "Config" + ".t" * 32, "nested deeper"),
    ("UseFileChecksum = 1", "UseFileChecksum", "expected a boolean"),
    ('SessionCookieSameSite = "Sometimes"', "SessionCookieSameSite", "expected one of"),
    ("wrkers = 4", "wrkers", "unknown key (did you mean workers?)"),
    ("Workers = 4", "Workers", "unknown key (did you mean workers?)"),
    ("max_post = 4", "max_post", "unknown key (did you mean maxpost?)"),
    ("config = {}", "config", "unknown key (did you mean Config?)"),
]


@pytest.mark.parametrize("source, key, reason", BAD_VALUES)
def test_bad_values_are_refused_naming_file_key_and_reason(tmp_path, source, key, reason):
    path = write(tmp_path, source + "\n")
    error = refused(path)
    assert str(error).startswith(f"{path}: {key}: "), str(error)
    assert reason in error.reason
    assert (error.path, error.key) == (path, key)


@pytest.mark.parametrize("source, message", [
    ("workers = = 4", "syntax error at line 1: unexpected symbol near '='"),
    ('workers = 4\nerror("boom")', "error at line 2: boom"),
    ("local t\nt.x = 1", "error at line 2: attempt to index a nil value (local 't')"),
    ("error({})", "error: (error object is a table value)"),
    ("os.exit(0)", "error at line 1: os.exit is not allowed in the config file"),
    ('x = string.rep("x", 1 << 30)', "not enough memory"),
])
def test_lua_errors_are_refused_naming_the_file(tmp_path, source, message):
    path = write(tmp_path, source + "\n")
    error = refused(path)
    assert str(error).startswith(f"{path}: ")
    assert message in str(error)


@pytest.mark.parametrize("source", [
    "while true do end",
    "while true do pcall(function() while true do end end) end",
])
def test_a_config_that_never_ends_is_stopped(tmp_path, monkeypatch, source):
    monkeypatch.setattr(config, "CONFIG_CPU_SECONDS", 0.2)
    path = write(tmp_path, source + "\n")
    assert "ran longer than 0.2 s" in str(refused(path))


def test_a_missing_file_is_refused(tmp_path):
    path = str(tmp_path / "missing.lua")
    error = refused(path)
    assert str(error) == f"{path}: cannot read the config file: No such file or directory"


def test_error_text_without_a_file():
    with pytest.raises(ConfigError) as caught:
        config.from_mapping({"workers": "four"})
    assert str(caught.value) == "workers: expected an integer, got a string ('four')"
    with pytest.raises(ConfigError, match="did you mean workers"):
        config.from_mapping({"wrkers": 1})
