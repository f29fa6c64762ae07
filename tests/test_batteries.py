"""The batteries of require("luafcgid") (issue #7): forms, multipart, cookies, JSON, HTML,
redirects, on Lua 5.4, 5.1 and LuaJIT.

Real lupa states running real script files in tmp_path. Malformed input must be a Lua
error the script can catch, and the state must go on serving.
"""

from __future__ import annotations

import json
import urllib.parse
from typing import List, Optional

import pytest

from luafcgid.lua import ScriptError
from tests.lua_site import LuaSite, response

RUNTIMES = ["5.4", "5.1", "luajit"]

# Every check script starts with these: `check` errors at the caller's line, `fails`
# runs f(...) under pcall and wants an error whose message holds `expected`.
CHECKS = """
    local luafcgid = require("luafcgid")
    local function check(ok, what) if not ok then error(what, 2) end end
    local function fails(expected, f, ...)
        local ok, message = pcall(f, ...)
        check(not ok, "no error, expected: " .. expected)
        check(message:find(expected, 1, true), "got: " .. tostring(message))
    end
"""


def run_checks(site: LuaSite, body: str) -> None:
    page = site.script(CHECKS + "function main(env, con)\n" + body + "\ncon:puts('ok')\nend\n")
    assert site.serve(page) == response(b"ok")


@pytest.mark.parametrize("lua", RUNTIMES)
def test_parse_query(make_lua_site, lua):
    run_checks(make_lua_site(lua), """
        check(luafcgid.parse_query == luafcgid.parse, "one function under two names")
        local form = luafcgid.parse_query("a=1&b=x+y%21&a=2&c&a=3&e%3D=%26")
        check(#form.a == 3 and form.a[1] == "1" and form.a[3] == "3", "repeated names")
        check(form.b == "x y!" and form.c == "" and form["e="] == "&", "decoded")
        local bad = luafcgid.parse_query("p=%zz&q=%4&r=100%&s=%%41")
        check(bad.p == "%zz" and bad.q == "%4" and bad.r == "100%", "bad escapes stay")
        check(bad.s == "%A", "a good escape after a bad one")
        check(next(luafcgid.parse_query(nil)) == nil, "nil: no fields")
        fails("parse expects a string, got table", luafcgid.parse_query, {})
    """)


def multipart_body(boundary: bytes, parts: List[bytes], preamble: bytes = b"") -> bytes:
    delimiter = b"--" + boundary
    return (preamble + b"".join(delimiter + b"\r\n" + part + b"\r\n" for part in parts)
            + delimiter + b"--\r\nepilogue")


MULTIPART_SCRIPT = """
    local luafcgid = require("luafcgid")
    function main(env, con)
        served = (served or 0) + 1
        con:header("X-Served", served)
        local ok, fields = pcall(luafcgid.parse_multipart, con:gets(), env.CONTENT_TYPE)
        if not ok then
            con:puts("error: " .. fields)
            return
        end
        local names = {}
        for name in pairs(fields) do names[#names + 1] = name end
        table.sort(names)
        for _, name in ipairs(names) do
            local parts = fields[name].name and {fields[name]} or fields[name]
            for _, part in ipairs(parts) do
                con:puts(table.concat({part.name, part.filename or "-",
                    part.content_type or "-", luafcgid.urlencode(part.data)}, "|") .. "\\n")
            end
        end
    end
"""


@pytest.mark.parametrize("lua", RUNTIMES)
def test_parse_multipart(make_lua_site, lua):
    web = make_lua_site(lua)
    page = web.script(MULTIPART_SCRIPT)
    binary = bytes(range(256)) + b"\r\n--almost\r\n-"
    body = multipart_body(b"----xYz'()+_,-./:=?", [
        b'Content-Disposition: form-data; name="title"\r\n\r\nHello, world',
        b'content-disposition: form-data; name="file"; filename="C:\\up\\a b.bin"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n" + binary,
        b"Content-Disposition: form-data; name=tag\r\n\r\none",
        b'Content-Disposition: form-data; name="tag"\r\nX-Other: ignored\r\n\r\n',
        b'Content-Disposition: form-data; name="tag"; filename=""\r\n\r\nthree',
    ], preamble=b"a preamble\r\n")
    for content_type in (b"multipart/form-data; boundary=\"----xYz'()+_,-./:=?\"",
                         b"Multipart/Form-Data;BOUNDARY=----xYz'()+_,-./:=?; charset=x"):
        output = web.serve(page, {b"CONTENT_TYPE": content_type}, body)
        lines = output.split(b"\r\n\r\n", 1)[1].decode().splitlines()
        fields = [line.split("|") for line in lines]
        assert [field[:3] for field in fields] == [
            ["file", "C:\\up\\a b.bin", "application/octet-stream"],
            ["tag", "-", "-"], ["tag", "-", "-"], ["tag", "", "-"],
            ["title", "-", "-"]]
        data = [urllib.parse.unquote_to_bytes(field[3].replace("+", " ")) for field in fields]
        assert data == [binary, b"one", b"", b"three", b"Hello, world"]


MALFORMED_MULTIPART = {
    b"--b\r\nContent-Disposition: form-data; name=a\r\n\r\ncut short":
        "the body ends without the closing boundary",
    b"--b\r\nContent-Disposition: form-data; name=a\r\n\r\ndata\r\n--b":
        "a boundary line is malformed or the body ends there",
    b"no boundary at all": "the body has no opening boundary",
    b"--b\r\nContent-Disposition: form-data; name=a": "the headers of part 1 do not end",
    b"--b\r\nnot a header\r\n\r\nx\r\n--b--": "part 1 has a malformed header line: not a header",
    b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n--b--": "part 1 has no Content-Disposition",
    b"--b\r\nContent-Disposition: attachment; name=a\r\n\r\nx\r\n--b--":
        "part 1 is not Content-Disposition: form-data",
    b"--b\r\nContent-Disposition: form-data; filename=a\r\n\r\nx\r\n--b--":
        "part 1 has no field name",
    b"--b\r\nContent-Disposition: form-data; name\r\n\r\nx\r\n--b--":
        "part 1 has a malformed Content-Disposition",
    b"--b\r\nContent-Disposition: form-data; name=a\r\n\r\nx\r\n--bad\r\n--b--":
        "a boundary line is malformed",
}

MALFORMED_CONTENT_TYPES = {
    b"multipart/form-data": "the content type has no boundary parameter",
    b"multipart/form-data; boundary=": "the boundary must have 1 to 70 characters",
    b'multipart/form-data; boundary=""': "the boundary must have 1 to 70 characters",
    b"multipart/form-data; boundary=" + b"x" * 71: "the boundary must have 1 to 70 characters",
    b"application/x-www-form-urlencoded; boundary=b":
        "the content type is not multipart/form-data: application/x-www-form-urlencoded",
    b"multipart/mixed; boundary=b": "the content type is not multipart/form-data",
}


@pytest.mark.parametrize("lua", RUNTIMES)
def test_malformed_multipart_is_a_catchable_error(make_lua_site, lua):
    web = make_lua_site(lua)
    page = web.script(MULTIPART_SCRIPT)
    good = b"--b\r\nContent-Disposition: form-data; name=a\r\n\r\nx\r\n--b--"
    cases = [(body, b"multipart/form-data; boundary=b", message)
             for body, message in MALFORMED_MULTIPART.items()]
    cases += [(good, content_type, message)
              for content_type, message in MALFORMED_CONTENT_TYPES.items()]
    for number, (body, content_type, message) in enumerate(cases):
        output = web.serve(page, {b"CONTENT_TYPE": content_type}, body)
        assert f"error: parse_multipart: {message}".encode() in output, body
        # the same state (its request count goes on) serves a good request right after
        output = web.serve(page, {b"CONTENT_TYPE": b"multipart/form-data; boundary=b"}, good)
        assert b"\r\nX-Served: %d\r\n" % (2 * number + 2) in output
        assert output.endswith(b"\r\n\r\na|-|-|x\n")


@pytest.mark.parametrize("lua", RUNTIMES)
def test_cookies(make_lua_site, lua):
    run_checks(make_lua_site(lua), """
        local jar = luafcgid.parse_cookies(' sid=abc; theme="dark blue" ;sid=second; flag; e=a=b')
        check(jar.sid == "abc", "the first of a repeated name wins")
        check(jar.theme == "dark blue" and jar.flag == "" and jar.e == "a=b", "values")
        check(next(luafcgid.parse_cookies(nil)) == nil and next(luafcgid.parse_cookies("")) == nil,
              "no cookies")
        local c = luafcgid.cookie("sid", "abc", {path = "/", domain = "example.org",
            max_age = 3600, expires = 784111777, secure = true, httponly = true,
            samesite = "Strict"})
        check(c == "sid=abc; Path=/; Domain=example.org; Max-Age=3600; "
            .. "Expires=Sun, 06 Nov 1994 08:49:37 GMT; Secure; HttpOnly; SameSite=Strict", c)
        check(luafcgid.cookie("n", 5) == "n=5", "a number value, no options")
        check(luafcgid.cookie("n", "", {expires = "Thu, 01 Jan 1970 00:00:00 GMT",
            secure = false, samesite = "None"})
            == "n=; Expires=Thu, 01 Jan 1970 00:00:00 GMT; SameSite=None", "string expires")
        fails('samesite must be "Strict", "Lax" or "None", got strict',
              luafcgid.cookie, "a", "b", {samesite = "strict"})
        fails("the value must not contain control characters or ';'", luafcgid.cookie, "a", "b;c")
        fails("the value must not contain", luafcgid.cookie, "a", "b\\r\\nX-Evil: 1")
        fails("path must not contain", luafcgid.cookie, "a", "b", {path = "/\\n"})
        fails("domain must not contain", luafcgid.cookie, "a", "b", {domain = "x;y"})
        fails("expires must not contain", luafcgid.cookie, "a", "b", {expires = "x\\r"})
        fails("is not a valid cookie name", luafcgid.cookie, "a;b", "c")
        fails("is not a valid cookie name", luafcgid.cookie, "a\\n", "c")
        fails("is not a valid cookie name", luafcgid.cookie, "", "c")
        fails("max_age must be a whole number", luafcgid.cookie, "a", "b", {max_age = "1"})
        fails("unknown option 'maxage'", luafcgid.cookie, "a", "b", {maxage = 1})
        fails("cookie expects a string, got nil", luafcgid.cookie, "a")
        fails("parse_cookies expects a string, got table", luafcgid.parse_cookies, {})
    """)


@pytest.mark.parametrize("lua", RUNTIMES)
def test_json_encode(make_lua_site, lua):
    run_checks(make_lua_site(lua), """
        local null = luafcgid.json_null
        local enc = luafcgid.json_encode
        check(enc({1, "two", true, false, null}) == '[1,"two",true,false,null]', "array")
        check(enc({b = 1, a = {c = 2.5}, [3] = "x"}) == '{"3":"x","a":{"c":2.5},"b":1}', "sorted")
        check(enc({}) == "{}" and enc({[2] = 1}) == '{"2":1}', "empty and sparse: objects")
        check(enc(3) == "3" and enc(3.0) == "3" and enc(-0.5) == "-0.5", "numbers")
        check(enc(0.1) == "0.1" and enc(1e300) == "1e+300" and enc(1/3) == "0.33333333333333331",
              "shortest exact floats: " .. enc(1/3))
        check(enc('q"\\\\/\\b\\f\\n\\r\\t\\0\\31é') == '"q\\\\"\\\\\\\\/\\\\b\\\\f\\\\n\\\\r\\\\t'
              .. '\\\\u0000\\\\u001fé"', "escapes: " .. enc('q"\\\\/\\b\\f\\n\\r\\t\\0\\31é'))
        check(enc(nil) == "null" and enc(null) == "null" and tostring(null) == "null", "null")
        fails("NaN and infinities have no JSON form", enc, 0/0)
        fails("NaN and infinities have no JSON form", enc, {x = math.huge})
        fails("NaN and infinities have no JSON form", enc, -math.huge)
        local loop = {1} loop[2] = {loop}
        fails("the table contains itself", enc, loop)
        fails("a function has no JSON form", enc, {f = print})
        fails("a boolean key has no JSON form", enc, {[true] = 1})
        fails('two keys give the same object key "1"', enc, {[1] = "a", ["1"] = "b"})
        local deep = {}
        for _ = 1, 1001 do deep = {deep} end
        fails("tables nested deeper than 1000 levels", enc, deep)
        fails("luafcgid.json_null is read-only", function() null.x = 1 end)
    """)


@pytest.mark.parametrize("lua", RUNTIMES)
def test_json_decode(make_lua_site, lua):
    run_checks(make_lua_site(lua), r"""
        local null = luafcgid.json_null
        local dec = luafcgid.json_decode
        local v = dec(' {"a": [1, -2.5e1, 0, "x"], "b": null, "c": {}, "d": [], "e": true} ')
        check(v.a[1] == 1 and v.a[2] == -25 and v.a[3] == 0 and v.a[4] == "x", "array")
        check(v.b == null and next(v.c) == nil and next(v.d) == nil and v.e == true, "values")
        check(dec('"\\u00e9\\u20ac\\ud83d\\ude00\\"\\\\\\/\\b\\f\\n\\r\\t"')
              == "é€😀\"\\/\b\f\n\r\t", "escapes and a surrogate pair")
        check(dec("null") == null and dec(" false ") == false and dec("1E2") == 100, "scalars")
        check(dec('{"k": 1, "k": 2}').k == 2, "the last repeated key wins")
        local deep = dec(string.rep("[", 1000) .. string.rep("]", 1000))
        for _ = 1, 999 do deep = deep[1] end
        check(type(deep) == "table" and next(deep) == nil, "1000 levels decode")
        local cases = {
            [""] = "position 1: the text ends where a value is expected",
            ["   "] = "position 4: the text ends where a value is expected",
            ["[1,]"] = "position 4: a value expected",
            ["[1 2]"] = "position 4: ',' or ']' expected in an array",
            ['{"a" 1}'] = "position 6: ':' expected after an object key",
            ['{"a":1,}'] = "position 8: a string key expected in an object",
            ['{"a":1 "b":2}'] = "position 8: ',' or '}' expected in an object",
            ["{a:1}"] = "position 2: a string key expected in an object",
            ["01"] = "position 2: text after the value",
            ["1."] = "position 2: a malformed number",
            ["1.e5"] = "position 2: a malformed number",
            ["1e+"] = "position 2: a malformed number",
            ["-"] = "position 1: a malformed number",
            ["+1"] = "position 1: a value expected",
            [".5"] = "position 1: a value expected",
            ["NaN"] = "position 1: a value expected",
            ["tru"] = "position 1: a value expected",
            ["nul"] = "position 1: a value expected",
            ['"abc'] = "position 1: a string that does not end",
            ['"a\tb"'] = "position 3: a control character in a string",
            ['"\\x"'] = "position 2: an unknown escape \\x",
            ['"\\u12"'] = "position 4: \\u needs four hexadecimal digits",
            ['"\\ud83d"'] = "position 2: a high surrogate without a low one",
            ['"\\ud83d\\u0041"'] = "position 8: a high surrogate without a low one",
            ['"\\ude00"'] = "position 2: a low surrogate without a high one",
            ["[1] x"] = "position 5: text after the value",
            [string.rep("[", 1001) .. string.rep("]", 1001)]
                = "position 1001: nesting deeper than 1000 levels",
            [string.rep('{"a":', 100000)] = "position 5001: nesting deeper than 1000 levels",
        }
        for text, message in pairs(cases) do
            fails("invalid JSON at " .. message, dec, text)
        end
        fails("json_decode expects a string, got nil", dec)
    """)


JSON_ROUND_TRIP = """
    local luafcgid = require("luafcgid")
    function main(env, con)
        con:puts(luafcgid.json_encode(luafcgid.json_decode(con:gets())))
    end
"""


@pytest.mark.parametrize("lua", RUNTIMES)
def test_json_round_trips_with_python(make_lua_site, lua):
    web = make_lua_site(lua)
    page = web.script(JSON_ROUND_TRIP)
    documents = [
        {"name": "Zoë \u2028 \U0001f600", "tags": ["a", "b"], "n": None, "ok": True,
         "nested": {"list": [1, 2.5, -3e-7, 12345678901234], "deep": [[["x"]]]}},
        ["\x00\x1f\"\\/", 0.1, 1e300, False, None, {"k": "v"}],
        "just a string \ud7ff",
        42,
    ]
    for document in documents:
        for ensure_ascii in (True, False):
            text = json.dumps(document, ensure_ascii=ensure_ascii)
            output = web.serve(page, body=text.encode())
            encoded = output.split(b"\r\n\r\n", 1)[1]
            assert encoded == json.dumps(document, ensure_ascii=False, sort_keys=True,
                                         separators=(",", ":")).encode()


@pytest.mark.parametrize("lua", RUNTIMES)
def test_html_escape_and_redirect(make_lua_site, lua):
    web = make_lua_site(lua)
    run_checks(web, """
        check(luafcgid.html_escape([[<a href="x?a=1&b='2'">]])
              == "&lt;a href=&quot;x?a=1&amp;b=&#39;2&#39;&quot;&gt;", "escaped")
        check(luafcgid.html_escape("plain é") == "plain é" and luafcgid.html_escape(5) == "5",
              "unchanged")
        fails("html_escape expects a string, got nil", luafcgid.html_escape)
    """)
    page = web.script("""
        local luafcgid = require("luafcgid")
        function main(env, con)
            local url, status = env.QUERY_STRING, tonumber(env.STATUS)
            local ok, message = pcall(luafcgid.redirect, con, url, status)
            if not ok then con:puts(message) end
        end
    """, name="redirect.lua")
    assert web.serve(page, {b"QUERY_STRING": b"/next?a=1"}) == response(
        b"", b"302 Found", headers=b"Location: /next?a=1\r\n")
    assert web.serve(page, {b"QUERY_STRING": b"https://x.org/", b"STATUS": b"301"}) == response(
        b"", b"301 Moved Permanently", headers=b"Location: https://x.org/\r\n")
    assert web.serve(page, {b"QUERY_STRING": b"/a\r\nSet-Cookie: evil=1"}) == response(
        b"redirect: line breaks are not allowed in the URL")
    assert web.serve(page, {b"QUERY_STRING": b"/a", b"STATUS": b"200"}) == response(
        b"redirect: the status must be a 3xx code, got 200")


@pytest.mark.parametrize("lua", RUNTIMES)
def test_uncaught_errors_leave_the_state_serving(make_lua_site, lua):
    web = make_lua_site(lua)
    page = web.script("""
        local luafcgid = require("luafcgid")
        function main(env, con)
            served = (served or 0) + 1
            local value = luafcgid.json_decode(con:gets())
            con:puts(served .. " " .. luafcgid.json_encode(value))
        end
    """)
    for number, bad in enumerate([b"[" * 200000, b'{"a":', b'"\xff\\u'], start=1):
        with pytest.raises(ScriptError) as failure:
            web.serve(page, body=bad)
        # the error points at the script's call, not into the module
        assert "page.lua:5: invalid JSON at position" in failure.value.message
        assert web.serve(page, body=b"[1]") == response(b"%d [1]" % (2 * number))


# --- the same batteries on con --------------------------------------------------------------

CON_PAGE = """
    function main(env, con)
        local what = env.WHAT
        if what == "query" then
            local q = con:query()
            con:puts(q.a[1] .. q.a[2] .. "|" .. q.b .. "|" .. tostring(con:query() == q))
        elseif what == "form" then
            local f = con:form()
            local upload = f.upload
            if upload then
                con:puts(f.title.data .. "|" .. upload.filename .. "|" .. upload.content_type
                         .. "|" .. upload.data)
            else
                con:puts(tostring(f.x) .. "|" .. tostring(f.y and f.y[2]) .. "|"
                         .. tostring(next(f) == nil and "empty" or "fields"))
            end
        elseif what == "cookie" then
            con:cookie("theme", "dark", {path = "/", max_age = 60, httponly = true,
                                          samesite = "Lax"})
            con:cookie("lang", "fr")
            con:puts(tostring(con:cookies().sid) .. "|" .. tostring(con:cookies() == Cookies))
        elseif what == "json" then
            con:json({ok = true})
        elseif what == "escape" then
            con:puts(con:escape("<b>&"))
        elseif what == "redirect" then
            con:redirect("/login", 303)
        end
    end
"""


@pytest.mark.parametrize("lua", RUNTIMES)
def test_batteries_on_con(make_lua_site, lua):
    web = make_lua_site(lua)
    page = web.script(CON_PAGE)

    def serve(what: bytes, params: Optional[dict] = None, body: bytes = b"") -> bytes:
        return web.serve(page, {b"WHAT": what, **(params or {})}, body=body)

    assert serve(b"query", {b"QUERY_STRING": b"a=1&b=x%20y&a=2"}) == response(b"12|x y|true")
    urlencoded = {b"CONTENT_TYPE": b"application/x-www-form-urlencoded; charset=UTF-8"}
    assert serve(b"form", urlencoded, b"x=1+2&y=a&y=b") == response(b"1 2|b|fields")
    assert serve(b"form", {b"CONTENT_TYPE": b"text/plain"}, b"x=1") == response(
        b"nil|nil|empty")
    boundary = b"XyZ"
    multipart = (b"--XyZ\r\nContent-Disposition: form-data; name=\"title\"\r\n\r\nHi\r\n"
                 b"--XyZ\r\nContent-Disposition: form-data; name=\"upload\"; "
                 b"filename=\"a.txt\"\r\nContent-Type: text/plain\r\n\r\nline1\r\nline2\r\n"
                 b"--XyZ--\r\n")
    assert serve(b"form", {b"CONTENT_TYPE": b"multipart/form-data; boundary=" + boundary},
                 multipart) == response(b"Hi|a.txt|text/plain|line1\r\nline2")
    assert serve(b"cookie", {b"HTTP_COOKIE": b"sid=abc; x=1"}) == response(
        b"abc|true", headers=b"Set-Cookie: theme=dark; Path=/; Max-Age=60; HttpOnly; "
        b"SameSite=Lax\r\nSet-Cookie: lang=fr\r\n")
    assert serve(b"json") == response(b'{"ok":true}', content_type=b"application/json")
    assert serve(b"escape") == response(b"&lt;b&gt;&amp;")
    assert serve(b"redirect") == response(b"", b"303 See Other", headers=b"Location: /login\r\n")
    # a bad multipart body is a Lua error at the script's line; the state serves on
    with pytest.raises(ScriptError) as failure:
        serve(b"form", {b"CONTENT_TYPE": b"multipart/form-data; boundary=nope"}, multipart)
    assert "page.lua:" in failure.value.message and "multipart" in failure.value.message
    assert serve(b"escape") == response(b"&lt;b&gt;&amp;")
