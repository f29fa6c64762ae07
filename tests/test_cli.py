"""The ``luafcgid`` command, run as a real process: exit codes, messages, files left behind."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from luafcgid import __version__
from tests.support import Server, accepts, as_root, fcgi_call, wait_until, write_config


def luafcgid(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "luafcgid", *args], capture_output=True,
                          text=True, timeout=timeout)


class Setup:
    """A config (and a hello.lua) in a tmp dir, and the paths the server will use."""

    def __init__(self, base: Path, **settings: object) -> None:
        base.mkdir(exist_ok=True)
        self.script = base / "hello.lua"
        self.script.write_text('function main(env, con) con:puts("hello") end')
        self.socket = base / "fcgi.sock"
        self.pidfile = base / "luafcgid.pid"
        self.settings = {"listen": str(self.socket), "processes": 2, "sweep": 100,
                         "pidfile": str(self.pidfile), "logfile": str(base / "luafcgid.log"),
                         **as_root(), **settings}
        self.config = write_config(base / "config.lua", **self.settings)

    def run(self, command: str, *args: str) -> subprocess.CompletedProcess:
        return luafcgid(command, "-c", str(self.config), *args)

    def get(self) -> bytes:
        return fcgi_call(str(self.settings["listen"]),
                         {"SCRIPT_FILENAME": str(self.script), "REQUEST_METHOD": "GET"})

    def master(self) -> int:
        return int(self.pidfile.read_text())

    def status_file(self) -> dict:
        return json.loads(Path(f"{self.pidfile}.status").read_text())


def gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def setup(tmp_path):
    made = Setup(tmp_path)
    yield made
    if made.pidfile.exists():  # a test failed half-way: leave no daemon behind
        made.run("stop", "--timeout", "5")


def test_help_and_version():
    for command in ([], ["start"], ["stop"], ["reload"], ["status"]):
        result = luafcgid(*command, "--help")
        assert result.returncode == 0, result.stderr
        assert "Usage: " in result.stdout
        if command:
            assert "--config" in result.stdout
    assert "--foreground" in luafcgid("start", "--help").stdout
    assert "--timeout" in luafcgid("stop", "--help").stdout
    version = luafcgid("--version")
    assert version.returncode == 0 and __version__ in version.stdout


@pytest.mark.parametrize("foreground", [True, False])
def test_a_bad_config_is_refused_with_file_key_and_reason(tmp_path, foreground):
    config = write_config(tmp_path / "config.lua", processes="many",
                          pidfile=str(tmp_path / "p.pid"))
    result = luafcgid("start", "-c", str(config), *(["-F"] if foreground else []))
    assert result.returncode == 1
    assert result.stderr.startswith(f"{config}: processes: ")
    assert not (tmp_path / "p.pid").exists()


def test_daemon_start_status_reload_stop(setup):
    started = setup.run("start")
    assert started.returncode == 0, started.stderr
    # Returned only once serving: no wait needed here.
    assert accepts(str(setup.socket)) and setup.get().endswith(b"hello")
    master = setup.master()
    master_process = psutil.Process(master)
    assert master_process.cmdline()[0] == f"luafcgid: master [{setup.config}]"
    assert f"pid {master}" in started.stdout

    wait_until(lambda: [w["state"] for w in setup.status_file()["workers"]] == ["serving"] * 2,
               what="both workers in the status file")
    status = setup.run("status")
    assert status.returncode == 0
    assert f"master pid {master}" in status.stdout
    worker_lines = [line.split() for line in status.stdout.splitlines()[4:]]
    assert [line[0] for line in worker_lines] == ["1", "2"]
    assert {int(line[1]) for line in worker_lines} == {p.pid for p in
                                                       psutil.Process(master).children()}

    second = setup.run("start")
    assert second.returncode == 1
    assert f"already running (pid {master}" in second.stderr

    old_workers = {p.pid for p in psutil.Process(master).children()}
    reloaded = setup.run("reload")
    assert reloaded.returncode == 0
    wait_until(lambda: {w["pid"] for w in setup.status_file()["workers"]}.isdisjoint(old_workers),
               what="the workers to be replaced")

    stopped = setup.run("stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert gone(master_process)
    assert not setup.pidfile.exists() and not setup.socket.exists()
    assert not Path(f"{setup.pidfile}.status").exists()

    again = setup.run("stop")
    assert again.returncode == 0 and "not running" in again.stdout
    assert setup.run("status").returncode == 3
    assert setup.run("reload").returncode == 1


def test_a_stale_pidfile_is_cleaned(setup):
    gone = subprocess.Popen(["true"])
    gone.wait()
    setup.pidfile.write_text(f"{gone.pid}\n")
    server = Server(setup.config, str(setup.socket)).start()
    try:
        # The socket accepts a moment before the pidfile is written.
        wait_until(lambda: setup.master() == server.pid, what="the pidfile to be replaced")
        assert setup.run("status").returncode == 0
    finally:
        assert server.stop() == 0
    assert not setup.pidfile.exists()


def test_daemon_start_failures_say_why(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = Setup(tmp_path / "busy", listen=f"127.0.0.1:{taken.getsockname()[1]}")
        result = busy.run("start")
    assert result.returncode == 1 and "Address already in use" in result.stderr
    # This one fails in the daemon, after the fork: the reason comes back through its pipe.
    nowhere = Setup(tmp_path / "nowhere", pidfile=str(tmp_path / "missing" / "p.pid"))
    result = nowhere.run("start")
    assert result.returncode == 1 and "cannot write the pidfile" in result.stderr
    assert not accepts(str(nowhere.socket)) and not nowhere.socket.exists()


def test_stop_kills_a_master_that_does_not_stop(setup):
    assert setup.run("start").returncode == 0
    master = psutil.Process(setup.master())
    processes = [master] + master.children()
    master.suspend()  # SIGSTOP: the TERM stays pending
    stopped = setup.run("stop", "--timeout", "1")
    assert stopped.returncode == 0
    assert "did not stop within 1 s: killing it" in stopped.stderr
    wait_until(lambda: all(gone(process) for process in processes), what="every process gone")
    assert not setup.pidfile.exists()
    assert setup.run("status").returncode == 3
