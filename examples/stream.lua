-- con:flush() sends what is buffered now; after the first flush the response streams.
function main(env, con)
    con:header("Content-Type", "text/plain")
    for i = 1, 5 do
        con:puts("line " .. i .. "\n")
        con:flush()
    end
end
