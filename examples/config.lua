-- luafcgid config for the example scripts in this directory.
--
-- This file is Lua, run once when the server starts (and again on SIGHUP): every
-- global it sets is a setting, and an unknown global is refused, so keep helper
-- variables `local`. Relative paths are taken from this file's directory.
-- Try it:  luafcgid start -F -c examples/config.lua

-- Where nginx reaches us: "host:port", "[::1]:port" or a unix socket path.
listen = "127.0.0.1:9000"
-- listen = "/run/luafcgid/luafcgid.sock"

-- Worker processes, and threads (concurrent requests) in each.
processes = 2
workers = 4

-- Lua states each worker process keeps (default 2 * workers), and how many of
-- them one script may hold (default: all of them).
-- states = 8
-- clones = 8

-- Heartbeat in milliseconds: changed scripts are reloaded within one period.
sweep = 10000

-- Put the Lua error message in 500 pages. Handy while developing; turn it off
-- on a public server.
showerrors = true

-- Script files allowed (by extension); requests for anything else get 403.
-- extensions = {".lua"}

-- When set, scripts must resolve inside this directory.
-- root = "."

-- Seconds a handler may run before it is stopped with a 500.
timeout = 30

-- Not /run: the examples run without root.
pidfile = "/tmp/luafcgid-examples.pid"

-- Started as root, the workers switch to this account (ignored otherwise), which
-- must be able to read the scripts. "root" keeps them root: only for this demo, on
-- 127.0.0.1, so that it runs from a checkout other users cannot read (say in /root);
-- the server warns about it at start. A real server gives its workers an account of
-- their own (php-fpm's www-data): see init/config.lua.
user = "root"

-- Sessions (session.lua): a SQLite file in luafcgid-sessions/ beside the pidfile,
-- shared by the worker processes. For several hosts: "redis://127.0.0.1:6379/0".
-- session_store = "sqlite"
-- The session cookie is Secure by default (sent only over HTTPS); the examples are
-- plain HTTP.
SessionCookieSecure = false

-- Handed to every script as the global `Config`, and readable with con:config(name).
Config = {
    site_name = "luafcgid examples",
    -- notes.lua's SQLite file, made by the workers: its directory must be writable by
    -- them (as `user` when started as root).
    notes_db = "/tmp/luafcgid-examples-notes.db",
}
