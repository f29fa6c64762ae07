"""The Lua script API (SPEC §3): con, the luafcgid2 globals, require("luafcgid"), errors.

Real lupa runtimes, real script files in tmp_path.
"""

from __future__ import annotations

from typing import List

import pytest

from luafcgid.lua import ScriptError
from tests.lua_site import RUNTIMES, head, response

# --- buffered responses -------------------------------------------------------------------


@pytest.mark.parametrize("lua", RUNTIMES)
def test_buffered_response_is_exact(make_lua_site, lua):
    web = make_lua_site(lua=lua, headers="X-Served-By: luafcgid\nX-Frame-Options: DENY")
    page = web.script("""
        function main(env, con)
            con:header("Set-Cookie", "a=1")
            con:header("X-Count", 3)
            con:header("Set-Cookie: b=2")
            con:puts("Hello, ")
            con:puts(42)
            con:puts("")
            con:puts(env.REQUEST_METHOD)
        end
    """)
    sink: List[bytes] = []
    assert web.serve(page, sink=sink) == response(
        b"Hello, 42GET",
        headers=b"X-Served-By: luafcgid\r\nX-Frame-Options: DENY\r\n"
                b"Set-Cookie: a=1\r\nX-Count: 3\r\nSet-Cookie: b=2\r\n")
    assert sink == []


def test_defaults_come_from_settings(make_lua_site):
    web = make_lua_site(httpstatus="202 Accepted", contenttype="text/plain; charset=utf-8")
    page = web.script("function main(env, con) con:puts('x') end")
    assert web.serve(page) == response(b"x", b"202 Accepted", b"text/plain; charset=utf-8")


def test_status_and_content_type(make_lua_site):
    web = make_lua_site()
    cases = {
        "con:status(404)": b"404 Not Found",
        "con:status('404')": b"404 Not Found",
        "con:status('404 Gone Fishing')": b"404 Gone Fishing",
        "con:status(299)": b"299",
        "con:header('Status', '201 Created')": b"201 Created",
        "con:header('status: 503')": b"503 Service Unavailable",
        "RespStatus('302 Found')": b"302 Found",
    }
    for number, (call, status) in enumerate(cases.items()):
        page = web.script(f"function main(env, con) {call} end", name=f"status{number}.lua")
        assert web.serve(page) == response(b"", status), call
    page = web.script("""
        function main(env, con)
            con:header("Content-Type", "text/plain")
            con:puts(Response[418])
        end
    """, name="type.lua")
    # luafcgid2's phrase (settings.cpp:24), not Python's "I'm a Teapot"
    assert web.serve(page) == response(b"418 I'm a teapot", content_type=b"text/plain")
    page = web.script("""
        function main(env, con)
            con:header("content-type: application/json")
            RespContentType("application/xml")
        end
    """, name="type2.lua")
    assert web.serve(page) == response(b"", content_type=b"application/xml")


def test_bad_arguments_are_clear_lua_errors(make_lua_site):
    web = make_lua_site()
    cases = {
        "con:puts({})": "con:puts expects a string or a number, got table",
        "con:puts(nil)": "con:puts expects a string or a number, got nil",
        "Send(true)": "con:puts expects a string or a number, got boolean",
        "con:header('no colon here')": 'con:header expects (name, value) or a "Name: value" line',
        "con:header('Bad Name', 'x')": 'con:header: "Bad Name" is not a valid header name',
        "con:header('X-A', 'a\\r\\nX-Injected: 1')": "con:header: line breaks are not allowed",
        "con:status({})": "con:status expects a status code or a status line, got table",
    }
    for number, (call, message) in enumerate(cases.items()):
        page = web.script(f"function main(env, con)\n  {call}\nend", name=f"bad{number}.lua")
        with pytest.raises(ScriptError) as failure:
            web.serve(page)
        # the error points at the script line that made the bad call
        assert f"bad{number}.lua:2: {message}" in failure.value.message, call


# --- streaming ----------------------------------------------------------------------------


@pytest.mark.parametrize("lua", RUNTIMES)
def test_flush_sends_the_head_then_output_streams(make_lua_site, lua):
    web = make_lua_site(lua=lua, headers="X-A: 1")
    page = web.script("""
        function main(env, con)
            con:header("X-B", "2")
            con:puts("one")
            con:puts(1)
            con:flush()
            con:flush()
            con:puts("two")
            con:puts("")
            con:puts("three")
        end
    """)
    sink: List[bytes] = []
    assert web.serve(page, sink=sink) == b""
    assert sink == [head(headers=b"X-A: 1\r\nX-B: 2\r\n") + b"one1", b"two", b"three"]


def test_unbuffered_puts_streams_each_piece(make_lua_site):
    web = make_lua_site(buffering=False)
    page = web.script("""
        function main(env, con)
            con:status(201)
            con:puts("a")
            con:puts(2)
            con:puts("")
            con:puts("c")
        end
    """)
    sink: List[bytes] = []
    assert web.serve(page, sink=sink) == b""
    assert sink == [head(b"201 Created") + b"a", b"2", b"c"]


def test_unbuffered_without_output_returns_the_head(make_lua_site):
    web = make_lua_site(buffering=False)
    page = web.script("function main(env, con) con:header('X-A', 'b') end")
    sink: List[bytes] = []
    assert web.serve(page, sink=sink) == head(headers=b"X-A: b\r\n")
    assert sink == []


def test_a_head_set_once_sent_is_dropped_and_the_page_completes(make_lua_site, log_lines):
    """The originals let the page go on (request.c:49-69: a late header only lands in a
    buffer already sent); a late header used to raise and cut the page off."""
    web = make_lua_site()
    page = web.script("""
        function main(env, con)
            con:puts("x")
            con:flush()
            con:header("X-Late", "1")
            con:status(404)
            RespContentType("text/plain")
            con:puts("y")
        end
    """)
    sink: List[bytes] = []
    assert web.serve(page, sink=sink) == b""
    assert sink == [head() + b"x", b"y"]
    assert web.serve(page, sink=[]) == b""
    # one warning per line of the script, not one per request
    warnings = [line for line in log_lines if "ignored: the head was already sent" in line]
    assert [line.split(" ignored:")[0] for line in warnings] == [
        f'{page}: line 5: con:header("X-Late")',
        f'{page}: line 6: con:status("404 Not Found")',
        f'{page}: line 7: RespContentType("text/plain")',
    ]
    assert "set headers and the status before that" in warnings[0]


def test_a_failing_sink_stops_the_handler_and_is_raised(make_lua_site):
    web = make_lua_site()
    page = web.script("""
        function main(env, con)
            con:puts("x")
            con:flush()
            after = (after or 0) + 1
            con:puts(after)
        end
    """)

    def broken(data: bytes) -> None:
        raise BrokenPipeError("client went away")

    state = web.cache.acquire(page, str(web.root))
    try:
        with pytest.raises(BrokenPipeError):
            state.run({}, b"", broken, 1)
        # the handler stopped at the flush, and the next request is not affected
        sink: List[bytes] = []
        assert state.run({}, b"", sink.append, 1) == b""
        assert sink == [head() + b"x", b"1"]
    finally:
        web.cache.release(state)


# --- reset, gets, config, log -------------------------------------------------------------


def test_reset_discards_the_buffered_body_only(make_lua_site):
    """luafcgid's con:reset() clears the body buffer and nothing else (request.c:103-111);
    luafcgid2's Reset() clears the headers and the body (lua_fnc.cpp:93-97): in both the
    status and the content type set before stay."""
    web = make_lua_site()
    page = web.script("""
        function main(env, con)
            con:status(404)
            con:header("X-Kept", "1")
            con:header("Content-Type", "text/plain")
            con:puts("discarded")
            con:reset()
            con:puts("kept")
        end
    """)
    assert web.serve(page) == response(b"kept", b"404 Not Found", b"text/plain",
                                       b"X-Kept: 1\r\n")
    page = web.script("""
        function main()
            RespStatus(Response[403])
            RespContentType("text/plain")
            Header("X-Gone", "1")
            Send("discarded")
            Reset()
            Header("X-After", "2")
            Send("kept")
        end
    """, name="luafcgid2.lua")
    assert web.serve(page) == response(b"kept", b"403 Forbidden", b"text/plain",
                                       b"X-After: 2\r\n")


def test_gets_reads_the_body_once(make_lua_site):
    """luafcgid's con:gets() reads the FastCGI stream: the body at the first call, nil when
    there is none and at every later call (main.c:84-121). luafcgid2's Receive() reads the
    same way and gives "" for nothing (lua_fnc.cpp:104-118)."""
    web = make_lua_site()
    page = web.script("""
        function main(env, con)
            local first, second = con:gets(), con:gets()
            con:puts(tostring(first) .. "|" .. tostring(second) .. "|" .. Receive() .. "|")
            con:puts(tostring(con:form().a))  -- the batteries still see the body
        end
    """)
    form = {b"CONTENT_TYPE": b"application/x-www-form-urlencoded"}
    assert web.serve(page, form, body=b"a=1&b=\x00\xff") == response(b"a=1&b=\x00\xff|nil||1")
    assert web.serve(page, form) == response(b"nil|nil||nil")
    page = web.script("""
        function main(env, con)
            Send(Receive() .. "|" .. Receive() .. "|" .. tostring(con:gets()))
        end
    """, name="receive.lua")
    assert web.serve(page, body=b"posted") == response(b"posted||nil")
    assert web.serve(page) == response(b"||nil")


def test_config_values(make_lua_site):
    web = make_lua_site(workers=3, headers="X-A: 1",
                        Config={"greeting": "hi", "list": {1: "a", 2: "b"}, "nested": {"n": 2.5}})
    page = web.script("""
        function main(env, con)
            local parts = {}
            local function add(v) parts[#parts + 1] = tostring(v) end
            add(con:config("workers"))
            add(con:config("WorkerThreads"))
            add(con:config("handler"))
            add(con:config("greeting"))
            add(Config.greeting)
            add(#Config.list .. Config.list[2])
            add(con:config("nested").n)
            add(con:config("extensions")[1])
            add(con:config("buffering"))
            add(con:config("headers"))
            add(con:config("no such key"))
            con:puts(table.concat(parts, "|"))
        end
    """)
    assert web.serve(page) == response(
        b"3|3|main|hi|hi|2b|2.5|.lua|true|X-A: 1\r\n|nil", headers=b"X-A: 1\r\n")


def test_log_writes_one_tagged_line(make_lua_site, log_lines):
    web = make_lua_site()
    page = web.script("""
        function main(env, con)
            con:log("first")
            Log("second\\nline")
            con:log(12)
        end
    """)
    web.serve(page)
    assert log_lines == [f"{page}: first", f"{page}: second\\nline", f"{page}: 12"]


# --- luafcgid2 globals --------------------------------------------------------------------


@pytest.mark.parametrize("lua", RUNTIMES)
def test_luafcgid2_globals(make_lua_site, lua):
    web = make_lua_site(lua=lua, Config={"site": "demo"})
    page = web.script("""
        function main()
            Header("X-Env", Env.REQUEST_METHOD .. " " .. Env.QUERY_STRING)
            Header("X-Raw: yes")
            RespContentType("text/plain")
            local names = {}
            for name, value in pairs(Cookies) do names[#names + 1] = name .. "=" .. value end
            table.sort(names)
            Send(table.concat(names, ","))
            Send(" " .. Info.State .. "/" .. Info.Thread .. "/" .. Info.Worker)
            Send(" " .. Config.site .. " " .. Response[404] .. " " .. Dir())
            Send(" " .. Receive())
            Log("logged")
        end
    """)
    state = web.cache.acquire(page, str(web.root))
    web.cache.release(state)  # the request below gets this idle state
    out = web.serve(page, {b"QUERY_STRING": b"q=1",
                           b"HTTP_COOKIE": b'a=1; b="quoted value"; flag, c = 3; a=last'},
                    body=b"posted", thread=7)
    expected = (f'a=last,b=quoted value,c=3,flag= {state.number}/7/3 demo 404 Not Found '
                f'{web.root} posted').encode()
    assert out == response(expected, content_type=b"text/plain",
                           headers=b"X-Env: GET q=1\r\nX-Raw: yes\r\n")


def test_cookies_empty_without_header_and_fresh_per_request(make_lua_site):
    web = make_lua_site()
    page = web.script("""
        function main(env, con)
            local n = 0
            for _ in pairs(Cookies) do n = n + 1 end
            con:puts(n)
            Cookies.added = "x"
        end
    """)
    assert web.serve(page) == response(b"0")
    assert web.serve(page) == response(b"0")
    assert web.serve(page, {b"HTTP_COOKIE": b"a=1"}) == response(b"1")


def test_thread_data_counts_states_per_script(make_lua_site):
    web = make_lua_site(states=4)
    other = web.script("function main(env, con) end", name="other.lua")
    page = web.script("""
        function main(env, con)
            local lines = {}
            for script, count in pairs(ThreadData()) do
                lines[#lines + 1] = script .. "=" .. count
            end
            table.sort(lines)
            con:puts(table.concat(lines, ";"))
        end
    """)
    web.serve(other)
    busy = web.cache.acquire(other, str(web.root))
    web.cache.release(web.cache.acquire(other, str(web.root)))
    try:
        assert web.serve(page) == response(f"{other}=2;{page}=1".encode())
    finally:
        web.cache.release(busy)


# --- require("luafcgid") ------------------------------------------------------------------


@pytest.mark.parametrize("lua", RUNTIMES)
def test_luafcgid_module(make_lua_site, lua):
    web = make_lua_site(lua=lua)
    page = web.script("""
        local luafcgid = require("luafcgid")
        local function check(ok, what) if not ok then error(what, 2) end end
        function main(env, con)
            -- as the original: all but letters, digits and space escaped (luafcgid.lua:29-36)
            check(luafcgid.urlencode("a b&c=d/é~*-_.") == "a+b%26c%3Dd%2F%C3%A9%7E%2A%2D%5F%2E",
                  "urlencode")
            check(luafcgid.urldecode("a+b%26c%3dd%2F%C3%A9") == "a b&c=d/é", "urldecode")
            local form = luafcgid.parse("a=1&b=x+y&a=2&c&a=3&d=&e%3D=%26")
            check(type(form.a) == "table" and #form.a == 3, "repeated names make an array")
            check(form.a[1] == "1" and form.a[2] == "2" and form.a[3] == "3", "array in order")
            check(form.b == "x y" and form.c == "" and form.d == "", "values")
            check(form["e="] == "&", "decoded names")
            check(next(luafcgid.parse("")) == nil and next(luafcgid.parse(nil)) == nil, "empty")
            local value = {1, "two", {3, x = false}, name = 'q"uote\\n\\0', [10] = 0.1,
                           [true] = -2^53, huge = math.huge, float = 3.0}
            local text = luafcgid.serialize(value)
            local back = (loadstring or load)("return " .. text)()
            check(luafcgid.serialize(back) == text, "round trip: " .. text)
            check(back[2] == "two" and back[3].x == false and back.name == value.name, "values")
            check(back[10] == 0.1 and back[true] == -2^53 and back.huge == math.huge, "numbers")
            check(luafcgid.serialize(print) == "" and luafcgid.serialize(nil) == "", "no literal")
            check(luafcgid.serialize({print, 2, f = print}) == "{nil,2}", "left out")
            local loop = {} loop.self = loop
            check(not pcall(luafcgid.serialize, loop), "cycles are refused")
            check(luafcgid.serialize("x") == '"x"', "a plain string")
            con:puts("ok")
        end
    """)
    assert web.serve(page) == response(b"ok")


# --- state behaviour ----------------------------------------------------------------------


def test_globals_persist_across_requests(make_lua_site):
    web = make_lua_site()
    page = web.script("""
        local loads = (loads or 0) + 1
        function main(env, con)
            count = (count or 0) + 1
            con:puts(count .. "/" .. loads)
        end
    """)
    assert [web.serve(page) for _ in range(3)] == [response(b"1/1"), response(b"2/1"),
                                                  response(b"3/1")]


def test_os_exit_is_disabled(make_lua_site):
    web = make_lua_site()
    page = web.script("""
        function main(env, con)
            if env.QUERY_STRING == "exit" then os.exit(0) end
            con:puts("alive")
        end
    """)
    with pytest.raises(ScriptError) as failure:
        web.serve(page, {b"QUERY_STRING": b"exit"})
    assert "page.lua:3: os.exit is disabled in luafcgid" in failure.value.message
    assert web.serve(page) == response(b"alive")


def test_python_is_not_reachable(make_lua_site):
    web = make_lua_site()
    page = web.script("""
        function main(env, con)
            local reached = {}
            if python ~= nil then reached[#reached + 1] = "python global" end
            if package.loaded.python ~= nil then reached[#reached + 1] = "python module" end
            -- Python objects lupa keeps in the registry (our callbacks among them) are opaque
            local function probe(value, where)
                if type(value) == "userdata" then
                    for _, name in ipairs({"__class__", "__globals__", "func", "sink"}) do
                        local ok, got = pcall(function() return value[name] end)
                        if ok and got ~= nil then
                            reached[#reached + 1] = where .. "." .. name
                        end
                    end
                end
            end
            for key, value in pairs(debug.getregistry()) do
                probe(value, tostring(key))
                if type(value) == "table" then
                    for k, v in pairs(value) do probe(v, tostring(key) .. "/" .. tostring(k)) end
                end
            end
            con:puts(#reached == 0 and "sealed" or table.concat(reached, ", "))
        end
    """)
    assert web.serve(page) == response(b"sealed")


def test_package_path_has_no_dot_slash(make_lua_site):
    web = make_lua_site()
    page = web.script("""
        function main(env, con)
            con:puts(package.path .. "\\n" .. package.cpath)
        end
    """)
    out = web.serve(page).split(b"\r\n\r\n", 1)[1].decode()
    path, cpath = out.split("\n")
    assert not any(entry.startswith("./") for entry in path.split(";") + cpath.split(";"))
    assert path.startswith(f"{web.root}/?.lua;{web.root}/?/init.lua;")


# --- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("lua", RUNTIMES)
def test_handler_error_discards_output(make_lua_site, lua):
    web = make_lua_site(lua=lua)
    page = web.script("""
        local function helper()
            error("broken")
        end
        function main(env, con)
            con:header("X-A", "1")
            con:puts("partial")
            if env.QUERY_STRING == "fail" then helper() end
            con:puts("ok")
        end
    """)
    with pytest.raises(ScriptError) as failure:
        web.serve(page, {b"QUERY_STRING": b"fail"})
    error = failure.value
    assert error.script == page
    assert error.message.endswith("page.lua:3: broken")
    assert error.traceback.startswith("stack traceback:")
    assert "page.lua:3" in error.traceback and "page.lua:8" in error.traceback
    assert "xpcall" not in error.traceback  # only the script's frames
    assert not error.flushed and not error.memory
    # nothing of the failed request leaks into the next one
    assert web.serve(page, {b"QUERY_STRING": b""}) == response(b"partialok",
                                                               headers=b"X-A: 1\r\n")


def test_error_after_flush_is_flagged(make_lua_site):
    web = make_lua_site()
    page = web.script("""
        function main(env, con)
            con:puts("early")
            con:flush()
            error({code = 1})
        end
    """)
    sink: List[bytes] = []
    with pytest.raises(ScriptError) as failure:
        web.serve(page, sink=sink)
    assert failure.value.flushed
    assert failure.value.message.startswith("table: ")
    assert sink == [head() + b"early"]


def test_missing_handler(make_lua_site):
    web = make_lua_site(handler="serve")
    page = web.script("function main(env, con) con:puts('wrong name') end")
    with pytest.raises(ScriptError) as failure:
        web.serve(page)
    assert failure.value.message == "no handler: the global 'serve' is nil, not a function"
    assert not failure.value.memory


def test_syntax_error_names_the_file(make_lua_site):
    web = make_lua_site()
    page = web.script("function main(env, con)\n  con:puts('x'\nend\n")
    with pytest.raises(ScriptError) as failure:
        web.serve(page)
    assert failure.value.script == page
    assert "page.lua:3:" in failure.value.message
    assert len(web.cache) == 0


def test_top_level_error_has_a_traceback(make_lua_site):
    web = make_lua_site()
    page = web.script("local x = nil\nlocal y = x.field\nfunction main() end\n")
    with pytest.raises(ScriptError) as failure:
        web.serve(page)
    assert "page.lua:2: attempt to index" in failure.value.message
    assert "page.lua:2: in main chunk" in failure.value.traceback
    assert len(web.cache) == 0


@pytest.mark.parametrize("lua", RUNTIMES)
def test_state_memory_cap(make_lua_site, lua):
    web = make_lua_site(lua=lua, state_memory=8 * 1024 * 1024)
    page = web.script("""
        function main(env, con)
            con:puts("before")
            if env.QUERY_STRING == "hog" then
                local hog = {}
                for i = 1, 1e8 do hog[i] = {i} end
            end
            con:puts("fine")
        end
    """)
    assert web.serve(page) == response(b"beforefine")
    with pytest.raises(ScriptError) as failure:
        web.serve(page, {b"QUERY_STRING": b"hog"})
    assert failure.value.memory
    assert failure.value.message == "not enough memory"
    assert not failure.value.flushed
    assert len(web.cache) == 0  # over state_memory: dropped at release
    assert web.serve(page) == response(b"beforefine")


def test_state_memory_too_small_to_load(make_lua_site):
    web = make_lua_site(state_memory=64 * 1024)
    page = web.script("big = string.rep('x', 200000)\nfunction main() end\n")
    with pytest.raises(ScriptError) as failure:
        web.serve(page)
    assert failure.value.memory
    assert len(web.cache) == 0


def test_error_in_script_error_object_is_a_string_message(make_lua_site):
    web = make_lua_site()
    page = web.script("function main() error(setmetatable({}, {__tostring = function() "
                      "return 'custom' end})) end")
    with pytest.raises(ScriptError) as failure:
        web.serve(page)
    assert failure.value.message == "custom"
