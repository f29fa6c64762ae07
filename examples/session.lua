-- Sessions (luafcgid2's Session API): sign in with a name, count your visits, sign out.
-- The session lives in the session store (SQLite by default), so every worker
-- process sees it, and it survives reloads and restarts.

local function page(con, body)
    con:header("Content-Type", "text/html; charset=utf-8")
    con:puts("<!doctype html><title>Session</title>")
    con:puts(body)
end

function main(env, con)
    local action = con:query().action
    if env.REQUEST_METHOD == "POST" then
        local name = con:form().name
        if name and name ~= "" then
            Session.Start()
            Session.SetVar("auth", "user", name)
            Session.SetVar("stats", "visits", 0)
        end
        return con:redirect("session.lua", 303)
    elseif action == "logout" then
        Session.Delete()
        return con:redirect("session.lua", 303)
    end

    local user = Session.GetVar("auth", "user")
    if not user then
        return page(con, [[<form method="post"><label>Name <input name="name"></label>
<button>Sign in</button></form>]])
    end
    local visits = Session.GetVar("stats", "visits") + 1
    Session.SetVar("stats", "visits", visits)
    page(con, string.format("<p>Hello, %s: visit %d of this session.</p>"
        .. '<p><a href="session.lua?action=logout">Sign out</a></p>',
        con:escape(user), visits))
end
