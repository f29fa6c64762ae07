-- Globals live as long as the Lua state: each state of this script counts its own hits.
-- (Every worker process, and every clone in it, has its own state and so its own count.)
hits = 0

function main(env, con)
    hits = hits + 1
    con:header("Content-Type", "text/plain")
    con:puts("This state has served " .. hits .. " request(s).\n")
end
