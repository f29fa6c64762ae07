"""The ``luafcgid`` command: start, stop, reload, status.

Exit codes, as LSB init scripts expect: 0 ok, 1 failure (bad config, already running,
could not start), 3 not running (``status``). ``stop`` on a stopped server exits 0.
Every command finds the running master through the ``pidfile`` of its config.
``status`` shows the figures the master keeps in ``<pidfile>.status`` (JSON, replaced
atomically whenever a worker reports, starts or exits): they are as of the last heartbeat.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import NoReturn, Optional

import click
import psutil

from luafcgid import __version__, config
from luafcgid import log as logging_setup
from luafcgid.arbiter import Arbiter, StartError, status_path
from luafcgid.config import Settings
from luafcgid.daemon import run_detached
from luafcgid.pidfile import Pidfile

DEFAULT_CONFIG = "/etc/luafcgid/config.lua"
START_TIMEOUT = 60.0    # s a daemonized start waits for the server to serve
KILL_WAIT = 5.0         # s to wait for processes to vanish after KILL
EXIT_NOT_RUNNING = 3

config_option = click.option(
    "-c", "--config", "config_path", default=DEFAULT_CONFIG, show_default=True,
    type=click.Path(dir_okay=False), help="The config file (Lua).")


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
        fail(detail)
    elif outcome == "timeout":
        fail(f"luafcgid did not serve within {START_TIMEOUT:g} s; {where}")
    else:
        fail(f"luafcgid exited while starting; {where}")


@main.command()
@config_option
@click.option("--timeout", type=float, default=None,
              help="Seconds to wait before KILL  [default: graceful_timeout + 5]")
def stop(config_path: str, timeout: Optional[float]) -> None:
    """Stop the server gracefully (TERM), KILL it after the timeout."""
    settings = load_settings(config_path)
    pidfile = Pidfile(settings.pidfile)
    pid = pidfile.running()
    if pid is None:
        click.echo("luafcgid is not running")
        return
    if timeout is None:
        timeout = settings.graceful_timeout + 5
    os.kill(pid, signal.SIGTERM)
    if wait_gone(pid, timeout):
        click.echo(f"luafcgid (pid {pid}) stopped")
        return
    click.echo(f"luafcgid (pid {pid}) did not stop within {timeout:g} s: killing it", err=True)
    kill_tree(pid)
    if not wait_gone(pid, KILL_WAIT):
        fail(f"luafcgid (pid {pid}) survived KILL")
    pidfile.remove(pid)
    remove_file(status_path(settings.pidfile))
    click.echo(f"luafcgid (pid {pid}) killed")


@main.command()
@config_option
def reload(config_path: str) -> None:
    """Re-read the config and replace the workers gracefully (HUP)."""
    settings = load_settings(config_path)
    pid = Pidfile(settings.pidfile).running()
    if pid is None:
        fail("luafcgid is not running")
    os.kill(pid, signal.SIGHUP)
    click.echo(f"luafcgid (pid {pid}): reload requested; the log tells how it went")


@main.command()
@config_option
def status(config_path: str) -> None:
    """Master and workers: pid, RSS, requests served, states loaded, uptime (exit 3: stopped)."""
    settings = load_settings(config_path)
    pid = Pidfile(settings.pidfile).running()
    if pid is None:
        click.echo("luafcgid is not running")
        sys.exit(EXIT_NOT_RUNNING)
    try:
        with open(status_path(settings.pidfile)) as file:
            figures = json.load(file)
    except (OSError, ValueError):
        figures = None
    if not figures or figures.get("pid") != pid:
        click.echo(f"luafcgid is running (pid {pid}); no figures yet")
        return
    click.echo(format_status(figures))


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
    """KILL the master and its workers (left alone they would wait for their master)."""
    try:
        master = psutil.Process(pid)
        processes = [master] + master.children()
    except psutil.NoSuchProcess:
        return
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def remove_file(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def format_status(figures: dict) -> str:
    now = time.time()
    lines = [
        f"luafcgid {__version__}: master pid {figures['pid']}, up "
        f"{format_duration(now - figures['started'])}, RSS {format_mib(figures['rss'])}",
        f"config {figures['config']}, listening on {figures['listen']}, "
        f"{figures['processes']} worker process(es) wanted",
        f"figures as of {now - figures['updated']:.0f} s ago "
        f"(heartbeat every {figures['sweep'] / 1000:g} s)",
        f"{'worker':>6} {'pid':>7} {'RSS':>10} {'requests':>9} {'busy':>5} {'states':>6} "
        f"{'uptime':>10}  state",
    ]
    for worker in figures["workers"]:
        lines.append(
            f"{worker['number']:>6} {worker['pid']:>7} {format_mib(worker['rss']):>10} "
            f"{blank_if_none(worker['requests']):>9} {blank_if_none(worker['busy']):>5} "
            f"{blank_if_none(worker['states']):>6} "
            f"{format_duration(now - worker['started']):>10}  {worker['state']}")
    return "\n".join(lines)


def format_mib(size: Optional[int]) -> str:
    return f"{size / 1048576:.1f} MiB" if size else "-"


def blank_if_none(value: object) -> str:
    return "-" if value is None else str(value)


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(max(0.0, seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    clock = f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{days}d {clock}" if days else clock
