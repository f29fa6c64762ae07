-- A JSON-ish API: GET /api.lua?id=N returns an item, anything else a 404 or 405.
local lf = require("luafcgid")

local items = {
    ["1"] = { name = "apple", price = 1.25 },
    ["2"] = { name = "pear", price = 0.75 },
}

local function json(value)
    if type(value) == "table" then
        local fields = {}
        for k, v in pairs(value) do fields[#fields + 1] = string.format("%q:%s", k, json(v)) end
        table.sort(fields)
        return "{" .. table.concat(fields, ",") .. "}"
    elseif type(value) == "string" then
        return string.format("%q", value)
    end
    return tostring(value)
end

function main(env, con)
    con:header("Content-Type", "application/json")
    if env.REQUEST_METHOD ~= "GET" then
        con:status(405)
        con:header("Allow", "GET")
        con:puts(json({ error = "method not allowed" }))
        return
    end
    local item = items[lf.parse(env.QUERY_STRING or "").id or ""]
    if not item then
        con:status(404)
        con:puts(json({ error = "no such item" }))
        return
    end
    con:puts(json(item))
end
