--[[
require("luafcgid"): the helper module of the original luafcgid, for every Lua version
(5.1, 5.3, 5.4, LuaJIT), with the batteries a web script needs. luafcgid2 put the same
helpers in the global `lf`; every state gets it (prelude.lua).

  urlencode(s)        as the original: every byte but letters, digits and space as %XX,
                      then space → "+"; nil and "" come back as they are
  urldecode(s)        its inverse ("+" → space, %XX → byte; a bad escape stays as it is);
                      nil comes back as nil
  parse(s)            "a=1&b=2&b=3&c" → {a = "1", b = {"2", "3"}, c = ""}; as the
                      original, a value ends at the next "=" ("a=1=2" → a = "1")
  parse_pair(s)       luafcgid2's lf.parse_pair: "a=b" → "a", "b"
  parse_query(s)      the same function as parse
  serialize(v)        a string s such that load("return " .. s)() gives v back; as the
                      original, a value with no literal (nil, a function) gives ""
  parse_multipart(body, content_type)
                      multipart/form-data → {name = part or {part, ...}}, a part being
                      {name =, filename =, content_type =, data =}
  parse_cookies(h)    a Cookie header → {name = value}
  cookie(name, value, options)
                      a Set-Cookie header value; options: path, domain, max_age,
                      expires (os.time() number or string), secure, httponly, samesite
  json_encode(v)      JSON text; luafcgid.json_null encodes null
  json_decode(s)      a Lua value; null decodes to luafcgid.json_null
  html_escape(s)      & < > " ' as HTML entities
  redirect(con, url, status)
                      status (302 by default) and Location

Malformed input is a Lua error with a message that says what is wrong: a script that
serves untrusted input catches it with pcall.
]]

local M = {}

local byte, char, format = string.byte, string.char, string.format
local concat, sort = table.concat, table.sort
local tostring, tonumber, type, pairs, error = tostring, tonumber, type, pairs, error
local pcall, setmetatable = pcall, setmetatable
local huge, floor = math.huge, math.floor
local math_type = math.type  -- nil before Lua 5.3: every number is a float there

local function as_string(value, where)
    local kind = type(value)
    if kind == "number" then
        return tostring(value)
    end
    if kind ~= "string" then
        error(where .. " expects a string, got " .. kind, 3)
    end
    return value
end

local function percent(c)
    return format("%%%02X", byte(c))
end

-- As the original (luafcgid.lua, luafcgid2's lf.urlencode): "-", "_", ".", "~" and "*" are
-- escaped too, which every decoder reads back the same; nil and "" pass through.
function M.urlencode(s)
    if s == nil or s == "" then
        return s
    end
    s = as_string(s, "urlencode"):gsub("[^%w ]", percent):gsub(" ", "+")
    return s
end

local function unpercent(hex)
    return char(tonumber(hex, 16))
end

function M.urldecode(s)
    if s == nil then
        return nil
    end
    s = as_string(s, "urldecode"):gsub("%+", " "):gsub("%%(%x%x)", unpercent)
    return s
end

-- luafcgid2's lf.parse_pair: the name and the value of one "name=value" (each decoded).
-- As the original's pattern, the value ends at the next "=", and a pair without "=" has
-- no name: "a=1=2" → "a", "1"; "c" → nil, "".
function M.parse_pair(s)
    if s == nil or s == "" then
        return nil, nil
    end
    local name, value = as_string(s, "parse_pair"):match("^([^=]*)=([^=]*)")
    return M.urldecode(name), M.urldecode(value or "")
end

-- Repeated names collect their values in an array, in order. A pair without "=" is a
-- name with the value "" (the original raised "table index is nil" there).
function M.parse(s)
    local fields = {}
    if s == nil then
        return fields
    end
    for pair in as_string(s, "parse"):gmatch("[^&]+") do
        local name, value = pair:match("^([^=]*)=([^=]*)")
        if not name then
            name, value = pair, ""
        end
        name, value = M.urldecode(name), M.urldecode(value)
        local seen = fields[name]
        if seen == nil then
            fields[name] = value
        elseif type(seen) == "table" then
            seen[#seen + 1] = value
        else
            fields[name] = {seen, value}
        end
    end
    return fields
end

M.parse_query = M.parse

local function number_literal(n)
    if n ~= n then
        return "0/0"
    elseif n == huge then
        return "math.huge"
    elseif n == -huge then
        return "-math.huge"
    elseif math_type and math_type(n) == "integer" then
        return format("%d", n)
    end
    local literal = format("%.17g", n)
    if math_type and not literal:find("[%.eEn]") then
        literal = literal .. ".0"  -- keep a float a float on Lua 5.3+
    end
    return literal
end

local serialize

-- A value with no literal (a function, a coroutine, userdata, nil) is nil in the array
-- part, which keeps the positions of the others, and its pair is left out elsewhere (the
-- original wrote "k = " there, which reads back as a syntax error).
local function table_literal(t, open)
    if open[t] then
        error("serialize: the table contains itself", 0)
    end
    open[t] = true
    local parts, count = {}, #t
    for i = 1, count do
        parts[i] = serialize(t[i], open) or "nil"
    end
    local keyed = {}
    for key, value in pairs(t) do
        if not (type(key) == "number" and key >= 1 and key <= count and key % 1 == 0) then
            local key_literal, value_literal = serialize(key, open), serialize(value, open)
            if key_literal and value_literal then
                keyed[#keyed + 1] = "[" .. key_literal .. "]=" .. value_literal
            end
        end
    end
    sort(keyed)  -- the same table gives the same string
    for i = 1, #keyed do
        parts[count + i] = keyed[i]
    end
    open[t] = nil
    return "{" .. concat(parts, ",") .. "}"
end

-- The literal of a value, or nil when it has none.
function serialize(value, open)
    local kind = type(value)
    if kind == "string" then
        return format("%q", value)
    elseif kind == "number" then
        return number_literal(value)
    elseif kind == "boolean" then
        return tostring(value)
    elseif kind == "table" then
        return table_literal(value, open)
    end
    return nil
end

function M.serialize(value)
    return serialize(value, {}) or ""
end

-- Errors found deep inside a parser are raised with level 0 and given the caller's
-- position once, at the public function (error levels cannot see through recursion).
local function fail(message)
    error(message, 0)
end

-- multipart/form-data (RFC 7578) ---------------------------------------------------------

local find, sub, lower = string.find, string.sub, string.lower

-- The boundary parameter, quoted or not: RFC 2046 allows 1 to 70 characters.
local function multipart_boundary(content_type)
    if type(content_type) ~= "string"
        or not find(lower(content_type), "^%s*multipart/form%-data") then
        fail("parse_multipart: the content type is not multipart/form-data: "
            .. tostring(content_type))
    end
    local _, stop = find(lower(content_type), ";%s*boundary%s*=%s*")
    if not stop then
        fail("parse_multipart: the content type has no boundary parameter")
    end
    local rest = sub(content_type, stop + 1)
    local boundary = rest:match('^"([^"]*)"') or rest:match("^[^;%s]*")
    if boundary == "" or #boundary > 70 then
        fail("parse_multipart: the boundary must have 1 to 70 characters")
    end
    return boundary
end

-- Quoted values are taken as browsers write them (WHATWG): up to the next quote, with no
-- backslash escapes, so a Windows path in a filename stays whole.
local function disposition_parameters(value, number)
    local kind, rest = value:match("^%s*([^;%s]+)%s*(.*)$")
    if not kind or lower(kind) ~= "form-data" then
        fail("parse_multipart: part " .. number .. " is not Content-Disposition: form-data")
    end
    local parameters = {}
    while not find(rest, "^;?%s*$") do  -- a trailing ";" is tolerated
        local name, tail = rest:match("^;%s*([^=%s;]+)%s*=%s*(.*)$")
        if not name then
            fail("parse_multipart: part " .. number .. " has a malformed Content-Disposition")
        end
        local quoted, after = tail:match('^"([^"]*)"%s*(.*)$')
        if quoted then
            parameters[lower(name)], rest = quoted, after
        else
            parameters[lower(name)], rest = tail:match("^([^;%s]*)%s*(.*)$")
        end
    end
    return parameters
end

local function multipart_part(head, data, number)
    local disposition, content_type
    for line in (head .. "\r\n"):gmatch("(.-)\r\n") do
        local name, value = line:match("^([!#-'%*%+%-%.0-9A-Z%^_`a-z|~]+)%s*:%s*(.-)%s*$")
        if not name then
            fail("parse_multipart: part " .. number .. " has a malformed header line: " .. line)
        end
        name = lower(name)
        if name == "content-disposition" then
            disposition = value
        elseif name == "content-type" then
            content_type = value
        end
    end
    if not disposition then
        fail("parse_multipart: part " .. number .. " has no Content-Disposition header")
    end
    local parameters = disposition_parameters(disposition, number)
    if not parameters.name then
        fail("parse_multipart: part " .. number .. " has no field name")
    end
    return {name = parameters.name, filename = parameters.filename,
            content_type = content_type, data = data}
end

local function add_field(fields, name, value)
    local seen = fields[name]
    if seen == nil then
        fields[name] = value
    elseif seen.name == nil then  -- already an array of parts
        seen[#seen + 1] = value
    else
        fields[name] = {seen, value}
    end
end

local function parse_multipart(body, content_type)
    if type(body) ~= "string" then
        fail("parse_multipart expects the body as a string, got " .. type(body))
    end
    local dash_boundary = "--" .. multipart_boundary(content_type)
    local delimiter = "\r\n" .. dash_boundary
    local at = 1  -- the start of the current delimiter's "--"
    if sub(body, 1, #dash_boundary) ~= dash_boundary then
        local found = find(body, delimiter, 1, true)  -- after a preamble
        if not found then
            fail("parse_multipart: the body has no opening boundary")
        end
        at = found + 2
    end
    local fields, number = {}, 0
    while true do
        local after = at + #dash_boundary
        if sub(body, after, after + 1) == "--" then
            return fields  -- the closing boundary; an epilogue is ignored
        end
        local _, line_end = find(body, "^[ \t]*\r\n", after)
        if not line_end then
            fail("parse_multipart: a boundary line is malformed or the body ends there")
        end
        number = number + 1
        local head, data_start = "", line_end + 3
        if sub(body, line_end + 1, line_end + 2) ~= "\r\n" then
            local head_end = find(body, "\r\n\r\n", line_end + 1, true)
            if not head_end then
                fail("parse_multipart: the headers of part " .. number .. " do not end")
            end
            head, data_start = sub(body, line_end + 1, head_end - 1), head_end + 4
        end
        local next_at = find(body, delimiter, data_start, true)
        if not next_at then
            fail("parse_multipart: the body ends without the closing boundary")
        end
        local part = multipart_part(head, sub(body, data_start, next_at - 1), number)
        add_field(fields, part.name, part)
        at = next_at + 2
    end
end

function M.parse_multipart(body, content_type)
    local ok, result = pcall(parse_multipart, body, content_type)
    if not ok then
        error(result, 2)
    end
    return result
end

-- Cookies (RFC 6265) -----------------------------------------------------------------------

-- Pairs separated by ";", quoted values unquoted, a name without "=" gets "". The first
-- of a repeated name wins: browsers send the cookie of the longest path first.
function M.parse_cookies(cookie_header)
    local cookies = {}
    if cookie_header == nil then
        return cookies
    end
    for pair in as_string(cookie_header, "parse_cookies"):gmatch("[^;]+") do
        local name, value = pair:match("^%s*(.-)%s*=%s*(.-)%s*$")
        if name then
            value = value:match('^"(.*)"$') or value
        else
            name, value = pair:match("^%s*(.-)%s*$"), ""
        end
        if name ~= "" and cookies[name] == nil then
            cookies[name] = value
        end
    end
    return cookies
end

-- What a cookie attribute value may not hold: it would end the attribute or the header.
local function cookie_text(value, what)
    value = as_string(value, "cookie")
    if find(value, "[%z\1-\31\127;]") then
        error("cookie: " .. what .. " must not contain control characters or ';'", 3)
    end
    return value
end

local samesite_values = {Strict = true, Lax = true, None = true}
local cookie_options = {path = true, domain = true, max_age = true, expires = true,
                        secure = true, httponly = true, samesite = true}

local function cookie_attributes(options, parts)
    for key in pairs(options) do
        if not cookie_options[key] then
            error("cookie: unknown option '" .. tostring(key) .. "'", 3)
        end
    end
    if options.path ~= nil then
        parts[#parts + 1] = "Path=" .. cookie_text(options.path, "path")
    end
    if options.domain ~= nil then
        parts[#parts + 1] = "Domain=" .. cookie_text(options.domain, "domain")
    end
    local max_age = options.max_age
    if max_age ~= nil then
        if type(max_age) ~= "number" or max_age % 1 ~= 0 then
            error("cookie: max_age must be a whole number of seconds", 3)
        end
        parts[#parts + 1] = format("Max-Age=%d", max_age)
    end
    local expires = options.expires
    if type(expires) == "number" then
        parts[#parts + 1] = "Expires=" .. os.date("!%a, %d %b %Y %H:%M:%S GMT", floor(expires))
    elseif expires ~= nil then
        parts[#parts + 1] = "Expires=" .. cookie_text(expires, "expires")
    end
    if options.secure then
        parts[#parts + 1] = "Secure"
    end
    if options.httponly then
        parts[#parts + 1] = "HttpOnly"
    end
    local samesite = options.samesite
    if samesite ~= nil then
        if not samesite_values[samesite] then
            error('cookie: samesite must be "Strict", "Lax" or "None", got ' .. tostring(samesite), 3)
        end
        parts[#parts + 1] = "SameSite=" .. samesite
    end
end

function M.cookie(name, value, options)
    name = as_string(name, "cookie")
    if not find(name, "^[!#-'%*%+%-%.0-9A-Z%^_`a-z|~]+$") then
        error('cookie: "' .. name .. '" is not a valid cookie name', 2)
    end
    local parts = {name .. "=" .. cookie_text(value, "the value")}
    if options ~= nil then
        if type(options) ~= "table" then
            error("cookie expects a table of options, got " .. type(options), 2)
        end
        cookie_attributes(options, parts)
    end
    return concat(parts, "; ")
end

-- JSON (RFC 8259) --------------------------------------------------------------------------

-- null: one table that only compares equal to itself.
M.json_null = setmetatable({}, {
    __tostring = function() return "null" end,
    __newindex = function() error("luafcgid.json_null is read-only", 2) end,
})
local json_null = M.json_null

local json_escapes = {['"'] = '\\"', ["\\"] = "\\\\", ["\b"] = "\\b", ["\f"] = "\\f",
                      ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t"}

local function json_escape(c)
    return json_escapes[c] or format("\\u%04x", byte(c))
end

local function json_string(s)
    return '"' .. s:gsub('[%z\1-\31"\\]', json_escape) .. '"'
end

local function json_number(n)
    if n ~= n or n == huge or n == -huge then
        fail("json_encode: NaN and infinities have no JSON form")
    end
    if math_type and math_type(n) == "integer" or n % 1 == 0 and n > -2^53 and n < 2^53 then
        return format("%d", n)
    end
    local text = format("%.14g", n)  -- the shortest usual form, when it reads back exactly
    if tonumber(text) ~= n then
        text = format("%.17g", n)
    end
    return text
end

local encode

-- 1..n keys and nothing else: an array. An empty table is an object.
local function is_array(t)
    local count = #t
    if count == 0 then
        return false
    end
    local keys = 0
    for _ in pairs(t) do
        keys = keys + 1
    end
    return keys == count
end

local function json_key(key)
    if type(key) == "string" then
        return key
    elseif type(key) == "number" then
        return json_number(key)
    end
    fail("json_encode: a " .. type(key) .. " key has no JSON form")
end

local function json_object(t, open, depth)
    local keys, by_text = {}, {}
    for key in pairs(t) do
        local text = json_key(key)
        if by_text[text] ~= nil then
            fail('json_encode: two keys give the same object key "' .. text .. '"')
        end
        keys[#keys + 1], by_text[text] = text, key
    end
    sort(keys)  -- the same table gives the same text
    local parts = {}
    for i = 1, #keys do
        parts[i] = json_string(keys[i]) .. ":" .. encode(t[by_text[keys[i]]], open, depth)
    end
    return "{" .. concat(parts, ",") .. "}"
end

local max_depth = 1000  -- of nested arrays and objects, both ways

local function json_table(t, open, depth)
    if open[t] then
        fail("json_encode: the table contains itself")
    elseif depth > max_depth then
        fail("json_encode: tables nested deeper than " .. max_depth .. " levels")
    end
    open[t] = true
    local text
    if is_array(t) then
        local parts = {}
        for i = 1, #t do
            parts[i] = encode(t[i], open, depth)
        end
        text = "[" .. concat(parts, ",") .. "]"
    else
        text = json_object(t, open, depth)
    end
    open[t] = nil
    return text
end

function encode(value, open, depth)
    local kind = type(value)
    if kind == "string" then
        return json_string(value)
    elseif kind == "number" then
        return json_number(value)
    elseif kind == "boolean" then
        return tostring(value)
    elseif value == nil or value == json_null then
        return "null"
    elseif kind == "table" then
        return json_table(value, open, depth + 1)
    end
    fail("json_encode: a " .. kind .. " has no JSON form")
end

function M.json_encode(value)
    local ok, result = pcall(encode, value, {}, 0)
    if not ok then
        error(result, 2)
    end
    return result
end

local decode_value

local function invalid(at, what)
    fail(format("invalid JSON at position %d: %s", at, what))
end

local function skip_space(s, at)
    local _, stop = find(s, "^[ \t\r\n]*", at)
    return stop + 1
end

local function utf8_char(code)
    if code < 0x80 then
        return char(code)
    elseif code < 0x800 then
        return char(0xC0 + floor(code / 0x40), 0x80 + code % 0x40)
    elseif code < 0x10000 then
        return char(0xE0 + floor(code / 0x1000), 0x80 + floor(code / 0x40) % 0x40,
            0x80 + code % 0x40)
    end
    return char(0xF0 + floor(code / 0x40000), 0x80 + floor(code / 0x1000) % 0x40,
        0x80 + floor(code / 0x40) % 0x40, 0x80 + code % 0x40)
end

local function hex4(s, at)
    local digits = s:match("^%x%x%x%x", at)
    if not digits then
        invalid(at, "\\u needs four hexadecimal digits")
    end
    return tonumber(digits, 16)
end

-- \uXXXX at `at` (the backslash): the character, and where the text goes on.
local function unicode_escape(s, at)
    local code = hex4(s, at + 2)
    if code >= 0xDC00 and code <= 0xDFFF then
        invalid(at, "a low surrogate without a high one")
    elseif code >= 0xD800 and code <= 0xDBFF then
        if sub(s, at + 6, at + 7) ~= "\\u" then
            invalid(at, "a high surrogate without a low one")
        end
        local low = hex4(s, at + 8)
        if low < 0xDC00 or low > 0xDFFF then
            invalid(at + 6, "a high surrogate without a low one")
        end
        return utf8_char(0x10000 + (code - 0xD800) * 0x400 + (low - 0xDC00)), at + 12
    end
    return utf8_char(code), at + 6
end

local simple_unescapes = {['"'] = '"', ["\\"] = "\\", ["/"] = "/", b = "\b", f = "\f",
                          n = "\n", r = "\r", t = "\t"}

local function decode_string(s, at)
    local pieces, count, from = {}, 0, at + 1
    while true do
        local special = find(s, '[%z\1-\31"\\]', from)
        if not special then
            invalid(at, "a string that does not end")
        end
        count = count + 1
        pieces[count] = sub(s, from, special - 1)
        local c = sub(s, special, special)
        if c == '"' then
            return concat(pieces, "", 1, count), special + 1
        elseif c ~= "\\" then
            invalid(special, "a control character in a string")
        end
        local kind = sub(s, special + 1, special + 1)
        if kind == "u" then
            count = count + 1
            pieces[count], from = unicode_escape(s, special)
        elseif simple_unescapes[kind] then
            count = count + 1
            pieces[count], from = simple_unescapes[kind], special + 2
        else
            invalid(special, "an unknown escape \\" .. kind)
        end
    end
end

-- The RFC 8259 grammar: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][-+]?[0-9]+)?
local function decode_number(s, at)
    local whole = s:match("^-?0", at) or s:match("^-?[1-9]%d*", at)
    if not whole then
        invalid(at, "a malformed number")
    end
    local stop = at + #whole
    local fraction = s:match("^%.%d+", stop)
    if not fraction and sub(s, stop, stop) == "." then
        invalid(stop, "a malformed number")
    end
    stop = stop + #(fraction or "")
    local exponent = s:match("^[eE][-+]?%d+", stop)
    if not exponent and find(s, "^[eE]", stop) then
        invalid(stop, "a malformed number")
    end
    stop = stop + #(exponent or "")
    return tonumber(sub(s, at, stop - 1)), stop
end

local literals = {t = {"true", true}, f = {"false", false}, n = {"null", json_null}}

local function decode_array(s, at, depth)
    local array, count = {}, 0
    at = skip_space(s, at + 1)
    if sub(s, at, at) == "]" then
        return array, at + 1
    end
    while true do
        count = count + 1
        array[count], at = decode_value(s, at, depth)
        at = skip_space(s, at)
        local c = sub(s, at, at)
        if c == "]" then
            return array, at + 1
        elseif c ~= "," then
            invalid(at, "',' or ']' expected in an array")
        end
        at = skip_space(s, at + 1)
    end
end

local function decode_object(s, at, depth)
    local object = {}
    at = skip_space(s, at + 1)
    if sub(s, at, at) == "}" then
        return object, at + 1
    end
    while true do
        if sub(s, at, at) ~= '"' then
            invalid(at, "a string key expected in an object")
        end
        local key
        key, at = decode_string(s, at)
        at = skip_space(s, at)
        if sub(s, at, at) ~= ":" then
            invalid(at, "':' expected after an object key")
        end
        object[key], at = decode_value(s, skip_space(s, at + 1), depth)
        at = skip_space(s, at)
        local c = sub(s, at, at)
        if c == "}" then
            return object, at + 1
        elseif c ~= "," then
            invalid(at, "',' or '}' expected in an object")
        end
        at = skip_space(s, at + 1)
    end
end

-- A value at `at` (no space before it): the value and where the text goes on.
function decode_value(s, at, depth)
    local c = sub(s, at, at)
    if c == '"' then
        return decode_string(s, at)
    elseif c == "{" or c == "[" then
        if depth >= max_depth then
            invalid(at, "nesting deeper than " .. max_depth .. " levels")
        end
        if c == "{" then
            return decode_object(s, at, depth + 1)
        end
        return decode_array(s, at, depth + 1)
    elseif c == "-" or find(c, "^%d") then
        return decode_number(s, at)
    end
    local literal = literals[c]
    if literal and sub(s, at, at + #literal[1] - 1) == literal[1] then
        return literal[2], at + #literal[1]
    elseif c == "" then
        invalid(at, "the text ends where a value is expected")
    end
    invalid(at, "a value expected")
end

local function decode(s)
    if type(s) ~= "string" then
        fail("json_decode expects a string, got " .. type(s))
    end
    local value, at = decode_value(s, skip_space(s, 1), 0)
    at = skip_space(s, at)
    if at <= #s then
        invalid(at, "text after the value")
    end
    return value
end

function M.json_decode(s)
    local ok, result = pcall(decode, s)
    if not ok then
        error(result, 2)
    end
    return result
end

-- HTML and redirects -----------------------------------------------------------------------

local html_entities = {["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;", ['"'] = "&quot;",
                       ["'"] = "&#39;"}

function M.html_escape(s)
    s = as_string(s, "html_escape"):gsub("[&<>\"']", html_entities)
    return s
end

function M.redirect(con, url, status)
    url = as_string(url, "redirect")
    if find(url, "[\r\n]") then
        error("redirect: line breaks are not allowed in the URL", 2)
    end
    status = status or 302
    if type(status) ~= "number" or status < 300 or status > 399 or status % 1 ~= 0 then
        error("redirect: the status must be a 3xx code, got " .. tostring(status), 2)
    end
    con:status(status)
    con:header("Location", url)
end

return M
