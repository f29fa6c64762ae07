--[[
notes_db.lua: the storage of the notes board (notes.lua), in SQLite through LuaSQL's C
driver (Debian: apt-get install lua-sql-sqlite3; LuaRocks: luasql-sqlite3).

The persistent-connection pattern. A required module lives as long as the Lua state that
required it, so its locals do too: `connection` below is opened at the first query a
state runs and reused by every later request that state serves, instead of once per
request. A state serves one request at a time, so its connection needs no lock. Each
worker process keeps several states, and there are several processes: they all open the
same file, so every connection waits for the others' write locks (busy_timeout) and the
file is in WAL mode (readers never wait for the writer).

When a query fails, the connection or what it set up may be what broke (a server database
restarted; here, the table was dropped by hand to empty the board). So a failed query
closes the connection, opens a new one (which runs SETUP again: the table is back) and
tries once more before it reports the error. Each statement here runs on its own
(autocommit), so a failed one wrote nothing and running it again is safe. What no error
reveals: a database file replaced or removed under open connections (a restored backup)
is not seen by them, as with any SQLite program; after replacing it, `luafcgid reload`.

    db.use(path)              the file to open (nothing is opened yet)
    db.recent(limit)          the newest notes: {id=, author=, body=, created=}, newest first
    db.add(author, body, t)   store a note written at time t (os.time()); its id
    db.info()                 {queries=, opened=}: this state's connection, for the footer
    db.close()                drop the connection (the next query opens a new one)
]]

local sqlite3 = require("luasql.sqlite3")

local format, type, pcall, error, ipairs, tostring = string.format, type, pcall, error, ipairs,
    tostring
local os_time = os.time

local M = {}

local path            -- the database file, from db.use
local environment     -- LuaSQL's environment object: one per state
local connection      -- this state's connection, or nil until the first query
local opened = 0      -- when it was opened (os.time)
local queries = 0     -- queries it has run

-- Run on every new connection. busy_timeout comes first: the other statements may have to
-- wait for another state's lock.
local SETUP = {
    "PRAGMA busy_timeout = 5000",
    "PRAGMA journal_mode = WAL",
    [[CREATE TABLE IF NOT EXISTS notes (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        author TEXT NOT NULL,
        body TEXT NOT NULL,
        created INTEGER NOT NULL)]],
}

-- A statement whose rows are not wanted: its cursor (PRAGMAs answer with a row) is closed.
local function run(conn, sql)
    local result, err = conn:execute(sql)
    if result == nil then
        return nil, err
    end
    if type(result) ~= "number" then
        result:close()
    end
    return true
end

local function cannot_write(err)
    return format("notes: cannot use the SQLite database %s (%s): set Config.notes_db in the "
        .. "config file to a file in a directory that the workers' user (the config's `user`) "
        .. "can write", path, err)
end

local function connect()
    if not path then
        error("notes: no database file: call db.use(path) first", 0)
    end
    environment = environment or sqlite3.sqlite3()
    local conn, err = environment:connect(path)
    if not conn then
        error(cannot_write(err), 0)
    end
    for _, sql in ipairs(SETUP) do
        local ok, setup_err = run(conn, sql)
        if not ok then
            conn:close()
            error(cannot_write(setup_err), 0)
        end
    end
    connection, opened, queries = conn, os_time(), 0
end

function M.close()
    if connection then
        pcall(connection.close, connection)
        connection = nil
    end
end

-- fn(conn) → a result, or nil and a message (or it raises). Reconnects once on failure.
local function with_connection(fn)
    for attempt = 1, 2 do
        if not connection then
            connect()
        end
        local ok, result, err = pcall(fn, connection)
        if ok and result ~= nil then
            queries = queries + 1
            return result
        end
        M.close()
        if attempt == 2 then
            error(format("notes: database %s: %s", path, tostring(ok and err or result)), 0)
        end
    end
end

function M.use(file)
    if file ~= path then
        M.close()
        path = file
    end
end

function M.recent(limit)
    return with_connection(function(conn)
        local cursor, err = conn:execute(format(
            "SELECT id, author, body, created FROM notes ORDER BY id DESC LIMIT %d", limit))
        if not cursor then
            return nil, err
        end
        local notes = {}
        local row = cursor:fetch({}, "a")
        while row do
            notes[#notes + 1] = row
            row = cursor:fetch({}, "a")
        end
        cursor:close()
        return notes
    end)
end

-- The strings are checked by the caller (notes.lua refuses NUL and other control
-- characters, which conn:escape would cut at).
function M.add(author, body, created)
    return with_connection(function(conn)
        local count, err = conn:execute(format(
            "INSERT INTO notes (author, body, created) VALUES ('%s', '%s', %d)",
            conn:escape(author), conn:escape(body), created))
        if not count then
            return nil, err
        end
        return conn:getlastautoid()
    end)
end

function M.info()
    return {queries = queries, opened = opened, open = connection ~= nil}
end

return M
