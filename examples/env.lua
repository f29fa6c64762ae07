-- Dump the CGI environment nginx sent, and the query string parsed.
local lf = require("luafcgid")

local function escape(s)
    return (tostring(s):gsub("[&<>\"]", { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;", ['"'] = "&quot;" }))
end

function main(env, con)
    local names = {}
    for name in pairs(env) do names[#names + 1] = name end
    table.sort(names)

    local out = { "<h1>Environment</h1><table>\n" }
    for _, name in ipairs(names) do
        out[#out + 1] = string.format("<tr><th>%s</th><td>%s</td></tr>\n", escape(name), escape(env[name]))
    end
    out[#out + 1] = "</table>\n<h1>Query</h1><pre>\n"
    for name, value in pairs(lf.parse(env.QUERY_STRING or "")) do
        if type(value) == "table" then value = table.concat(value, ", ") end
        out[#out + 1] = escape(name) .. " = " .. escape(value) .. "\n"
    end
    out[#out + 1] = "</pre>\n"
    con:puts(table.concat(out))
end
