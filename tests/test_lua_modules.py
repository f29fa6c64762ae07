"""Real Lua modules: Debian's C modules (cjson, lpeg, luasql, luasocket), a LuaRocks tree
beside the scripts, the search-path keys, and C modules that are missing, built for another
Lua, or crash — through a real nginx and real worker processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from luafcgid import config
from luafcgid.lua import runtime
from tests.support import (
    DEBIAN_LUA_LIB,
    Site,
    debian_has,
    fcgi_call,
    serving,
    wait_until,
    workers_of,
    write_config,
)

pytestmark = pytest.mark.nginx

RUNTIMES = ["5.4", "5.1", "luajit"]


def need_debian_modules(name: str, *modules: str) -> None:
    version = runtime.MODULE_VERSIONS[name]
    if not debian_has(version, *modules):
        pytest.skip(f"Debian's Lua {version} modules {', '.join(modules)} are not installed "
                    "(apt install lua-cjson lua-lpeg lua-sql-sqlite3 lua-socket)")


# --- C modules from Debian, on every runtime ----------------------------------------------------

DEBIAN_MODULES = r"""
local cjson = require "cjson"
local lpeg = require "lpeg"
local luasql = require "luasql.sqlite3"
local socket = require "socket"

local db = luasql.sqlite3():connect(":memory:")  -- opened once, at the state's load
local digits = lpeg.C(lpeg.R("09") ^ 1)

function main(env, con)
    local cursor = assert(db:execute("SELECT 40 + 2"))
    local answer = cursor:fetch()
    cursor:close()
    con:header("Content-Type", "application/json")
    con:puts(cjson.encode({
        answer = tonumber(answer),
        digits = digits:match("12345x"),
        socket = socket._VERSION,
        lua = _VERSION,
        jit = jit and jit.version or nil,
    }))
end
"""


@pytest.mark.slow
@pytest.mark.parametrize("name", RUNTIMES)
def test_debian_c_modules_load_and_work(tmp_path, name):
    need_debian_modules(name, "cjson", "lpeg", "luasql/sqlite3", "socket/core")
    with Site(tmp_path, {"mods.lua": DEBIAN_MODULES}, lua=name) as site:
        response = site.get("/mods.lua")
        assert response.status == 200, (response, site.server.output())
        got = json.loads(response.body)
        assert got["answer"] == 42
        assert got["digits"] == "12345"
        assert got["socket"].startswith("LuaSocket")
        assert got["lua"] == ("Lua 5.1" if name == "luajit" else f"Lua {name}")
        assert ("jit" in got) == (name == "luajit")


@pytest.mark.slow
def test_the_master_never_loads_a_c_module(tmp_path):
    need_debian_modules("5.4", "cjson")
    with Site(tmp_path, {"j.lua": 'local cjson = require "cjson" '
                                  'function main(env, con) con:puts(cjson.encode({1})) end'},
              processes=1) as site:
        assert site.get("/j.lua").body == b"[1]"
        worker = psutil.Process(site.server.pid).children()[0]
        worker_maps = Path(f"/proc/{worker.pid}/maps").read_text()
        master_maps = Path(f"/proc/{site.server.pid}/maps").read_text()
        assert "cjson.so" in worker_maps
        assert "cjson.so" not in master_maps


def test_a_config_file_cannot_load_a_c_module(tmp_path):
    path = tmp_path / "config.lua"
    path.write_text('local cjson = require "cjson"\nlisten = "127.0.0.1:9999"\n')
    with pytest.raises(config.ConfigError, match="no C modules in the config file"):
        config.load(str(path))


# --- a LuaRocks tree beside the scripts, and the path keys ------------------------------------

def compile_module(tmp_path: Path, name: str, body: str, into: Path) -> Path:
    """A tiny Lua C module ``name`` built with gcc, declaring the few Lua API calls it makes
    (so it needs no Lua headers): ``luaopen_<name>`` runs ``body``."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed (apt install gcc libc6-dev): it builds the test's C "
                    "modules")
    source = tmp_path / f"{name}.c"
    source.write_text(
        "#include <stdlib.h>\n"
        "typedef struct lua_State lua_State;\n"
        "typedef int (*lua_CFunction)(lua_State *L);\n"
        "extern void lua_pushcclosure(lua_State *L, lua_CFunction fn, int n);\n"
        "extern const char *lua_pushstring(lua_State *L, const char *s);\n"
        "static int crash(lua_State *L) { abort(); return 0; }\n"
        f"int luaopen_{name}(lua_State *L) {{ (void)crash; {body} return 1; }}\n")
    into.mkdir(parents=True, exist_ok=True)
    built = into / f".{name}.so.new"
    subprocess.run([gcc, "-shared", "-fPIC", "-o", str(built), str(source)], check=True)
    target = into / f"{name}.so"
    os.replace(built, target)  # a new file: a loaded one is never changed under its process
    return target


@pytest.mark.slow
def test_a_luarocks_tree_beside_the_scripts_is_searched(tmp_path):
    docroot = tmp_path / "www"
    rocks = docroot / "lua_modules"
    (rocks / "share/lua/5.4/greeting").mkdir(parents=True)
    (rocks / "share/lua/5.4/greeting/init.lua").write_text('return "hello from a rock"')
    compile_module(tmp_path, "native", 'lua_pushstring(L, "native from a rock");',
                   rocks / "lib/lua/5.4")
    script = ('local greeting, native = require "greeting", require "native" '
              'function main(env, con) con:puts(greeting .. " / " .. native) end')
    (docroot / "app").mkdir(parents=True)
    with Site(tmp_path, {"app/rock.lua": script}) as site:
        response = site.get("/app/rock.lua")
        assert response.body == b"hello from a rock / native from a rock", (
            response, site.server.output())


@pytest.mark.slow
def test_lua_path_and_lua_cpath_put_directories_before_the_defaults(tmp_path):
    need_debian_modules("5.4", "cjson")
    lib = tmp_path / "lib"
    (lib / "lua").mkdir(parents=True)
    (lib / "lua/shared.lua").write_text('return "shared"')
    compile_module(tmp_path, "extra", 'lua_pushstring(L, "extra");', lib / "c")
    script = ('local shared, extra, cjson = require "shared", require "extra", require "cjson" '
              'function main(env, con) con:puts(shared .. " " .. extra .. " " '
              '.. cjson.encode({true})) end')
    with Site(tmp_path, {"p.lua": script}, lua_path=f"{lib}/lua/?.lua;;",
              lua_cpath=f"{lib}/c/?.so;;") as site:
        response = site.get("/p.lua")
        assert response.body == b"shared extra [true]", (response, site.server.output())


@pytest.mark.slow
def test_lua_path_environment_counts_as_in_lua(tmp_path, monkeypatch):
    lib = tmp_path / "envlib"
    lib.mkdir()
    (lib / "fromenv.lua").write_text('return "from LUA_PATH_5_4"')
    monkeypatch.setenv("LUA_PATH_5_4", f"{lib}/?.lua;./?.lua;;")
    with Site(tmp_path, {"e.lua": 'local m = require "fromenv" '
                                  'function main(env, con) con:puts(m) end'}) as site:
        assert site.get("/e.lua").body == b"from LUA_PATH_5_4"


@pytest.mark.slow
def test_paths_command_shows_where_a_script_looks(tmp_path):
    docroot = tmp_path / "www"
    (docroot / "lua_modules").mkdir(parents=True)
    conf = write_config(tmp_path / "config.lua", lua_path=f"{tmp_path}/mine/?.lua;;")
    result = subprocess.run(
        [sys.executable, "-m", "luafcgid", "paths", "-c", str(conf), "--root", str(docroot),
         str(docroot / "blog/index.lua")], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    entries = [line.strip().split()[0] for line in lines if line.startswith("  ")]
    expected_start = [f"{docroot}/blog/?.lua", f"{docroot}/blog/?/init.lua",
                      f"{docroot}/?.lua", f"{docroot}/?/init.lua",
                      f"{docroot}/lua_modules/share/lua/5.4/?.lua",
                      f"{docroot}/lua_modules/share/lua/5.4/?/init.lua",
                      f"{tmp_path}/mine/?.lua", "/usr/local/share/lua/5.4/?.lua"]
    assert entries[:len(expected_start)] == expected_start
    assert f"{docroot}/lua_modules/lib/lua/5.4/?.so" in entries
    assert f"  {tmp_path}/mine/?.lua   (does not exist)" in lines
    assert not any(entry.startswith("./") for entry in entries)


# --- modules that do not load, and one that crashes ---------------------------------------------

@pytest.mark.slow
def test_a_missing_module_is_a_500_and_the_log_says_where_it_looked(tmp_path):
    with Site(tmp_path, {"missing.lua": 'local m = require "nosuch.thing" '
                                        'function main(env, con) end',
                         "hello.lua": 'function main(env, con) con:puts("hi") end'}) as site:
        response = site.get("/missing.lua")
        assert response.status == 500
        assert site.get("/hello.lua").body == b"hi"
        log = wait_until(lambda: "not found" in site.server.output() and site.server.output())
    www = site.docroot
    assert "module 'nosuch.thing' not found" in log
    assert f"no file '{www}/nosuch/thing.lua'" in log
    assert "no file '/usr/share/lua/5.4/nosuch/thing.lua'" in log
    assert "luarocks --lua-version 5.4 --tree <document root>/lua_modules install nosuch" in log


@pytest.mark.slow
def test_a_module_built_for_another_lua_is_a_clear_error(tmp_path):
    if not debian_has("5.1", "lpeg"):
        pytest.skip("Debian's Lua 5.1 lpeg is not installed (apt install lua-lpeg)")
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    shutil.copy(f"{DEBIAN_LUA_LIB}/5.1/lpeg.so", wrong / "lpeg.so")  # Lua 5.1's, into 5.4
    with Site(tmp_path, {"wrong.lua": 'local lpeg = require "lpeg" function main() end',
                         "hello.lua": 'function main(env, con) con:puts("hi") end'},
              lua_cpath=f"{wrong}/?.so;;") as site:
        assert site.get("/wrong.lua").status == 500
        assert site.get("/hello.lua").body == b"hi"
        log = wait_until(lambda: "undefined symbol" in site.server.output()
                         and site.server.output())
    assert f"{wrong}/lpeg.so was built for another Lua than this server's lua = \"5.4\"" in log


@pytest.mark.slow
def test_a_crashing_c_module_costs_only_its_worker(tmp_path):
    compile_module(tmp_path, "crash", "lua_pushcclosure(L, crash, 0);",
                   tmp_path / "www/lua_modules/lib/lua/5.4")
    scripts = {"boom.lua": 'local crash = require "crash" function main() crash() end',
               "hello.lua": 'function main(env, con) con:puts("hi") end'}
    with Site(tmp_path, scripts, processes=2) as site:
        assert site.get("/hello.lua").body == b"hi"
        before = wait_until(lambda: len(serving(site)) == 2 and serving(site))
        # Straight over FastCGI: nginx retries a GET that failed on a kept-alive connection,
        # which would take the request to the other worker too.
        params = {"SCRIPT_FILENAME": site.script_path("boom.lua"), "REQUEST_METHOD": "GET",
                  "DOCUMENT_ROOT": str(site.docroot)}
        assert fcgi_call(site.listen, params) == b""  # the worker died under the request
        after = wait_until(lambda: len(serving(site)) == 2 and serving(site) != before and
                           serving(site), what="a replacement for the crashed worker")
        assert after == workers_of(site.server.pid)
        assert len(before & after) == 1  # the other worker lives on
        for _ in range(20):
            assert site.get("/hello.lua").body == b"hi"
        log = site.server.output()
    assert "died (killed by SIGABRT)" in log
    assert "a C module or the Lua runtime crashed" in log


@pytest.mark.slow
def test_a_new_c_module_is_loaded_by_reload_not_by_the_heartbeat(tmp_path):
    lib = tmp_path / "www/lua_modules/lib/lua/5.4"
    compile_module(tmp_path, "version", 'lua_pushstring(L, "v1");', lib)
    scripts = {"v.lua": 'local version = require "version" '
                        'function main(env, con) con:puts(version) end',
               "other.lua": 'function main(env, con) con:puts("one") end'}
    with Site(tmp_path, scripts, processes=1, sweep=100) as site:
        assert site.get("/v.lua").body == b"v1"
        assert site.get("/other.lua").body == b"one"
        compile_module(tmp_path, "version", 'lua_pushstring(L, "v2");', lib)
        (site.docroot / "other.lua").write_text('function main(env, con) con:puts("two") end')
        # Heartbeats ran since the .so changed (other.lua reloaded): v.lua's state stays.
        wait_until(lambda: site.get("/other.lua").body == b"two", what="a heartbeat")
        assert site.get("/v.lua").body == b"v1"
        site.server.signal(signal.SIGHUP)
        wait_until(lambda: site.get("/v.lua").body == b"v2", what="reload")


# --- the search paths themselves --------------------------------------------------------------

def test_default_paths_are_what_lua_searches_on_this_os():
    path, cpath = runtime.default_paths("5.4")
    assert path.split(";") == [
        "/usr/local/share/lua/5.4/?.lua", "/usr/local/share/lua/5.4/?/init.lua",
        "/usr/local/lib/lua/5.4/?.lua", "/usr/local/lib/lua/5.4/?/init.lua",
        "/usr/share/lua/5.4/?.lua", "/usr/share/lua/5.4/?/init.lua"]
    assert f"{DEBIAN_LUA_LIB}/5.4/?.so" in cpath.split(";")
    assert runtime.default_paths("luajit") == runtime.default_paths("5.1")
    lua = shutil.which("lua5.4")
    if lua:  # the interpreter itself, less its ./ entries
        shown = subprocess.run([lua, "-e", "print(package.path) print(package.cpath)"],
                               capture_output=True, text=True, env={}, check=True)
        lua_path, lua_cpath = shown.stdout.split()
        assert path == ";".join(e for e in lua_path.split(";") if not e.startswith("./"))
        assert cpath == ";".join(e for e in lua_cpath.split(";") if not e.startswith("./"))


@pytest.mark.parametrize("environ, name, expected", [
    ({}, "5.4", "DEFAULT"),
    ({"LUA_PATH": "/a/?.lua"}, "5.4", "/a/?.lua"),
    ({"LUA_PATH": "/a/?.lua", "LUA_PATH_5_4": "/b/?.lua;;"}, "5.4", "/b/?.lua;DEFAULT"),
    ({"LUA_PATH_5_4": "/b/?.lua"}, "5.1", "DEFAULT"),
    ({"LUA_PATH": ";;/c/?.lua;./?.lua"}, "luajit", "DEFAULT;/c/?.lua"),
])
def test_environment_rules_of_lua_c(environ, name, expected):
    default = runtime.default_paths(name)[0]
    path, _ = runtime.base_paths(name, None, None, environ)
    assert path == expected.replace("DEFAULT", default)


def test_lua_path_setting_keeps_the_defaults_where_it_says_so():
    default = runtime.default_paths("5.4")[0]
    assert runtime.base_paths("5.4", "/x/?.lua;;", None, {})[0] == f"/x/?.lua;{default}"
    assert runtime.base_paths("5.4", "/x/?.lua", None, {})[0] == "/x/?.lua"
    assert runtime.base_paths("5.4", ";;/x/?.lua", None, {"LUA_PATH": "/e/?.lua"})[0] == (
        "/e/?.lua;/x/?.lua")


@pytest.mark.parametrize("value, error", [
    ("/a/?.lua;;/b/?.lua;;", r"write ;; \(the defaults\) once"),
    ("/srv/lib", "is not a template"),
    (42, "expected a string"),
])
def test_lua_path_setting_refused(tmp_path, value, error):
    with pytest.raises(config.ConfigError, match=error) as caught:
        config.from_mapping({"lua_path": value}, str(tmp_path / "config.lua"))
    assert caught.value.key == "lua_path"


def test_lua_path_relative_entries_are_taken_from_the_config_directory(tmp_path):
    settings = config.from_mapping({"lua_path": "lib/?.lua;;", "lua_cpath": "/c/loadall.so"},
                                   str(tmp_path / "config.lua"))
    assert settings.lua_path == f"{tmp_path}/lib/?.lua;;"
    assert settings.lua_cpath == "/c/loadall.so"


def test_states_outside_a_worker_process_say_why_c_modules_are_off(tmp_path):
    script = tmp_path / "c.lua"
    script.write_text('local ok, err = pcall(require, "cjson") '
                      'function main(env, con) con:puts(tostring(err)) end')
    from luafcgid.lua.state import Blueprint, State

    state = State(Blueprint(config.from_mapping({}), 1), str(script), str(tmp_path), 1,
                  lambda: ())
    output = state.run({}, b"", lambda data: None, 1)
    assert b"no C modules in this process: only a worker process links them" in output
    state.close()


def test_link_globally_once_per_process_and_other_runtimes_refused():
    code = (
        "from luafcgid.lua import runtime\n"
        "runtime.link_globally('luajit')\n"
        "runtime.link_globally('luajit')\n"
        "try:\n"
        "    runtime.link_globally('5.4')\n"
        "except RuntimeError as error:\n"
        "    print('refused:', error)\n"
        "try:\n"
        "    import lupa.lua53\n"
        "except ImportError as error:\n"
        "    print('import refused:', error)\n")
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "refused: this process already exports Lua luajit's C API" in shown.stdout
    assert "import refused: lupa.lua53 cannot be imported" in shown.stdout
