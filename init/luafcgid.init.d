#!/bin/sh
### BEGIN INIT INFO
# Provides:          luafcgid
# Required-Start:    $local_fs $remote_fs $network $syslog
# Required-Stop:     $local_fs $remote_fs $network $syslog
# Should-Start:      $named
# Default-Start:     2 3 4 5
# Default-Stop:      0 1 6
# Short-Description: luafcgid FastCGI application server for Lua
# Description:       luafcgid runs Lua scripts for a web server (nginx, ...) over FastCGI:
#                    a master process and a pool of prefork worker processes.
### END INIT INFO

# Install as /etc/init.d/luafcgid. Settings can be overridden in /etc/default/luafcgid:
#   LUAFCGID         the luafcgid command (found first in /opt/luafcgid/bin, the venv of
#                    the README's install, then in PATH)
#   LUAFCGID_CONFIG  the config file (pidfile, listen address ... are read from it)
#   STOP_TIMEOUT     seconds a stop waits for requests to finish before KILL (empty:
#                    the config's graceful_timeout + 5)
#   RUNDIR, LOGDIR   directories made (root's, mode 0755) before a start: those of
#                    init/config.lua's socket, pidfile and logs
# The luafcgid command itself does the work: it daemonizes, writes the pidfile and returns
# only once the server accepts requests, and its exit codes are the LSB ones. `reload`
# waits for the new workers and fails, saying why, when the reload failed.

PATH=/opt/luafcgid/bin:/sbin:/bin:/usr/sbin:/usr/bin:/usr/local/sbin:/usr/local/bin
NAME=luafcgid
DESC="FastCGI server for Lua"

LUAFCGID=${LUAFCGID:-luafcgid}
LUAFCGID_CONFIG=${LUAFCGID_CONFIG:-/etc/luafcgid/config.lua}
STOP_TIMEOUT=${STOP_TIMEOUT:-}
RUNDIR=${RUNDIR:-/run/luafcgid}
LOGDIR=${LOGDIR:-/var/log/luafcgid}

[ -r /etc/default/$NAME ] && . /etc/default/$NAME

if [ -r /lib/lsb/init-functions ]; then
    . /lib/lsb/init-functions
else
    log_daemon_msg() { printf '%s: %s' "$1" "$2"; }
    log_progress_msg() { printf ' %s' "$1"; }
    log_end_msg() { if [ "$1" -eq 0 ]; then echo "."; else echo " failed!"; fi; return "$1"; }
    log_success_msg() { echo "$@"; }
    log_failure_msg() { echo "$@"; }
fi

command -v "$LUAFCGID" >/dev/null 2>&1 || { log_failure_msg "$NAME: $LUAFCGID not found"; exit 5; }

ctl() {
    action="$1"
    shift
    "$LUAFCGID" "$action" -c "$LUAFCGID_CONFIG" "$@"
}

running() {
    ctl status >/dev/null 2>&1
}

do_start() {
    if running; then
        log_progress_msg "already running"
        return 0
    fi
    # /run is a tmpfs: its directory is gone after a reboot.
    install -d -m 0755 "$RUNDIR" "$LOGDIR" || return 1
    ctl start >/dev/null
}

do_stop() {
    if [ -n "$STOP_TIMEOUT" ]; then
        ctl stop --timeout "$STOP_TIMEOUT" >/dev/null
    else
        ctl stop >/dev/null
    fi
}

case "$1" in
    start)
        log_daemon_msg "Starting $DESC" "$NAME"
        do_start
        log_end_msg $?
        ;;
    stop)
        log_daemon_msg "Stopping $DESC" "$NAME"
        do_stop
        log_end_msg $?
        ;;
    restart)
        log_daemon_msg "Restarting $DESC" "$NAME"
        do_stop && do_start
        log_end_msg $?
        ;;
    reload|force-reload)
        if ! running; then
            log_failure_msg "$NAME is not running"
            exit 7
        fi
        log_daemon_msg "Reloading $DESC" "$NAME"
        ctl reload >/dev/null
        log_end_msg $?
        ;;
    status)
        ctl status
        ;;
    *)
        echo "Usage: /etc/init.d/$NAME {start|stop|restart|reload|force-reload|status}" >&2
        exit 3
        ;;
esac
