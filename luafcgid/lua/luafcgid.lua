--[[
require("luafcgid"): the helper module of the original luafcgid, for every Lua version.

  urlencode(s)   application/x-www-form-urlencoded encoding (space → "+")
  urldecode(s)   its inverse ("+" → space, %XX → byte)
  parse(s)       "a=1&b=2&b=3&c" → {a = "1", b = {"2", "3"}, c = ""}
  serialize(v)   a string s such that load("return " .. s)() gives v back
]]

local M = {}

local byte, char, format = string.byte, string.char, string.format
local concat, sort = table.concat, table.sort
local tostring, tonumber, type, pairs, error = tostring, tonumber, type, pairs, error
local huge = math.huge
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

function M.urlencode(s)
    s = as_string(s, "urlencode"):gsub("[^%w%*%-%._ ]", percent):gsub(" ", "+")
    return s
end

local function unpercent(hex)
    return char(tonumber(hex, 16))
end

function M.urldecode(s)
    s = as_string(s, "urldecode"):gsub("%+", " "):gsub("%%(%x%x)", unpercent)
    return s
end

-- Repeated names collect their values in an array, in order.
function M.parse(s)
    local fields = {}
    if s == nil then
        return fields
    end
    for pair in as_string(s, "parse"):gmatch("[^&]+") do
        local name, value = pair:match("^([^=]*)=(.*)$")
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

local function table_literal(t, open)
    if open[t] then
        error("serialize: the table contains itself", 0)
    end
    open[t] = true
    local parts, count = {}, #t
    for i = 1, count do
        parts[i] = serialize(t[i], open)
    end
    local keyed = {}
    for key, value in pairs(t) do
        if not (type(key) == "number" and key >= 1 and key <= count and key % 1 == 0) then
            keyed[#keyed + 1] = "[" .. serialize(key, open) .. "]=" .. serialize(value, open)
        end
    end
    sort(keyed)  -- the same table gives the same string
    for i = 1, #keyed do
        parts[count + i] = keyed[i]
    end
    open[t] = nil
    return "{" .. concat(parts, ",") .. "}"
end

function serialize(value, open)
    local kind = type(value)
    if kind == "string" then
        return format("%q", value)
    elseif kind == "number" then
        return number_literal(value)
    elseif kind == "boolean" or kind == "nil" then
        return tostring(value)
    elseif kind == "table" then
        return table_literal(value, open)
    end
    error("serialize: cannot serialize a " .. kind, 0)
end

function M.serialize(value)
    return serialize(value, {})
end

return M
