-- A luafcgid2-style script: globals instead of parameters.
function main()
    RespContentType("text/plain")
    Header("X-Example", "luafcgid2")
    Send("Method: " .. (Env.REQUEST_METHOD or "?") .. "\n")
    Send("Served by state " .. Info.State .. " on thread " .. Info.Thread .. "\n")
    for name, value in pairs(Cookies) do
        Send("Cookie " .. name .. " = " .. value .. "\n")
    end
end
