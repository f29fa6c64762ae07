-- luafcgid config for a production server behind nginx, as init/luafcgid.service and
-- init/luafcgid.init.d run it. Install it as /etc/luafcgid/config.lua, then set root
-- (and Config) for your site. Every key is described in docs/spec.md section 6.
--
-- The master runs as root: it binds the socket, writes the pidfile and the logs, then
-- starts the workers, which switch to `user`. The unit and the init.d script create
-- /run/luafcgid/ (root's, mode 0755) before the start.

-- A unix socket in /run/luafcgid/. nginx runs as www-data on Debian: the socket is
-- handed to it (socket_owner), so `fastcgi_pass unix:/run/luafcgid/luafcgid.sock;`
-- connects, and nobody else can (socket_mode). Without socket_owner the socket stays
-- root's and nginx answers 502.
listen = "/run/luafcgid/luafcgid.sock"
socket_owner = "www-data"
socket_mode = "0660"
pidfile = "/run/luafcgid/luafcgid.pid"

-- The workers' account, like php-fpm's: it must read the scripts, never write them.
user = "www-data"
group = "www-data"

-- Scripts must resolve inside this directory (the start is refused when www-data
-- cannot reach it).
root = "/var/www"

-- Worker processes (default: one per CPU) and threads (concurrent requests) in each.
-- processes = 4
workers = 4

-- Seconds a handler may run; a stopping worker's grace period.
timeout = 30
graceful_timeout = 30

-- No Lua error text in 500 pages on a public server (it is in the log).
showerrors = false

-- The logs, in /var/log/luafcgid/ (the unit and the init.d script create it). Without
-- logfile, the unit's log goes to the journal. Rotate with the logrotate snippet of
-- the README (USR1 reopens them).
logfile = "/var/log/luafcgid/error.log"
-- One entry, with the Lua traceback, for each request still running after
-- slowlog_timeout seconds (0: off); without slowlog they go to logfile.
slowlog = "/var/log/luafcgid/slow.log"
slowlog_timeout = 5

-- Sessions: SQLite in /run/luafcgid/luafcgid-sessions/ by default (lost at reboot:
-- /run is a tmpfs). To keep them, the master makes the last directory for www-data:
-- session_store = "sqlite:/var/lib/luafcgid/sessions.db"

Config = {}
