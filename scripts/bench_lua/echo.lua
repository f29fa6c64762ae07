-- Benchmark case "echo": answer with the request body (a 4 KiB POST; echo.php does the same).
function main(env, con)
  con:puts(con:gets())
end
