"""The compiled speed-ups (setup.py: luafcgid/_speedups.c, luafcgid/lua/speedups.c) against
the pure paths: the same output and the same errors, and a worker that says which path it runs.

Both paths run here on every machine that can build the speed-ups; where they were not
built (no C compiler at install) the compiled side is skipped with that reason."""

from __future__ import annotations

import importlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Callable, List, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from luafcgid import protocol
from luafcgid.lua import runtime
from tests.support import (
    LUA_BUSY,
    Server,
    fcgi_call,
    wait_until,
    workers_of,
    write_config,
    write_scripts,
)

PUC_RUNTIMES = sorted(runtime.FAST_FORMAT)
BENCH_PAGE = Path(__file__).resolve().parent.parent / "scripts" / "bench_lua" / "page.lua"


def need_lua_speedups(name: str) -> str:
    path = runtime.lua_speedups_built(name)
    if path is None:
        pytest.skip(f"the Lua speed-ups for Lua {name} are not built (no C compiler "
                    "when luafcgid was installed): only the pure path runs here")
    return path


def compiled_protocol() -> ModuleType:
    try:
        return importlib.import_module("luafcgid._speedups")
    except ImportError:
        pytest.skip("the compiled PARAMS decoder is not built (no C compiler when luafcgid "
                    "was installed): only the pure path runs here")


# --- PARAMS: the same pairs, or the same error, as the Python decoder -----------------------------

LENGTHS = st.one_of(st.integers(0, 127), st.integers(128, 300), st.integers(0, 2**31 - 1))


@st.composite
def pair_streams(draw: st.DrawFn) -> Tuple[bytes, int, int]:
    """Well-formed pairs, then maybe garbage or a cut, inside a larger buffer."""
    pairs = draw(st.lists(st.tuples(st.binary(max_size=200), st.binary(max_size=300)),
                          max_size=12))
    data = protocol.encode_pairs(pairs)
    if draw(st.booleans()):
        data += draw(st.binary(max_size=12))
    if draw(st.booleans()):
        length = draw(LENGTHS)
        data += bytes([draw(st.integers(0, 255))]) + length.to_bytes(4, "big")
    before, after = draw(st.binary(max_size=9)), draw(st.binary(max_size=9))
    end = len(before) + draw(st.integers(0, len(data)))
    return before + data + after, len(before), end


@settings(max_examples=1500, deadline=None)
@given(pair_streams())
def test_compiled_params_decoder_answers_as_the_python_one(
        stream: Tuple[bytes, int, int]) -> None:
    """The same dict for every stream, or the same ProtocolError message (truncated pairs,
    lengths past the end, 4-byte lengths, a buffer that goes on past ``end``)."""
    compiled = compiled_protocol().decode_pairs
    data, pos, end = stream

    def answer(decode: Callable[[bytes, int, int], dict]) -> object:
        try:
            return decode(data, pos, end)
        except (protocol.ProtocolError, ValueError) as error:
            return ("error", str(error))

    assert answer(compiled) == answer(protocol._python_decode_pairs)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 65535), st.one_of(st.binary(max_size=300),
                                        st.integers(0, 3 * 65535 + 9).map(lambda n: b"x" * n)))
def test_compiled_response_framing_gives_the_python_bytes(request_id: int, data: bytes) -> None:
    """Every length (empty, under and over one record, padding 0-7, several records)."""
    compiled = compiled_protocol().response_records
    assert compiled(request_id, data) == protocol._python_response_records(request_id, data)
    assert compiled(request_id, memoryview(data)) == compiled(request_id, data)


# --- a whole request in one input: the same events as the record-by-record reader ------------

CONTENT_LENGTHS = st.sampled_from([b"", b"0", b"5", b"12", b"99999999999999999999", b" 12",
                                   b"+3", b"abc", b"1_0"])


@st.composite
def inputs(draw: st.DrawFn) -> bytes:
    """Mostly one well-formed request; sometimes another role, id 0, params or body over
    several records, a second request or an empty DATA record behind it, a cut, garbage."""
    request_id = draw(st.sampled_from([1, 1, 2, 0]))
    params = draw(st.dictionaries(st.binary(min_size=1, max_size=20), st.binary(max_size=40),
                                  max_size=6))
    if draw(st.booleans()):
        params[b"CONTENT_LENGTH"] = draw(CONTENT_LENGTHS)
    pairs = protocol.encode_pairs(params.items())
    body = draw(st.binary(max_size=40))
    role = draw(st.sampled_from([protocol.RESPONDER] * 4 + [protocol.AUTHORIZER]))
    data = (protocol.begin_request(request_id, draw(st.booleans()), role)
            + protocol.stream_records(protocol.PARAMS, request_id, pairs,
                                      draw(st.sampled_from([65535, 65535, 7])))
            + protocol.stream_records(protocol.STDIN, request_id, body,
                                      draw(st.sampled_from([65535, 65535, 5]))))
    tail = draw(st.sampled_from(["", "", "", "", "data", "again", "cut", "garbage"]))
    if tail == "data":
        data += protocol.encode_record(protocol.DATA, request_id)
    elif tail == "again":
        data += protocol.request_records(1, {b"N": b"2"}, b"x")
    elif tail == "cut":
        data = data[:draw(st.integers(0, len(data)))]
    elif tail == "garbage":
        data += draw(st.binary(min_size=1, max_size=16))
    return data


def events_of(data: bytes, maxpost: int, max_params: int) -> list:
    """What a fresh connection makes of ``data`` and then of one more request: each event
    with the raw params a Request carries (equality leaves them out), or the error."""
    connection = protocol.Connection(16, 4, maxpost, max_params)
    answers = []
    for chunk in (data, protocol.request_records(3, {b"A": b"B"}, b"z")):
        try:
            events = connection.receive(chunk)
        except protocol.ProtocolError as error:
            answers.append(("error", str(error)))
            break
        answers += [(event, getattr(event, "raw_params", None)) for event in events]
    return answers


@settings(max_examples=1500, deadline=None)
@given(inputs(), st.sampled_from([0, 3, 40, 2**62, 2**62]), st.sampled_from([5, 64, 2**20, 2**20]))
def test_a_whole_request_read_in_one_call_is_read_as_record_by_record(
        data: bytes, maxpost: int, max_params: int) -> None:
    """The compiled reader takes one whole simple request and declines the rest: either
    way the events, the raw params, the errors and the next request are the Python ones."""
    compiled_protocol()
    fast = events_of(data, maxpost, max_params)
    saved = protocol._compiled_whole_request
    protocol._compiled_whole_request = None
    try:
        pure = events_of(data, maxpost, max_params)
    finally:
        protocol._compiled_whole_request = saved
    assert fast == pure


# --- the same answers as Lua's own string.format ------------------------------------------------

FLAGS = "-+ #0"
CONVERSIONS = "sdfgGeExXoicqaAu%zs dd"  # weighted towards the fast ones; z is invalid
ARGUMENTS = [
    "0", "1", "-1", "42", "2147483648", "9007199254740992", "9007199254740993",
    "-9223372036854775807 - 1", "0.0", "-0.0", "3.14159", "2.5", "3.0", "1e300", "1e-300",
    "1/0", "-1/0", "0/0", "2^63", '""', '"x"', '"hello, world"', '"12"', '"0x10"', '"3.5"',
    '"a\\0b"', '("y"):rep(150)', '"%d"', "nil", "true", "{}", "print",
    'setmetatable({}, {__tostring = function() return "T" end})',
]


def lua_string(text: str) -> str:
    """A Lua string literal of ``text`` that every Lua version reads the same."""
    return '"' + "".join(c if c.isalnum() or c in " .,:;|<>=" else f"\\{ord(c):03d}"
                         for c in text) + '"'


def random_spec(rng: random.Random) -> str:
    spec = "%" + "".join(rng.choice(FLAGS) for _ in range(rng.choice((0, 0, 0, 1, 2, 6))))
    spec += rng.choice(("", "", "", "5", "12", "123", "0"))
    spec += rng.choice(("", "", "", ".2", ".0", ".", ".123", ".14"))
    return spec + rng.choice(CONVERSIONS)


def random_cases(seed: int, count: int) -> List[str]:
    """Argument lists for string.format: a format of text and conversions, and arguments
    (sometimes too few) of every type."""
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        pieces = []
        for _ in range(rng.randint(0, 4)):
            pieces.append(rng.choice(("", "<td>", "a b", "\n", "%%", "x")))
            pieces.append("%s" if rng.random() < 0.3 else "%d" if rng.random() < 0.3
                          else random_spec(rng))
        if rng.random() < 0.05:
            pieces.append("%")  # a format ending in a lone %
        arguments = [rng.choice(ARGUMENTS) for _ in range(rng.randint(0, 5))]
        cases.append(", ".join([lua_string("".join(pieces))] + arguments))
    cases += [lua_string("%d|%s|%.2f") + ", 1, 'a', 2", lua_string("%5.1f %-3d") + ", 1, 2"]
    return cases


COMPARE = r"""
import json, re, sys
from luafcgid.lua import runtime
name, path, cases = sys.argv[1], sys.argv[2], json.load(sys.stdin)
runtime.link_globally(name)
lua = runtime.module(name)

def results(fast):
    state = lua.LuaRuntime(encoding=None)
    if fast:
        state.execute(b"string.format = assert(package.loadlib(...))(string.format)",
                      path.encode(), b"luaopen_luafcgid_fastformat")
    run = state.eval(b"function(case) local chunk = assert((loadstring or load)("
                     b"'return string.format(' .. case .. ')', '=case')) "
                     b"return {pcall(chunk)} end")
    out = []
    for case in cases:
        result = run(case.encode())
        # a table's or function's address differs from state to state
        out.append([re.sub(r"0x[0-9a-f]+", "0x...", repr(value))
                    for value in (result[1], result[2])])
    return out

print(json.dumps({"fast": results(True), "own": results(False)}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("name", PUC_RUNTIMES)
def test_fastformat_answers_as_lua_own_string_format(name: str) -> None:
    """Thousands of random formats and arguments (every conversion, flags, widths,
    precisions, too few arguments, every argument type): the compiled string.format and
    Lua's own give the same string, or raise the same message."""
    path = need_lua_speedups(name)
    cases = random_cases(seed=17, count=3000)
    done = subprocess.run([sys.executable, "-c", COMPARE, name, path], input=json.dumps(cases),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    answers = json.loads(done.stdout)
    differ = [(case, fast, own) for case, fast, own in
              zip(cases, answers["fast"], answers["own"]) if fast != own]
    assert len(answers["fast"]) == len(cases)
    assert differ == []
    outcomes = {own[0] for own in answers["own"]}
    assert outcomes == {"True", "False"}  # both answers and errors were compared


# --- a worker says which path it runs, and both serve the same page -------------------------------


ENV_SCRIPT = """
function main(env, con)
    local names = {}
    for name in pairs(env) do names[#names + 1] = name end
    table.sort(names)
    for _, name in ipairs(names) do con:puts(name .. "=" .. env[name] .. "\\n") end
end
"""
# What hook the handler runs under: none with the compiled watchdog (until a deadline), a
# count hook (mask "", count 1000) on the pure path.
HOOK_SCRIPT = """
function main(env, con)
    local hook, mask, count = debug.gethook()
    con:puts(type(hook) .. " " .. tostring(mask) .. " " .. tostring(count))
end
"""
# Lengths on both sides of 127 (one-byte and four-byte lengths), empty and binary values.
ODD_PARAMS = {"HTTP_X_" + "N" * 200: "v" * 300, "HTTP_X_EMPTY": "", "HTTP_X_BYTES": "\x01\x7f\xff",
              "QUERY_STRING": "a=1&b=%20"}


def serve_page(tmp_path: Path, name: str, pure: bool, monkeypatch: pytest.MonkeyPatch):
    docroot = write_scripts(tmp_path / "www", {
        "page.lua": BENCH_PAGE.read_text(),
        "bad.lua": 'function main(env, con) con:puts(string.format("%d", "x")) end',
        "env.lua": ENV_SCRIPT,
        "hook.lua": HOOK_SCRIPT,
    })
    listen = str(tmp_path / "fcgi.sock")
    config = write_config(tmp_path / "config.lua", listen=listen, lua=name, processes=1,
                          pidfile=str(tmp_path / "luafcgid.pid"), user="root")
    if pure:
        monkeypatch.setenv(runtime.PURE_VARIABLE, "1")
    else:
        monkeypatch.delenv(runtime.PURE_VARIABLE, raising=False)
    server = Server(config, listen).start()
    try:
        params = {"SCRIPT_FILENAME": str(docroot / "page.lua"), "REQUEST_METHOD": "GET"}
        page = fcgi_call(listen, params)
        params["SCRIPT_FILENAME"] = str(docroot / "bad.lua")
        bad = fcgi_call(listen, params)
        params.update(ODD_PARAMS, SCRIPT_FILENAME=str(docroot / "env.lua"))
        env = fcgi_call(listen, params)
        params["SCRIPT_FILENAME"] = str(docroot / "hook.lua")
        hook = fcgi_call(listen, params)
        (worker,) = workers_of(server.pid)
        maps = Path(f"/proc/{worker}/maps").read_text()
        wait_until(lambda: "bad.lua" in server.output(), what="the error's log line")
        return page, bad, maps, server.output(), env, hook
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["5.4", "5.1"])
def test_worker_runs_the_compiled_path_and_the_pure_one_alike(
        tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The start log names the path; a worker maps the speed-up only on the compiled path;
    the page's bytes and a format error's log line are the same on both."""
    path = need_lua_speedups(name)
    fast = serve_page(tmp_path / "fast", name, False, monkeypatch)
    pure = serve_page(tmp_path / "pure", name, True, monkeypatch)
    assert (f"compiled speed-ups: PARAMS decoding, PARAMS into Lua, string.format for Lua {name}"
            in fast[3])
    assert "compiled speed-ups: off (LUAFCGID_PURE is set)" in pure[3]
    for built in (path, compiled_protocol().__file__):
        assert os.path.basename(built) in fast[2]
        assert os.path.basename(built) not in pure[2]
    assert fast[0] == pure[0] and b"Grace Hopper" in fast[0] and fast[0].startswith(b"Status: 200")
    assert fast[1].startswith(b"Status: 500") and pure[1].startswith(b"Status: 500")
    # the same env, but for the two sites' own directories
    assert fast[4].replace(b"/fast/", b"/pure/") == pure[4]
    assert ("HTTP_X_" + "N" * 200 + "=" + "v" * 300).encode() in fast[4]
    assert b"HTTP_X_EMPTY=\n" in fast[4]
    assert fast[5].split(b"\r\n\r\n")[1] in (b"nil nil nil", b"nil  0")  # 5.4, 5.1: no hook
    assert pure[5].endswith(b"\r\n\r\nfunction  1000")
    message = "bad.lua:1: bad argument #2 to 'format' (number expected, got string)"
    assert message in fast[3] and message in pure[3]


@pytest.mark.slow
def test_luajit_keeps_its_own_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """LuaJIT's string.format is compiled by its JIT: the start log says none is used."""
    fast = serve_page(tmp_path, "luajit", False, monkeypatch)
    assert ("compiled speed-ups: PARAMS decoding, PARAMS into Lua (lua = 'luajit' keeps its "
            "own string.format)") in fast[3]
    assert b"Grace Hopper" in fast[0]


# --- the compiled watchdog: the slow log, then the timeout, in a worker --------------------------

SLOW_THEN_STUCK = LUA_BUSY + """
function main(env, con)
  busy(0.3)
  if env.QUERY_STRING == "forever" then
    while true do end
  end
  con:puts("done")
end
"""


@pytest.mark.slow
@pytest.mark.parametrize("name", ["5.4", "5.1"])
def test_compiled_watchdog_logs_slow_requests_then_stops_runaways(tmp_path: Path,
                                                                   name: str) -> None:
    """Under the compiled watchdog a slow request gets its slow-log entry at
    slowlog_timeout and completes (the watch is armed again for the timeout); a runaway
    gets its entry, then its 500 at timeout; the worker serves on."""
    need_lua_speedups(name)
    docroot = write_scripts(tmp_path / "www", {"slow.lua": SLOW_THEN_STUCK})
    listen = str(tmp_path / "fcgi.sock")
    slow_log = tmp_path / "slow.log"
    config = write_config(tmp_path / "config.lua", listen=listen, lua=name, processes=1,
                          pidfile=str(tmp_path / "luafcgid.pid"), user="root", timeout=1,
                          slowlog=str(slow_log), slowlog_timeout=0.1)
    server = Server(config, listen).start()
    try:
        params = {"SCRIPT_FILENAME": str(docroot / "slow.lua"), "REQUEST_METHOD": "GET",
                  "REQUEST_URI": "/slow.lua"}
        assert fcgi_call(listen, params).endswith(b"done")
        (worker,) = workers_of(server.pid)
        began = time.monotonic()
        stuck = fcgi_call(listen, {**params, "QUERY_STRING": "forever",
                                   "REQUEST_URI": "/slow.lua?forever"})
        took = time.monotonic() - began
        assert stuck.startswith(b"Status: 500") and 1.0 <= took < 3.0, (stuck, took)
        assert fcgi_call(listen, params).endswith(b"done")
        assert workers_of(server.pid) == {worker}
        entries = slow_log.read_text().count("slow request: script")
        assert entries == 3, slow_log.read_text()  # one per request, the runaway's included
        assert "uri /slow.lua?forever, running for 0.1" in slow_log.read_text()
        assert "slow.lua:3: in " in slow_log.read_text()  # busy(), running at 0.1 s
        wait_until(lambda: "timeout: the handler ran for 1." in server.output(),
                   what="the timeout's log line")
        assert "compiled speed-ups" in server.output()
    finally:
        server.stop()
