-- Runs a luafcgid script inside nginx (lua-nginx-module), for scripts/bench's "nginx-lua"
-- server: the same hello.lua, echo.lua and page.lua, unchanged.
--
--   content_by_lua_block { require("nginx_shim")("/path/to/hello.lua") }
--
-- Each script is loaded once per nginx worker into its own global table (as a luafcgid
-- state keeps its globals) and its main(env, con) is called per request. env is ngx.var
-- (looked up lazily); con has the two methods the benchmark scripts use.

local Con = {}
Con.__index = Con

function Con:puts(s)
  local n = self.n + 1
  self.n = n
  self.out[n] = s
end

function Con:gets()
  ngx.req.read_body()
  return ngx.req.get_body_data() or ""
end

local handlers = {}

local function load(path)
  local chunk = assert(loadfile(path))
  local globals = setmetatable({}, {__index = _G})
  setfenv(chunk, globals)
  chunk()
  return assert(globals.main, path .. " defines no main(env, con)")
end

return function(path)
  local main = handlers[path]
  if not main then
    main = load(path)
    handlers[path] = main
  end
  local con = setmetatable({out = {}, n = 0}, Con)
  main(ngx.var, con)
  ngx.print(con.out)
end
