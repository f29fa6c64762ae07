-- A form that posts to itself: GET shows it, POST reads the body with con:gets().
local lf = require("luafcgid")

local function escape(s)
    return (tostring(s):gsub("[&<>\"]", { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;", ['"'] = "&quot;" }))
end

function main(env, con)
    con:puts([[<form method="post"><input name="name"> <input type="submit"></form>]])
    if env.REQUEST_METHOD == "POST" then
        local form = lf.parse(con:gets())
        con:puts("<p>Hello, " .. escape(form.name or "stranger") .. "!</p>")
    end
end
