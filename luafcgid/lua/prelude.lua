--[[
The Lua side of one luafcgid state (state.py runs this file once per new state).

It takes one table of options, makes the state safe (no way back into Python, no
os.exit), sets the module search paths, records every Lua file the state loads so
the cache can see it change, defines `con` and the luafcgid2 globals, runs the
startup script and the script's top level, and returns `true, run`, or
`false, message, traceback` when loading failed.

`run(env, body, thread, started)` serves one request (`started`: the wall clock at its
start): the whole per-request logic lives here so that a request is a single call from
Python. It returns the CGI output still to send as one string, or
`false, message, traceback` when the handler failed, with a fourth value, the seconds
run, when the watchdog stopped it (`timeout`). The traceback is nil only for a memory
error: Lua does not call the message handler then.
]]

local options = ...

local G = _G
local type, tostring, tonumber, error, xpcall, rawset = type, tostring, tonumber, error, xpcall, rawset
local pairs, next, rawget, setmetatable = pairs, next, rawget, setmetatable
local concat = table.concat
local traceback, getinfo = debug.traceback, debug.getinfo
local floor = math.floor
local loadfile = loadfile
local io_open = io.open

local script = options.script
local handler_name = options.handler
local default_status = options.status
local default_content_type = options.content_type
local default_headers = options.headers
local buffering = options.buffering
local responses = options.responses
local config_values = options.config
local outlet = options.outlet        -- Python: sends output early, returns false once the client is gone
local log_line = options.log         -- Python: one line to the error log, tagged with the script
local warn_line = options.warn       -- Python: the same as a warning
local note_file = options.note       -- Python: stat a Lua file about to be loaded
local thread_data = options.thread_data  -- Python: script, count, script, count, ...
local clock = options.clock          -- Python: the wall clock, seconds (float)
local report_slow = options.slow     -- Python: (uri, elapsed, traceback) to the slow log

-- Scripts must not reach Python: lupa's `python` module goes.
python = nil
package.loaded.python = nil

-- The compiled speed-ups (runtime.py, speedups.c): string.format in place before any
-- script code takes its own local copy of it, and the PARAMS decoder run() uses.
local function open_speedup(name)
    local loaded, message = package.loadlib(options.speedups, "luaopen_luafcgid_" .. name)
    if not loaded then  -- the worker opened the library already: not expected
        error("the compiled speed-ups did not load: " .. tostring(message), 0)
    end
    return loaded
end
local decode_params
if options.speedups then
    if options.fast_format then
        string.format = open_speedup("fastformat")(string.format)
    end
    decode_params = open_speedup("params")()
end

-- A script can never end its worker.
os.exit = function()
    error("os.exit is disabled in luafcgid", 2)
end

-- Package paths (runtime.py): the script's directory, the document root, its lua_modules
-- tree, then lua_path / lua_cpath or the defaults; never "./".
package.path = options.package_path
package.cpath = options.package_cpath
if options.no_c_modules then
    local searchers = package.searchers or package.loaders
    -- Lua 5.4 prefixes each searcher's message itself; earlier versions expect "\n\t".
    local prefix = (_VERSION == "Lua 5.4" or _VERSION == "Lua 5.5") and "" or "\n\t"
    local function refuse()
        return prefix .. options.no_c_modules
    end
    searchers[3], searchers[4] = refuse, nil
    package.loadlib = nil
end

-- Lua 5.1 has no package.searchpath; this one answers as 5.1's own searcher would.
local function searchpath_51(name, path)
    local file_name = name:gsub("%.", "/")
    local tried = {}
    for template in path:gmatch("[^;]+") do
        local file = template:gsub("%?", file_name)
        local handle = io_open(file, "rb")
        if handle then
            handle:close()
            return file
        end
        tried[#tried + 1] = "\n\tno file '" .. file .. "'"
    end
    return nil, concat(tried)
end

local searchpath = package.searchpath or searchpath_51

-- The Lua file searcher, replaced so that every module file loaded is recorded.
local searchers = package.searchers or package.loaders
searchers[2] = function(name)
    local file, message = searchpath(name, package.path)
    if not file then
        return message
    end
    note_file(file)
    local chunk, failure = loadfile(file)
    if not chunk then
        error("error loading module '" .. name .. "' from file '" .. file .. "':\n\t" .. failure, 0)
    end
    return chunk, file
end

-- The helper module, precompiled once per worker (state.py): every state loads it for `lf`.
local luafcgid_chunk = options.luafcgid_chunk
local module_source  -- its chunk name: a warning about a late header skips its frames
package.preload.luafcgid = function(...)
    local chunk = assert((loadstring or load)(luafcgid_chunk))
    module_source = getinfo(chunk, "S").source
    return chunk(...)
end

-- Relative file names: luafcgid chdir()ed to the script's directory before each request
-- (main.c:296-303), so io.open("data.txt"), dofile("inc.lua") and loadfile saw that
-- directory. One process serves many scripts on many threads and has one working
-- directory: instead the functions that take a file name join a relative one to the
-- script's directory here, in Lua (no call into Python per use). Absolute names, file
-- handles and nil (stdin, the default file) pass through untouched.

local script_dir_prefix = options.dir .. "/"

local function in_script_dir(name)
    if type(name) == "string" and name ~= "" and name:byte(1) ~= 47 then  -- 47: "/"
        return script_dir_prefix .. name
    end
    return name
end

-- Each wrapper calls the original through an upvalue of the original's name: Lua's
-- "bad argument #1 to 'open'" errors take the name from there.
do
    local open, lines, input, output = io.open, io.lines, io.input, io.output
    io.open = function(name, ...) return open(in_script_dir(name), ...) end
    io.lines = function(name, ...) return lines(in_script_dir(name), ...) end
    io.input = function(file) return input(in_script_dir(file)) end
    io.output = function(file) return output(in_script_dir(file)) end
end
do
    local dofile, loadfile = dofile, loadfile
    G.dofile = function(name) return dofile(in_script_dir(name)) end
    G.loadfile = function(name, ...) return loadfile(in_script_dir(name), ...) end
end
do
    local remove, rename = os.remove, os.rename
    os.remove = function(name) return remove(in_script_dir(name)) end
    os.rename = function(from, to) return rename(in_script_dir(from), in_script_dir(to)) end
end

-- Per-request response state.

local body, body_count = {}, 0            -- buffered body pieces
local headers, header_count = {}, 0       -- the script's header lines
local status, content_type = default_status, default_content_type
local head_sent = false                   -- the head went out: the response streams
local streaming = not buffering           -- con:puts sends at once
local request_body = nil                  -- nil outside a request
local body_unread = false                 -- con:gets()/Receive() have not read it yet
local elapsed_header = options.elapsed_header  -- luafcgid2's X-ElapsedTime on each answer
local request_started = 0                 -- the wall clock at the request's start

local default_prefix = "Status: " .. default_status .. "\r\nContent-Type: "
    .. default_content_type .. "\r\n" .. default_headers

local function clear(list, count)
    for i = 1, count do
        list[i] = nil
    end
end

local function take_body()
    local count = body_count
    if count == 0 then
        return ""
    end
    local data = count == 1 and body[1] or concat(body, "", 1, count)
    clear(body, count)
    body_count = 0
    return data
end

-- The head up to the script's headers (no blank line).
local session_cookie  -- session.lua: the Set-Cookie value this request needs, or nil

-- luafcgid2 sent X-ElapsedTime, the milliseconds the request took so far, between the
-- content type and the default headers (statepool.cpp:321-339).
local function elapsed_start()
    return "Status: " .. status .. "\r\nContent-Type: " .. content_type .. "\r\nX-ElapsedTime: "
        .. floor((clock() - request_started) * 1000) .. "\r\n" .. default_headers
end

local function head()
    local start = default_prefix
    if elapsed_header then
        start = elapsed_start()
    elseif status ~= default_status or content_type ~= default_content_type then
        start = "Status: " .. status .. "\r\nContent-Type: " .. content_type .. "\r\n" .. default_headers
    end
    local cookie = session_cookie()
    if cookie then
        header_count = header_count + 1
        headers[header_count] = "Set-Cookie: " .. cookie .. "\r\n"
    end
    local count = header_count
    if count == 0 then
        return start
    end
    local lines = concat(headers, "", 1, count)
    clear(headers, count)
    header_count = 0
    return start .. lines
end

local function send(data)
    if request_body == nil then
        error("no request is being served: output is sent only while the handler runs", 0)
    end
    if not outlet(data) then
        error("the client connection is closed", 0)
    end
end

-- A string argument; numbers are converted, anything else is an error of the caller's caller.
local function text(value, where)
    local kind = type(value)
    if kind == "number" then
        return tostring(value)
    end
    if kind ~= "string" then
        error(where .. " expects a string or a number, got " .. kind, 3)
    end
    return value
end

local function one_line(value, where)
    if value:find("[\r\n]") then
        error(where .. ": line breaks are not allowed in a response head", 3)
    end
    return value
end

-- A header, status or content type set once the head went out cannot reach the client.
-- The originals dropped it and the page went on (luafcgid's con:header only appends to a
-- buffer that was sent once, request.c:49-69); so do we, and warn once per line of the
-- script in each state, so that a page served a million times logs one line, not a million.

local prelude_source = getinfo(1, "S").source
local warned_lines, warned_count = {}, 0

-- "line N" of the script code that called into us (not this file, not the module), or
-- "file:N" in a module the script required.
local function script_line()
    local level = 3
    while true do
        local info = getinfo(level, "Sl")
        if not info then
            return "?"
        end
        if info.currentline > 0 and info.source ~= prelude_source
            and info.source ~= module_source then
            local file = info.source:match("^@(.*)") or info.short_src
            if file == script then
                return "line " .. info.currentline
            end
            return file .. ":" .. info.currentline
        end
        level = level + 1
    end
end

-- True when the head was sent: the caller drops what it was setting.
local function too_late(what)
    if not head_sent then
        return false
    end
    local line = script_line()
    if not warned_lines[line] and warned_count < 100 then
        warned_lines[line], warned_count = true, warned_count + 1
        warn_line(line .. ": " .. what .. " ignored: the head was already sent (the response "
            .. "streams after con:flush(), or from the first output with buffering = false); "
            .. "set headers and the status before that")
    end
    return true
end

local function puts(_, s)
    if type(s) ~= "string" then
        s = text(s, "con:puts")
    end
    if not streaming then
        body_count = body_count + 1
        body[body_count] = s
    elseif head_sent then
        if s ~= "" then
            send(s)
        end
    else
        head_sent = true
        send(head() .. "\r\n" .. s)
    end
end

local function flush()
    local data = take_body()
    streaming = true
    if not head_sent then
        head_sent = true
        send(head() .. "\r\n" .. data)
    elseif data ~= "" then
        send(data)
    end
end

local function set_status(_, code)
    if type(code) == "number" or (type(code) == "string" and code:find("^%d+$")) then
        code = responses[tonumber(code)] or tostring(code)
    elseif type(code) ~= "string" then
        error("con:status expects a status code or a status line, got " .. type(code), 2)
    end
    code = one_line(code, "con:status")
    if too_late('con:status("' .. code .. '")') then
        return
    end
    status = code
end

local function set_content_type(value)
    value = one_line(text(value, "RespContentType"), "RespContentType")
    if too_late('RespContentType("' .. value .. '")') then
        return
    end
    content_type = value
end

-- Header names already checked → their lower case: scripts set the same few names on every
-- request, and the pattern check plus lower() was half of what con:header cost. Bounded, as
-- names may come from request data.
local checked_names, checked_count = {}, 0

local function header_name(name)
    local lower = checked_names[name]
    if lower then
        return lower
    end
    if not name:find("^[%w!#%$%%&'%*%+%-%.%^_`|~]+$") then
        error('con:header: "' .. name .. '" is not a valid header name', 3)
    end
    lower = name:lower()
    if checked_count < 256 then
        checked_names[name], checked_count = lower, checked_count + 1
    end
    return lower
end

local function header(_, name, value)
    if value == nil then
        local line = text(name, "con:header")
        name, value = line:match("^%s*([^:]-)%s*:%s*(.-)%s*$")
        if not name then
            error('con:header expects (name, value) or a "Name: value" line, got "' .. line .. '"', 2)
        end
    else
        name, value = text(name, "con:header"), text(value, "con:header")
    end
    local lower = header_name(name)
    one_line(value, "con:header")
    if lower == "status" then
        return set_status(nil, value)
    elseif too_late('con:header("' .. name .. '")') then
        return
    elseif lower == "content-type" then
        content_type = value
    else
        header_count = header_count + 1
        headers[header_count] = name .. ": " .. value .. "\r\n"
    end
end

-- con:reset(), as luafcgid's: the buffered body goes, nothing else (request.c:103-111).
local function reset()
    clear(body, body_count)
    body_count = 0
end

-- Reset(), as luafcgid2's: the headers not yet sent and the body go; the status and the
-- content type stay (lua_fnc.cpp:93-97).
local function reset_headers_and_body()
    reset()
    clear(headers, header_count)
    header_count = 0
end

-- con:gets(), as luafcgid's: the body is a stream read once (main.c:84-121): the first call
-- returns it, nil when there is none, and every later call nil.
local function gets()
    local data = body_unread and request_body or nil
    body_unread = false
    if data == "" then
        return nil
    end
    return data
end

-- Receive(), as luafcgid2's: the rest of the stream, "" when there is none or it was read
-- (lua_fnc.cpp:104-118). It reads the same stream as con:gets().
local function receive()
    return gets() or ""
end

local function log(_, message)
    log_line(tostring(message))
end

local function config(_, name)
    return config_values[name]
end

-- The batteries on con: require("luafcgid") does the work, loaded at the first use.

local require = require
local helpers_module
local function helpers()
    if not helpers_module then
        helpers_module = require("luafcgid")
    end
    return helpers_module
end

-- A module function called for a con method: its errors point at the script's line.
local pcall = pcall
local function battery(name, ...)
    local module = helpers()
    local ok, result = pcall(module[name], ...)
    if not ok then
        error(tostring(result):gsub("^[^\n]-:%d+: ", ""), 3)
    end
    return result
end

local request_env                       -- this request's env, for the batteries
local query_fields, form_fields, cookie_fields  -- parsed once per request, at first ask

local function query()
    if not query_fields then
        query_fields = battery("parse", request_env.QUERY_STRING or "")
    end
    return query_fields
end

-- The body as fields: urlencoded or multipart/form-data by CONTENT_TYPE; {} otherwise.
local function form()
    if not form_fields then
        local kind = (request_env.CONTENT_TYPE or ""):lower()
        if kind:find("^%s*application/x%-www%-form%-urlencoded") then
            form_fields = battery("parse", request_body or "")
        elseif kind:find("^%s*multipart/form%-data") then
            form_fields = battery("parse_multipart", request_body or "",
                request_env.CONTENT_TYPE)
        else
            form_fields = {}
        end
    end
    return form_fields
end

local function cookies()
    return cookie_fields
end

-- con:cookie(name, value, options), and the nikkiii fork's positional form
-- con:cookie(name, value, expires, path, domain), expires in os.time() seconds.
local function set_cookie(con_, name, value, cookie_options, path, domain)
    if path ~= nil or domain ~= nil or (cookie_options ~= nil and type(cookie_options) ~= "table") then
        local expires = cookie_options
        cookie_options = {expires = tonumber(expires) or expires, path = path, domain = domain}
    end
    return header(con_, "Set-Cookie", battery("cookie", name, value, cookie_options))
end

local function redirect(con_, url, code)
    return battery("redirect", con_, url, code)
end

local function json(con_, value)
    local encoded = battery("json_encode", value)
    if not head_sent then
        content_type = "application/json"
    end
    return puts(con_, encoded)
end

local function escape(_, s)
    return battery("html_escape", s)
end

local con = {
    puts = puts, header = header, status = set_status, gets = gets,
    flush = flush, reset = reset, log = log, config = config,
    query = query, form = form, cookies = cookies, cookie = set_cookie,
    redirect = redirect, json = json, escape = escape,
}

-- The luafcgid2 globals. Env, Cookies and LocalConfig are set per request, Info.Thread too.

local info = {State = options.state_number, Worker = options.worker_number, Thread = 0}
local dir = options.dir

-- luafcgid2's Response table as it was (settings.cpp:19-26): its codes, its phrases (306
-- "Switch Proxy", 413 "Payload Too Large", 418 "I'm a teapot", ...), nothing more.
-- con:status(code) takes the phrase from here too, and from Python's table otherwise.
Response = {
    [100] = "100 Continue", [101] = "101 Switching Protocols", [102] = "102 Processing",
    [103] = "103 Early Hints",
    [200] = "200 OK", [201] = "201 Created", [202] = "202 Accepted",
    [203] = "203 Non-Authoritative Information", [204] = "204 No Content",
    [205] = "205 Reset Content", [206] = "206 Partial Content", [207] = "207 Multi-Status",
    [208] = "208 Already Reported", [226] = "226 IM Used",
    [300] = "300 Multiple Choices", [301] = "301 Moved Permanently", [302] = "302 Found",
    [303] = "303 See Other", [304] = "304 Not Modified", [305] = "305 Use Proxy",
    [306] = "306 Switch Proxy", [307] = "307 Temporary Redirect",
    [308] = "308 Permanent Redirect",
    [400] = "400 Bad Request", [401] = "401 Unauthorized", [402] = "402 Payment Required",
    [403] = "403 Forbidden", [404] = "404 Not Found", [405] = "405 Method Not Allowed",
    [406] = "406 Not Acceptable", [407] = "407 Proxy Authentication Required",
    [408] = "408 Request Timeout", [409] = "409 Conflict", [410] = "410 Gone",
    [411] = "411 Length Required", [412] = "412 Precondition Failed",
    [413] = "413 Payload Too Large", [414] = "414 URI Too Long",
    [415] = "415 Unsupported Media Type", [416] = "416 Range Not Satisfiable",
    [417] = "417 Expectation Failed", [418] = "418 I'm a teapot",
    [421] = "421 Misdirected Request", [422] = "422 Unprocessable Entity",
    [423] = "423 Locked", [424] = "424 Failed Dependency", [426] = "426 Upgrade Required",
    [428] = "428 Precondition Required", [429] = "429 Too Many Requests",
    [431] = "431 Request Header Fields Too Large",
    [451] = "451 Unavailable For Legal Reasons",
    [500] = "500 Internal Server Error", [501] = "501 Not Implemented",
    [502] = "502 Bad Gateway", [503] = "503 Service Unavailable",
    [504] = "504 Gateway Timeout", [505] = "505 HTTP Version Not Supported",
    [506] = "506 Variant Also Negotiates", [507] = "507 Insufficient Storage",
    [508] = "508 Loop Detected", [510] = "510 Not Extended",
    [511] = "511 Network Authentication Required",
}
for code, line in pairs(Response) do
    responses[code] = line
end

Env, Cookies, Info = {}, {}, info
Config = options.script_config
local configs_by_host = Config  -- LocalConfig = Config[SERVER_NAME] (settings.cpp:139-150)
LUAFCGID, LUAFCGID_VERSION = true, 2  -- luafcgid2's (settings.cpp:10-11)
-- lf: luafcgid2's helpers (settings.cpp:12-17), our module's functions. Filled at its first
-- read: loading the module costs ~0.1 ms, a third of a new state, and most scripts never
-- touch lf. Until then it is a table whose first read, or pairs() (Lua 5.2+), fills it.
local function fill_lf(lf_table)
    setmetatable(lf_table, nil)
    for name, value in pairs(helpers()) do
        if rawget(lf_table, name) == nil then
            rawset(lf_table, name, value)
        end
    end
end
lf = setmetatable({}, {
    __index = function(lf_table, key)
        fill_lf(lf_table)
        return rawget(lf_table, key)
    end,
    __pairs = function(lf_table)
        fill_lf(lf_table)
        return next, lf_table, nil
    end,
})
function Send(s) return puts(con, s) end
function Header(name, value) return header(con, name, value) end
function Reset() return reset_headers_and_body() end
function Log(s) return log(con, s) end
function Receive() return receive() end
function RespStatus(s) return set_status(con, s) end
function RespContentType(s) return set_content_type(s) end
function Dir() return dir end

-- Session: luafcgid2's sessions (session.lua), stored through the Python bridge.
local session_options = options.session
session_options.can_set_cookie = function() return not head_sent end
local session_chunk = assert((loadstring or load)(options.session_chunk, "=session.lua"))
local session_begin
Session, session_begin, session_cookie = session_chunk(session_options)

function ThreadData()
    local flat, counts = {thread_data()}, {}
    for i = 1, #flat, 2 do
        counts[flat[i]] = flat[i + 1]
    end
    return counts
end

-- "a=1; b=2" → {a = "1", b = "2"}, as luafcgid2 parses HTTP_COOKIE: pairs separated by
-- ";" or ",", quoted values unquoted, a name without "=" gets "", the last one wins.
local function parse_cookies(cookie_header)
    local cookies = {}
    for pair in cookie_header:gmatch("[^;,]+") do
        local name, value = pair:match("^%s*(.-)%s*=%s*(.-)%s*$")
        if name then
            value = value:match('^"(.*)"$') or value
        else
            name, value = pair:match("^%s*(.-)%s*$"), ""
        end
        if name ~= "" then
            cookies[name] = value
        end
    end
    return cookies
end

-- Errors: the message handler keeps the traceback aside, so the message stays as it was.

local failure_traceback
local prelude_file = debug.getinfo(1, "S").short_src

-- The traceback down to the script's frames: what lies below (xpcall, this file) is noise.
local function script_frames(trace)
    local stop = trace:find("\n\t[C]: in function 'xpcall'", 1, true)
    if not stop then
        return trace
    end
    trace = trace:sub(1, stop - 1)
    local last_line = trace:match(".*()\n\t")
    if last_line and trace:find(prelude_file, last_line, true) then
        trace = trace:sub(1, last_line - 1)
    end
    return trace
end

local function on_error(message)
    failure_traceback = script_frames(traceback("", 2):sub(2))
    return message
end

-- The watchdog: a count hook on every Lua thread of the state (state.py says why this
-- design). Every `hook_count` instructions it compares os.time() (a cheap C call, whole
-- seconds) with the next deadline's second, and only within that last second asks the
-- Python clock. Past `timeout` it errors, then keeps erroring on every instruction of
-- the script (not of this file) so no pcall can swallow it; past `slowlog_timeout` it
-- hands one traceback, taken here inside the running state, to the slow log.

local sethook, os_time, huge = debug.sethook, os.time, math.huge
local format = string.format
local timeout = options.timeout
local slowlog_timeout = options.slowlog_timeout   -- nil: no slow log
local hook_count = options.hook_count
local started, deadline, slow_at, check_from = 0, huge, huge, huge
local timed_out, elapsed = false, 0
local request_uri
local timeout_message, timeout_trace

local function arm(start, uri)
    started, request_uri, timed_out = start, uri, false
    deadline = start + timeout
    slow_at = slowlog_timeout and start + slowlog_timeout or huge
    check_from = floor(deadline < slow_at and deadline or slow_at)
end

-- Between requests no deadline runs: a state idle for longer than `timeout` must not
-- find an old deadline passed in the prelude's first instructions of the next request.
local function disarm()
    deadline, slow_at, check_from = huge, huge, huge
end

-- The compiled watchdog (speedups.c): a request's main thread runs with no hook until its
-- first moment to look (slow log or timeout) has passed. Coroutines keep the count hook.
local c_arm, c_disarm, rearm
local c_armed = false  -- a request's main thread is under it (not the load: count hook)

local coroutine_running = coroutine.running
local function on_main_thread()
    local co, main = coroutine_running()
    return co == nil or main == true  -- 5.1 answers nil on the main thread
end

local function watchdog()
    if timed_out then
        if getinfo(2, "S").source ~= prelude_source then
            error(timeout_message, 0)
        end
        return
    end
    if os_time() < check_from then
        if c_armed and on_main_thread() then  -- woken early: look again later
            rearm(clock())
        end
        return
    end
    local now = clock()
    if now >= deadline then
        timed_out, elapsed = true, now - started
        timeout_message = format("timeout: the handler ran for %.3f s (timeout = %g s)",
            elapsed, timeout)
        -- Taken here: in the thread that overran (a coroutine's frames are lost once the
        -- error leaves it), without the watchdog's own frames.
        timeout_trace = script_frames(traceback("", 2):sub(2))
        sethook(watchdog, "", 1)
        error(timeout_message, 0)
    end
    if now >= slow_at then
        slow_at = huge
        check_from = floor(deadline)
        report_slow(request_uri, now - started, script_frames(traceback("", 2):sub(2)))
    end
    if c_armed and on_main_thread() then
        rearm(now)
    end
end

if options.speedups and options.fast_watchdog and hook_count > 0 then
    c_arm, c_disarm = open_speedup("watchdog")(watchdog)
end

-- No hook again until the next moment to look; the count hook if the watchdog has no room.
rearm = function(now)
    sethook()
    if deadline < huge and not c_arm((deadline < slow_at and deadline or slow_at) - now) then
        c_armed = false
        sethook(watchdog, "", hook_count)
    end
end

-- Coroutines do not inherit a Lua hook: each one sets its own as it starts.
local function watched(f)
    if type(f) ~= "function" then
        return f  -- create/wrap refuse it with their own message
    end
    return function(...)
        sethook(watchdog, "", hook_count)
        return f(...)
    end
end

-- hook_count 0: no watchdog at all (scripts/bench_hooks measures what it costs).
if hook_count > 0 then
    local coroutine_create, coroutine_wrap = coroutine.create, coroutine.wrap
    coroutine.create = function(f) return coroutine_create(watched(f)) end
    coroutine.wrap = function(f) return coroutine_wrap(watched(f)) end
    -- LuaJIT never runs hooks in compiled code: the interpreter keeps the watchdog awake,
    -- unless the operator chose speed (`jit = true`: a compiled runaway is the master's).
    if jit and not options.jit then
        jit.off()
        jit.flush()
    end
end

-- The main thread's watchdog is on only while script code runs: the load and each handler
-- call. Lua 5.4 runs every instruction slower while any hook is set, and the prelude's own
-- work per request need not be watched (measured: 1.93 -> 1.64 us of Lua per hello request).
local function watch()
    if hook_count > 0 then
        sethook(watchdog, "", hook_count)
    end
end

-- After a timeout the state is dropped: its hook goes, so its last collection runs freely.
local function timeout_failure()
    sethook()
    failure_traceback = nil
    return false, timeout_message, timeout_trace, elapsed
end

-- xpcall with arguments is not in Lua 5.1: the handler's arguments go through upvalues.
local handler, handler_env

local function call_handler()
    handler(handler_env, con)
end

local function failure(message)
    local trace = failure_traceback
    failure_traceback = nil
    return false, tostring(message), trace
end

local function run(env, request, thread, start)
    if decode_params and type(env) == "string" then  -- PARAMS as received (state.py)
        env = decode_params(env)
    end
    arm(start, env.REQUEST_URI)
    request_started = start
    body_count, header_count = 0, 0
    status, content_type = default_status, default_content_type
    head_sent, streaming = false, not buffering
    local cookie_header = env.HTTP_COOKIE
    env.LUAFCGID_VERSION = 1  -- luafcgid's env has it (main.c:67-69)
    rawset(G, "Env", env)
    rawset(G, "LocalConfig", configs_by_host[env.SERVER_NAME])
    local cookies = cookie_header and parse_cookies(cookie_header) or {}
    rawset(G, "Cookies", cookies)
    session_begin(env, cookies)
    request_env, cookie_fields, query_fields, form_fields = env, cookies, nil, nil
    info.Thread = thread
    rawset(G, "Info", info)
    local found = G[handler_name]
    if type(found) ~= "function" then
        disarm()
        return false, "no handler: the global '" .. handler_name .. "' is " .. type(found)
            .. ", not a function", ""
    end
    request_body, body_unread, handler, handler_env = request, true, found, env
    c_armed = c_arm and c_arm((deadline < slow_at and deadline or slow_at) - start) and true
    if not c_armed then
        watch()
    end
    local ok, message = xpcall(call_handler, on_error)
    if c_armed then
        c_armed = false
        c_disarm()  -- first: a signal still on its way then sets no hook after sethook()
    end
    sethook()
    disarm()
    request_body, handler, handler_env = nil, nil, nil
    if timed_out then
        reset_headers_and_body()
        return timeout_failure()
    end
    if not ok then
        reset_headers_and_body()
        return failure(message)
    end
    local data = take_body()
    if head_sent then
        return data
    end
    if streaming then  -- buffering off and no output: the head alone
        return head() .. "\r\n"
    end
    return head() .. "Content-Length: " .. #data .. "\r\n\r\n" .. data
end

-- Load: the startup script, then the script's top level.

local function run_file(path)
    note_file(path)
    local chunk, message = loadfile(path)
    if not chunk then
        return false, message, nil
    end
    failure_traceback = nil
    local ok, err = xpcall(chunk, on_error)
    if timed_out then
        return timeout_failure()
    end
    if not ok then
        return failure(err)
    end
    return true
end

-- Loading runs under the same timeout; a slow load is not a request: no slow log entry.
arm(clock(), nil)
slow_at, check_from = huge, floor(deadline)
watch()

if options.startup then
    local ok, message, trace, seconds = run_file(options.startup)
    if not ok then
        return false, message, trace, seconds
    end
end
local ok, message, trace, seconds = run_file(script)
if not ok then
    return false, message, trace, seconds
end
sethook()
disarm()
return true, run
