"""The ``luafcgid`` command: start, stop, reload, status, request, paths.

Exit codes, as LSB init scripts expect: 0 ok, 1 failure (bad config, already running,
could not start, a failed reload), 3 not running (``status``). ``stop`` on a stopped
server exits 0.

``stop``, ``status`` and ``reload`` find the running master through its pidfile:
``--pidfile``, else the config's ``pidfile``. The config file on disk may have been
broken since the server started: then they say so, read just its ``pidfile`` setting if
the file still runs (else take the default), tell which pidfile they use, and go on, so
a broken file never keeps an operator from stopping the server. What they need of the
running config (``graceful_timeout``, threads per process) comes from the master's
``<pidfile>.status`` (JSON, replaced atomically whenever a worker reports, starts or
exits; ``status`` shows its figures, as of the last heartbeat). ``reload`` sends HUP
and waits for the master's verdict in that file: the new workers serve, or the reload
failed (a refused config, new workers that cannot boot) and the previous config runs on.
``request`` is a FastCGI client (luafcgid.client): one request, the answer printed, exit 1
on a 5xx answer or when the server cannot be reached — a health check.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import NoReturn, Optional, Tuple

import click
import psutil

from luafcgid import __version__, client, config
from luafcgid import log as logging_setup
from luafcgid import status as pool_status
from luafcgid.arbiter import Arbiter, StartError
from luafcgid.config import Settings
from luafcgid.daemon import run_detached
from luafcgid.lua import runtime as lua_runtime
from luafcgid.pidfile import Pidfile
from luafcgid.status import remove_status_file

DEFAULT_CONFIG = "/etc/luafcgid/config.lua"
START_TIMEOUT = 60.0    # s a daemonized start waits for the server to serve
RELOAD_TIMEOUT = 60.0   # s a reload waits for its outcome
POLL = 0.05             # s between two looks at the status file
KILL_WAIT = 5.0         # s to wait for processes to vanish after KILL
EXIT_NOT_RUNNING = 3

config_option = click.option(
    "-c", "--config", "config_path", default=DEFAULT_CONFIG, show_default=True,
    type=click.Path(dir_okay=False), help="The config file (Lua).")
pidfile_option = click.option(
    "--pidfile", "pidfile_path", default=None, type=click.Path(dir_okay=False),
    help="The running server's pidfile  [default: the config's pidfile]")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="luafcgid")
def main() -> None:
    """luafcgid: a prefork FastCGI application server for Lua scripts."""


@main.command()
@config_option
@click.option("-F", "--foreground", is_flag=True,
              help="Stay in the foreground (for systemd, supervisors, containers).")
def start(config_path: str, foreground: bool) -> None:
    """Start the server; without -F it daemonizes and returns once it serves."""
    config_path = os.path.abspath(config_path)
    settings = load_settings(config_path)
    try:
        logging_setup.setup(settings.logfile, settings.loglevel)
    except OSError as error:
        fail(f"cannot open the log file {settings.logfile}: {error.strerror}")
    arbiter = Arbiter(config_path, settings)
    try:
        arbiter.prepare()
    except StartError as error:
        fail(str(error))
    if foreground:
        sys.exit(arbiter.run())
    if not settings.logfile:
        click.echo("luafcgid: no logfile in the config: the daemon's log is discarded "
                   "(set logfile, or run with -F)", err=True)
    outcome, detail = run_detached(arbiter.run, START_TIMEOUT)
    where = f"see the log ({settings.logfile})" if settings.logfile else "set logfile to see why"
    if outcome == "ready":
        pid = Pidfile(settings.pidfile).read()
        click.echo(f"luafcgid started (pid {pid}), serving on {settings.listen}")
    elif outcome == "error":
        fail(f"{detail}; the log: {settings.logfile}" if settings.logfile else detail)
    elif outcome == "timeout":
        fail(f"luafcgid did not serve within {START_TIMEOUT:g} s; {where}")
    else:
        fail(f"luafcgid exited while starting; {where}")


@main.command()
@config_option
@pidfile_option
@click.option("--timeout", type=float, default=None,
              help="Seconds to wait before KILL  [default: graceful_timeout + 5]")
def stop(config_path: str, pidfile_path: Optional[str], timeout: Optional[float]) -> None:
    """Stop the server gracefully (TERM), KILL it after the timeout."""
    target = locate(config_path, pidfile_path)
    pidfile = Pidfile(target.pidfile)
    pid = running_pid(pidfile)
    if pid is None:
        click.echo("luafcgid is not running")
        return
    if timeout is None:
        timeout = target.graceful_timeout() + 5
    signal_master(pid, signal.SIGTERM)
    if wait_gone(pid, timeout):
        click.echo(f"luafcgid (pid {pid}) stopped")
        return
    click.echo(f"luafcgid (pid {pid}) did not stop within {timeout:g} s: killing it", err=True)
    kill_tree(pid)
    if not wait_gone(pid, KILL_WAIT):
        fail(f"luafcgid (pid {pid}) survived KILL")
    pidfile.remove(pid)
    remove_status_file(target.pidfile)
    click.echo(f"luafcgid (pid {pid}) killed")


@main.command()
@config_option
@pidfile_option
@click.option("--timeout", type=float, default=RELOAD_TIMEOUT, show_default=True,
              help="Seconds to wait for the new workers to serve (or to fail).")
def reload(config_path: str, pidfile_path: Optional[str], timeout: float) -> None:
    """Re-read the config and replace the workers gracefully (HUP); wait for the outcome
    (exit 1 when the reload failed: the previous config keeps running)."""
    target = locate(config_path, pidfile_path)
    pid = running_pid(Pidfile(target.pidfile))
    if pid is None:
        fail("luafcgid is not running")
    before = reload_record(target.pidfile, pid).get("number", 0)
    signal_master(pid, signal.SIGHUP)
    outcome = wait_for_reload(target.pidfile, pid, before, timeout)
    if outcome is None:
        fail(f"reload of luafcgid (pid {pid}): no outcome within {timeout:g} s; "
             "'luafcgid status' shows how it goes")
    if outcome.get("state") != "done":
        fail(f"reload failed: {outcome.get('reason') or 'the server gave no reason'}; "
             f"luafcgid (pid {pid}) still runs the previous config")
    click.echo(f"luafcgid (pid {pid}) reloaded: the new workers serve")


@main.command()
@config_option
@pidfile_option
def status(config_path: str, pidfile_path: Optional[str]) -> None:
    """Master and workers: pid, RSS, requests served, states loaded, uptime (exit 3: stopped)."""
    target = locate(config_path, pidfile_path)
    pid = running_pid(Pidfile(target.pidfile))
    if pid is None:
        click.echo("luafcgid is not running")
        sys.exit(EXIT_NOT_RUNNING)
    snapshot = pool_status.read_snapshot_at(target.pidfile)
    if not snapshot or snapshot.get("pid") != pid:
        click.echo(f"luafcgid is running (pid {pid}); no figures yet")
        return
    settings = target.settings or config.defaults()
    click.echo(pool_status.as_text(pool_status.build(settings, snapshot)), nl=False)


@main.command()
@click.option("-c", "--config", "config_path", default=None, type=click.Path(dir_okay=False),
              help=f"The config file: its listen and root  [default: {DEFAULT_CONFIG}, "
                   "unless --connect is given]")
@click.option("--connect", "address", metavar="ADDR",
              help="host:port, [v6]:port or a unix socket path, instead of the config's listen.")
@click.option("--root", type=click.Path(file_okay=False),
              help="Document root for a /path target  [default: the config's root, else "
                   "the current directory]")
@click.option("-X", "--request", "method", default=None, metavar="METHOD",
              help="Request method  [default: GET, POST with -d]")
@click.option("-d", "--data", metavar="BODY",
              help="Request body; @FILE reads a file, @- standard input.")
@click.option("-H", "--header", "headers", multiple=True, metavar="'Name: value'",
              help="A request header (repeatable), sent as HTTP_NAME.")
@click.option("-i", "--include", is_flag=True, help="Print the response head too.")
@click.option("--timeout", type=float, default=30.0, show_default=True,
              help="Seconds to wait for the connection and for each read.")
@click.argument("target", metavar="SCRIPT_PATH_OR_URL")
def request(config_path: Optional[str], address: Optional[str], root: Optional[str],
            method: Optional[str], data: Optional[str], headers: Tuple[str, ...],
            include: bool, timeout: float, target: str) -> None:
    """Send one FastCGI request and print the answer (exit 1 on 5xx or no answer).

    SCRIPT_PATH_OR_URL is a script file (./hello.lua, /srv/www/hello.lua) or, when no
    such file exists, a URL path with an optional query (/hello.lua?name=x, /ping)
    resolved against the document root: --root, the config's root, else the current
    directory (as php -S takes it).
    """
    if config_path is not None or address is None:
        settings = load_settings(config_path or DEFAULT_CONFIG)
        address = address or settings.listen
        root = root or settings.root
    guessed_root = root is None and is_url_path(target)
    if guessed_root:
        root = os.getcwd()
    body = read_body(data)
    script_name, filename, query = resolve_target(target, root)
    params = client.cgi_params(
        script_name, filename, os.path.abspath(root) if root else None, query,
        method or ("POST" if data is not None else "GET"), body,
        parse_headers(headers, body))
    try:
        answer = client.request(address, params, body, timeout)
    except client.ClientError as error:
        fail(str(error))
    if answer.stderr:
        click.echo(answer.stderr.decode("utf-8", "replace"), err=True, nl=False)
    out = click.get_binary_stream("stdout")
    if include:
        out.write(answer.head.replace(b"\r\n", b"\n") + b"\n\n")
    out.write(answer.body)
    out.flush()
    if guessed_root and answer.status in (403, 404, 500):
        click.echo(f"luafcgid: no document root given (--root DIR, or root in the config): "
                   f"{target.partition('?')[0]} was taken from the current directory {root}",
                   err=True)
    if answer.status >= 500:
        fail(f"the server answered {answer.status}")


@main.command()
@config_option
@click.option("--root", type=click.Path(file_okay=False),
              help="The document root  [default: the config's root, else the script's "
                   "directory]")
@click.argument("script", required=False, metavar="[SCRIPT]")
def paths(config_path: str, root: Optional[str], script: Optional[str]) -> None:
    """Where a script's Lua state looks for modules: package.path, package.cpath.

    SCRIPT defaults to index.lua in the document root. The environment's LUA_PATH and
    LUA_CPATH count as they would for a server started from this shell.
    """
    settings = load_settings(config_path)
    if script is not None:
        script = os.path.abspath(script)
    root = os.path.abspath(root or settings.root or
                           (os.path.dirname(script) if script else os.getcwd()))
    script = script or os.path.join(root, "index.lua")
    base = lua_runtime.base_paths(settings.lua, settings.lua_path, settings.lua_cpath)
    path, cpath = lua_runtime.package_paths(settings.lua, os.path.dirname(script), root, base)
    click.echo(f"lua = \"{settings.lua}\" (modules built for Lua "
               f"{lua_runtime.MODULE_VERSIONS[settings.lua]}); script {script}, "
               f"document root {root}")
    for name, value in (("package.path", path), ("package.cpath", cpath)):
        click.echo(name)
        for entry in value.split(";"):
            place = entry.split("?")[0] if "?" in entry else entry
            gone = "" if os.path.exists(place) else "   (does not exist)"
            click.echo(f"  {entry}{gone}")


# -- finding and signalling the running server -------------------------------------------------


class Target:
    """The running server as the CLI finds it: its pidfile, and its settings when the
    config file loads (None when it has an error)."""

    def __init__(self, pidfile: str, settings: Optional[Settings]) -> None:
        self.pidfile = pidfile
        self.settings = settings

    def graceful_timeout(self) -> float:
        """The running master's (from its status file), else the config's, else 30."""
        snapshot = pool_status.read_snapshot_at(self.pidfile) or {}
        if isinstance(snapshot.get("graceful_timeout"), (int, float)):
            return float(snapshot["graceful_timeout"])
        return self.settings.graceful_timeout if self.settings else config.defaults(
            ).graceful_timeout


def locate(config_path: str, pidfile_path: Optional[str]) -> Target:
    """Where the running server's pidfile is: ``--pidfile``, else the config's; a broken
    config file is reported and its ``pidfile`` read leniently (config.pidfile_of)."""
    try:
        settings: Optional[Settings] = config.load(config_path)
    except config.ConfigError as error:
        settings = None
        problem = str(error)
    if pidfile_path is not None:
        return Target(os.path.abspath(pidfile_path), settings)
    if settings is not None:
        return Target(settings.pidfile, settings)
    pidfile, source = config.pidfile_of(config_path)
    click.echo(f"luafcgid: the config file has an error: {problem}", err=True)
    click.echo(f"luafcgid: using the pidfile {pidfile} ({source}; --pidfile gives another)",
               err=True)
    return Target(pidfile, None)


def running_pid(pidfile: Pidfile) -> Optional[int]:
    try:
        return pidfile.running()
    except OSError as error:
        fail(f"cannot read the pidfile {pidfile.path}: {error.strerror}")


def signal_master(pid: int, signum: int) -> None:
    """Send ``signum`` to the master; a server of another user is an error that says so."""
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        fail(f"luafcgid (pid {pid}) exited meanwhile")
    except PermissionError:
        owner = process_owner(pid)
        fail(f"permission denied: the server (pid {pid}) runs as {owner}; run this as {owner}")


def process_owner(pid: int) -> str:
    try:
        return psutil.Process(pid).username()
    except (psutil.Error, KeyError):
        return "another user"


def reload_record(pidfile: str, pid: int) -> dict:
    """The master's record of its last reload (number, state, reason); {} when none."""
    snapshot = pool_status.read_snapshot_at(pidfile)
    if not snapshot or snapshot.get("pid") != pid:
        return {}
    record = snapshot.get("reload")
    return record if isinstance(record, dict) else {}


def wait_for_reload(pidfile: str, pid: int, before: int, timeout: float) -> Optional[dict]:
    """The outcome of the reload after number ``before``; None when none came in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = reload_record(pidfile, pid)
        if record.get("number", 0) > before and record.get("state") != "pending":
            return record
        if not alive(pid):
            return {"state": "failed", "reason": "the server exited"}
        time.sleep(POLL)
    return None


# -- helpers ----------------------------------------------------------------------------------


def load_settings(config_path: str) -> Settings:
    try:
        return config.load(config_path)
    except config.ConfigError as error:
        fail(str(error), prefix="")
    except OSError as error:
        fail(f"{config_path}: {error.strerror}", prefix="")


def fail(message: str, prefix: str = "luafcgid: ") -> NoReturn:
    click.echo(prefix + message, err=True)
    sys.exit(1)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def kill_tree(pid: int) -> None:
    """KILL the master, its workers (left alone they would wait for their master) and the
    processes scripts started (an ``os.execute`` child would outlive them all)."""
    try:
        master = psutil.Process(pid)
        processes = [master] + master.children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def is_url_path(target: str) -> bool:
    """True when ``request`` takes ``target`` as a URL path, not as a script file."""
    path = target.partition("?")[0]
    return path.startswith("/") and not os.path.isfile(path)


def resolve_target(target: str, root: Optional[str]) -> Tuple[str, Optional[str], str]:
    """(SCRIPT_NAME, SCRIPT_FILENAME, QUERY_STRING) for ``request``'s target.

    A relative path or an existing file is a script on disk; anything else starting with
    "/" is a URL path under ``root`` (no SCRIPT_FILENAME without a root: enough for the
    ping and status paths, which need no script).
    """
    path, _, query = target.partition("?")
    if not is_url_path(target):
        filename = os.path.abspath(path)
        base = os.path.abspath(root).rstrip("/") if root else None
        inside = base is not None and filename.startswith(base + "/")
        return (filename[len(base):] if inside else filename), filename, query
    if root is None:
        return path, None, query
    return path, os.path.abspath(root).rstrip("/") + path, query


def read_body(data: Optional[str]) -> bytes:
    if data is None:
        return b""
    if not data.startswith("@"):
        return data.encode()
    if data == "@-":
        return click.get_binary_stream("stdin").read()
    try:
        with open(data[1:], "rb") as file:
            return file.read()
    except OSError as error:
        fail(f"{data[1:]}: {error.strerror}")


def parse_headers(lines: Tuple[str, ...], body: bytes) -> dict:
    """-H lines → name: value; a body gets curl's default Content-Type."""
    headers = {"Content-Type": "application/x-www-form-urlencoded"} if body else {}
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon or not name.strip():
            fail(f"-H {line!r}: expected 'Name: value'")
        headers[name.strip()] = value.strip()
    return headers
