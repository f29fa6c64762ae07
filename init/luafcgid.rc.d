#!/bin/sh
#
# PROVIDE: luafcgid
# REQUIRE: LOGIN NETWORKING
# BEFORE: nginx
# KEYWORD: shutdown
#
# luafcgid: FastCGI application server for Lua. Install as /usr/local/etc/rc.d/luafcgid
# and set in /etc/rc.conf:
#
#   luafcgid_enable="YES"
#   luafcgid_config="/usr/local/etc/luafcgid/config.lua"   # the default
#   luafcgid_command="/usr/local/bin/luafcgid"             # the default
#   luafcgid_stop_timeout=""        # seconds before KILL; empty: graceful_timeout + 5
#   luafcgid_rundir="/var/run/luafcgid"    # made before a start (socket, pidfile)
#
# The luafcgid command does the work (it daemonizes, writes the pidfile named in the
# config and returns once the server accepts), so start, stop, status and reload call it
# rather than rc.subr's pidfile and process-name checks: the master renames itself
# "luafcgid: master [CONFIG]", which check_process would not recognise.

. /etc/rc.subr

name="luafcgid"
rcvar="luafcgid_enable"

load_rc_config $name

: ${luafcgid_enable:="NO"}
: ${luafcgid_config:="/usr/local/etc/luafcgid/config.lua"}
: ${luafcgid_command:="/usr/local/bin/luafcgid"}
: ${luafcgid_stop_timeout:=""}
: ${luafcgid_rundir:="/var/run/luafcgid"}

command="${luafcgid_command}"
required_files="${luafcgid_config}"
extra_commands="reload"

start_cmd="luafcgid_start"
stop_cmd="luafcgid_stop"
status_cmd="luafcgid_status"
reload_cmd="luafcgid_reload"

luafcgid_start()
{
	if ${command} status -c "${luafcgid_config}" >/dev/null 2>&1; then
		echo "${name} already running."
		return 0
	fi
	echo "Starting ${name}."
	install -d -m 0755 "${luafcgid_rundir}" || return 1
	${command} start -c "${luafcgid_config}" >/dev/null
}

luafcgid_stop()
{
	echo "Stopping ${name}."
	${command} stop -c "${luafcgid_config}" \
	    ${luafcgid_stop_timeout:+--timeout "${luafcgid_stop_timeout}"}
}

luafcgid_status()
{
	${command} status -c "${luafcgid_config}"
}

luafcgid_reload()
{
	echo "Reloading ${name} configuration."
	${command} reload -c "${luafcgid_config}" >/dev/null
}

run_rc_command "$1"
