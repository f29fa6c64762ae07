--[[
The luafcgid2 `Session` global (prelude.lua runs this file once per state).

    Session.Start()                   make sure the client has a session
    Session.SetVar(realm, name, v)    store v (string, number, boolean, or a table of
                                      them; nil removes); creates the session if needed
    Session.GetVar(realm, name)       the value, or nil; realm "*" looks in every realm
    Session.HasRealm(realm)           true when the realm holds a variable
    Session.Clear(realm)              remove the realm's variables ("*": every realm)
    Session.Delete()                  end the session (its cookie is expired)

Colon calls (`Session:Start()`) work too. The session's key is the cookie named
`SessionName`; the store (SQLite or Redis, luafcgid/sessions/) is reached through the
Python bridge (luafcgid/lua/session.py) only when a script uses Session, at most once
per request to read, once per write. A session is loaded at its first use in a request
and the cookie (name=key, Path=/, Max-Age and Expires = SessionTime, HttpOnly, Secure,
SameSite as configured) goes out with the head of every request that used it.

Values are encoded here, so stores keep opaque bytes:
    s<len>:<bytes>   i<integer>;   n<float>;   t   f   {<key><value>...}
]]

local options = ...

local type, tostring, tonumber, error, pairs, next, pcall = type, tostring, tonumber, error, pairs,
    next, pcall
local format, sub, byte, find = string.format, string.sub, string.byte, string.find
local concat = table.concat
local os_time, os_date = os.time, os.date
local math_type = math.type  -- nil before Lua 5.3: every number is a float there
local huge = math.huge

local bridge_open, bridge_create = options.open, options.create
local bridge_set, bridge_clear, bridge_delete = options.set, options.clear, options.delete
local cookie_name = options.name
local lifetime = options.lifetime
local cookie_flags = "; Path=/" .. (options.httponly and "; HttpOnly" or "")
    .. (options.secure and "; Secure" or "")
    .. (options.samesite ~= "" and "; SameSite=" .. options.samesite or "")
local can_set_cookie = options.can_set_cookie  -- false once the response head was sent

local MAX_DEPTH = 100

-- Encoding ------------------------------------------------------------------------

local encode_value

local function encode_number(n)
    if math_type and math_type(n) == "integer" then
        return "i" .. n .. ";"
    end
    if n ~= n then
        return "nnan;"
    elseif n == huge then
        return "ninf;"
    elseif n == -huge then
        return "n-inf;"
    end
    return "n" .. format("%.17g", n) .. ";"
end

local function encode_table(t, parts, depth, open)
    if open[t] then
        error("a table stored in a session cannot contain itself", 0)
    end
    if depth > MAX_DEPTH then
        error("a table stored in a session may nest at most " .. MAX_DEPTH .. " deep", 0)
    end
    open[t] = true
    parts[#parts + 1] = "{"
    for key, value in pairs(t) do
        local key_kind = type(key)
        if key_kind ~= "string" and key_kind ~= "number" and key_kind ~= "boolean" then
            error("a table stored in a session has a " .. key_kind .. " key", 0)
        end
        encode_value(key, parts, depth, open)
        encode_value(value, parts, depth + 1, open)
    end
    parts[#parts + 1] = "}"
    open[t] = nil
end

encode_value = function(value, parts, depth, open)
    local kind = type(value)
    if kind == "string" then
        parts[#parts + 1] = "s" .. #value .. ":" .. value
    elseif kind == "number" then
        parts[#parts + 1] = encode_number(value)
    elseif kind == "boolean" then
        parts[#parts + 1] = value and "t" or "f"
    elseif kind == "table" then
        encode_table(value, parts, depth, open)
    else
        error("a " .. kind .. " cannot be stored in a session (strings, numbers, booleans "
            .. "and tables of them can)", 0)
    end
end

local function encode(value)
    if type(value) == "string" then
        return "s" .. #value .. ":" .. value
    end
    local parts = {}
    encode_value(value, parts, 0, {})
    return concat(parts)
end

-- Decoding: data comes from our own encoder; anything else is a damaged store.

local function damaged(at)
    error("session data damaged at byte " .. at .. ": the store holds something this "
        .. "server did not write", 0)
end

local decode_at

local SPECIAL = {nan = 0 / 0, inf = huge, ["-inf"] = -huge}

local function decode_table(data, at)
    local t = {}
    while true do
        if byte(data, at) == 125 then  -- }
            return t, at + 1
        end
        local key, value
        key, at = decode_at(data, at)
        if key == nil or key ~= key then
            damaged(at)
        end
        value, at = decode_at(data, at)
        t[key] = value
    end
end

decode_at = function(data, at)
    local tag = byte(data, at)
    if tag == 115 then  -- s<len>:
        local colon = find(data, ":", at + 1, true)
        local length = colon and tonumber(sub(data, at + 1, colon - 1))
        if not length or colon + length > #data then
            damaged(at)
        end
        return sub(data, colon + 1, colon + length), colon + length + 1
    elseif tag == 105 or tag == 110 then  -- i / n <number>;
        local stop = find(data, ";", at + 1, true)
        if not stop then
            damaged(at)
        end
        local text = sub(data, at + 1, stop - 1)
        local n = tonumber(text) or SPECIAL[text]
        if n == nil then
            damaged(at)
        end
        if tag == 110 and math_type and math_type(n) == "integer" then
            n = n + 0.0
        end
        return n, stop + 1
    elseif tag == 116 then  -- t
        return true, at + 1
    elseif tag == 102 then  -- f
        return false, at + 1
    elseif tag == 123 then  -- {
        return decode_table(data, at + 1)
    end
    damaged(at)
end

local function decode(data)
    local value, stop = decode_at(data, 1)
    if stop ~= #data + 1 then
        damaged(stop)
    end
    return value
end

-- Per-request state ---------------------------------------------------------------

local env                 -- this request's params
local cookie_key          -- the key the client sent, or nil
local loaded = false      -- the store was asked this request
local used = false        -- a Session function ran: the cookie goes out
local key                 -- the live session's key, or nil
local realms = {}         -- realm → {name → encoded value}, as loaded and written

local function begin(request_env, cookies)
    env, cookie_key = request_env, cookies[cookie_name]
    loaded, used, key = false, false, nil
end

-- Who asks (luafcgid2's anti-hijack score compares these with the session's last user).
local function identity()
    return env.REMOTE_ADDR or "", env.HTTP_USER_AGENT or "", env.HTTP_ACCEPT_LANGUAGE or ""
end

-- A bridge answer: nil, message when the store failed (the message names the store).
local function checked(where, ok, message)
    if ok == nil then
        error("Session." .. where .. ": " .. tostring(message), 0)
    end
    return ok
end

local function open_session(where)
    used = true
    if loaded then
        return
    end
    loaded, realms = true, {}
    if not cookie_key or cookie_key == "" then
        return
    end
    local flat = {}
    local address, agent, language = identity()
    if checked(where, bridge_open(cookie_key, address, agent, language, flat)) then
        key = cookie_key
        for i = 1, #flat, 3 do
            local realm = realms[flat[i]]
            if not realm then
                realm = {}
                realms[flat[i]] = realm
            end
            realm[flat[i + 1]] = flat[i + 2]
        end
    end
end

-- A new session needs its cookie in the head: refuse once the head is out.
local function create(where)
    if not can_set_cookie() then
        error("Session." .. where .. ": the head was already sent (con:flush or unbuffered "
            .. "output), so the session cookie cannot be set; start the session before "
            .. "any output", 3)
    end
    key = checked(where, bridge_create(identity()))
    realms = {}
end

local function text(value, where, what)
    local kind = type(value)
    if kind == "number" then
        return tostring(value)
    elseif kind ~= "string" then
        error("Session." .. where .. ": the " .. what .. " must be a string, got " .. kind, 3)
    end
    return value
end

-- The API -------------------------------------------------------------------------

local Session = {}

-- Session.f(...) and Session:f(...) both work.
local function arguments(first, ...)
    if first == Session then
        return ...
    end
    return first, ...
end

function Session.Start()
    open_session("Start")
    if not key then
        create("Start")
    end
end

function Session.HasRealm(...)
    local realm = text((arguments(...)), "HasRealm", "realm")
    open_session("HasRealm")
    return key ~= nil and realms[realm] ~= nil and next(realms[realm]) ~= nil
end

function Session.GetVar(...)
    local realm, name = arguments(...)
    realm, name = text(realm, "GetVar", "realm"), text(name, "GetVar", "name")
    open_session("GetVar")
    if not key then
        return nil
    end
    if realm == "*" then
        for _, variables in pairs(realms) do
            if variables[name] then
                return decode(variables[name])
            end
        end
        return nil
    end
    local variables = realms[realm]
    local data = variables and variables[name]
    if data == nil then
        return nil
    end
    return decode(data)
end

function Session.SetVar(...)
    local realm, name, value = arguments(...)
    realm, name = text(realm, "SetVar", "realm"), text(name, "SetVar", "name")
    local data = nil
    if value ~= nil then
        local ok, encoded = pcall(encode, value)
        if not ok then
            error("Session.SetVar: " .. encoded, 2)
        end
        data = encoded
    end
    open_session("SetVar")
    if not key then
        if data == nil then
            return true  -- removing from a session that does not exist: nothing to do
        end
        create("SetVar")
    end
    if not checked("SetVar", bridge_set(key, realm, name, data)) then
        -- deleted or expired since it was loaded: the value goes to a new session
        create("SetVar")
        checked("SetVar", bridge_set(key, realm, name, data))
    end
    local variables = realms[realm]
    if not variables then
        variables = {}
        realms[realm] = variables
    end
    variables[name] = data
    return true
end

function Session.Clear(...)
    local realm = text((arguments(...)), "Clear", "realm")
    open_session("Clear")
    if not key then
        return
    end
    if realm == "*" then
        checked("Clear", bridge_clear(key, nil))
        realms = {}
    else
        checked("Clear", bridge_clear(key, realm))
        realms[realm] = nil
    end
end

function Session.Delete()
    open_session("Delete")
    if key then
        checked("Delete", bridge_delete(key))
        key, realms = nil, {}
    end
end

-- The Set-Cookie value this request needs, or nil (Session unused, or nothing to say).
local function cookie()
    if not used then
        return nil
    end
    used = false
    if key then
        return cookie_name .. "=" .. key .. cookie_flags .. "; Max-Age=" .. lifetime
            .. os_date("!; Expires=%a, %d %b %Y %H:%M:%S GMT", os_time() + lifetime)
    end
    if cookie_key and cookie_key ~= "" then  -- the client's session is gone: forget it
        return cookie_name .. "=" .. cookie_flags
            .. "; Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT"
    end
    return nil
end

return Session, begin, cookie
