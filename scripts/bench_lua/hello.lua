-- Benchmark case "hello": the smallest response (hello.php does the same).
function main(env, con)
  con:puts("Hello, world!")
end
