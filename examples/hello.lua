-- The smallest luafcgid script: the handler is the global function `main`.
function main(env, con)
    con:header("Content-Type", "text/plain")
    con:puts("Hello, world!\n")
end
