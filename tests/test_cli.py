"""The ``luafcgid`` command, run as a real process: exit codes, messages, files left behind."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import psutil
import pytest

from luafcgid import __version__
from tests.support import Server, accepts, as_root, fcgi_call, wait_until, write_config

pytestmark = pytest.mark.slow

CHECKOUT = Path(__file__).resolve().parent.parent


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


# -- the config file broke after the start (issue 16) ----------------------------------------

def test_stop_status_reload_work_when_the_config_file_broke(setup):
    assert setup.run("start").returncode == 0
    master = setup.master()
    good = setup.config.read_text()
    # Still Lua, refused as a whole: the pidfile line is read by itself.
    setup.config.write_text(good + "workers = 0\n")
    status = setup.run("status")
    assert status.returncode == 0 and f"master pid {master}" in status.stdout
    assert ("the config file has an error" in status.stderr
            and "workers: must be >= 1" in status.stderr)
    assert (f"using the pidfile {setup.pidfile} (the config's pidfile setting"
            in status.stderr)
    reloaded = setup.run("reload")
    assert reloaded.returncode == 1
    assert "reload failed: config refused: " in reloaded.stderr
    assert f"luafcgid (pid {master}) still runs the previous config" in reloaded.stderr
    assert setup.get().endswith(b"hello")
    assert "FAILED" in setup.run("status").stdout
    # No longer Lua: only --pidfile can tell where the server is.
    setup.config.write_text("this is not lua")
    guessed = setup.run("status")
    assert "using the pidfile /run/luafcgid.pid (the default pidfile" in guessed.stderr
    assert setup.run("status", "--pidfile", str(setup.pidfile)).returncode == 0
    stopped = setup.run("stop", "--pidfile", str(setup.pidfile))
    assert stopped.returncode == 0 and f"luafcgid (pid {master}) stopped" in stopped.stdout
    for result in (status, reloaded, guessed, stopped):
        assert "Traceback" not in result.stderr
    assert not setup.pidfile.exists()


# A master whose workers cannot boot once a marker file exists (a reload then fails).
FAILS_AFTER_MARKER = """
import errno, os, sys
from luafcgid import config, log
from luafcgid.arbiter import Arbiter
from luafcgid.workers.threaded import ThreadWorker

class FailsAfterMarker(ThreadWorker):
    def run(self):
        if os.path.exists(sys.argv[2]):
            raise PermissionError(errno.EACCES, "Permission denied", "/srv/www/secret.lua")
        super().run()

log.setup(None, "info")
arbiter = Arbiter(sys.argv[1], config.load(sys.argv[1]), worker_class=FailsAfterMarker)
arbiter.prepare()
sys.exit(arbiter.run())
"""


def test_reload_waits_for_the_new_workers_and_reports_a_failure(tmp_path):
    setup = Setup(tmp_path, processes=1)
    marker = tmp_path / "marker"
    with open(tmp_path / "master.log", "wb") as log:
        master = subprocess.Popen([sys.executable, "-c", FAILS_AFTER_MARKER, str(setup.config),
                                   str(marker)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: [w["state"] for w in setup.status_file()["workers"]] == ["serving"]
                   if Path(f"{setup.pidfile}.status").exists() else False,
                   what="a serving worker")
        worker = setup.status_file()["workers"][0]["pid"]
        marker.touch()
        failed = setup.run("reload")
        assert failed.returncode == 1, failed.stdout
        me = pwd.getpwuid(os.geteuid()).pw_name
        assert (f"reload failed: the new workers could not boot: user {me} cannot read "
                "/srv/www/secret.lua (Permission denied)") in failed.stderr, failed.stderr
        # The previous config's worker never stopped, and goes on serving.
        assert setup.get().endswith(b"hello")
        assert [w["pid"] for w in setup.status_file()["workers"]] == [worker]
        assert "last reload (#1) FAILED" in setup.run("status").stdout
        marker.unlink()
        done = setup.run("reload")
        assert done.returncode == 0 and "reloaded: the new workers serve" in done.stdout
        assert worker not in {w["pid"] for w in setup.status_file()["workers"]
                              if w["state"] == "serving"}
        assert "last reload (#2) done" in setup.run("status").stdout
    finally:
        master.terminate()
        master.wait(30)


CANNOT_READ = """
import errno, functools, sys
from luafcgid import cli
from luafcgid.arbiter import Arbiter
from luafcgid.workers.threaded import ThreadWorker

class CannotRead(ThreadWorker):
    def run(self):
        raise PermissionError(errno.EACCES, "Permission denied", "/srv/www/secret.lua")

cli.Arbiter = functools.partial(Arbiter, worker_class=CannotRead)
cli.main(sys.argv[1:])
"""


def test_a_daemon_that_cannot_boot_says_why_and_where_the_log_is(setup):
    result = subprocess.run([sys.executable, "-c", CANNOT_READ, "start", "-c",
                             str(setup.config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    me = pwd.getpwuid(os.geteuid()).pw_name
    assert result.stderr == (
        f"luafcgid: workers failed to boot 5 times in a row: user {me} cannot read "
        "/srv/www/secret.lua (Permission denied). Giving up; the log: "
        f"{setup.settings['logfile']}\n")
    log = Path(setup.settings["logfile"]).read_text()
    assert "Traceback" not in log and log.count("cannot read /srv/www/secret.lua") == 2, log


MISSING_REDIS = """
import sys
sys.modules["redis"] = None   # as on a machine without the redis package
from luafcgid import cli
cli.main(sys.argv[1:])
"""


def test_a_redis_session_store_without_the_package_is_refused_at_start(tmp_path):
    setup = Setup(tmp_path, session_store="redis://127.0.0.1:6379/0")
    try:
        result = subprocess.run([sys.executable, "-c", MISSING_REDIS, "start", "-c",
                                 str(setup.config)], capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 1
        assert f"{setup.config}: session_store: session store redis://" in result.stderr
        assert "install the redis package (pip install 'luafcgid[redis]')" in result.stderr
        assert not setup.pidfile.exists()
    finally:
        if setup.pidfile.exists():
            setup.run("stop", "--timeout", "5")


def run_as_nobody(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The CLI run by user nobody (uid 65534), from this checkout."""
    command = [sys.executable, "-m", "luafcgid", *args]
    env = {**os.environ, "PYTHONPATH": str(CHECKOUT)}
    if shutil.which("setpriv"):
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
        return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=cwd,
                              env=env)
    return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=cwd,
                          env=env, user=65534, group=65534, extra_groups=[])


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a root server, a user who is not")
def test_another_user_is_told_to_run_stop_and_reload_as_root():
    base = Path(tempfile.mkdtemp(prefix="luafcgid-other-user-"))
    try:
        base.chmod(0o755)  # the other user reads the config and the pidfile
        try:
            probe = run_as_nobody("--version", cwd=base)
        except OSError as error:
            pytest.skip(f"user nobody cannot run this Python ({error})")
        if probe.returncode != 0:
            last = probe.stderr.strip().splitlines()[-1:] or ["no output"]
            pytest.skip(f"user nobody cannot run this Python ({sys.executable}): {last[0]}")
        setup = Setup(base)
        assert setup.run("start").returncode == 0
        master = setup.master()
        try:
            for command in ("stop", "reload"):
                result = run_as_nobody(command, "-c", str(setup.config), cwd=base)
                assert result.returncode == 1
                assert result.stderr == (f"luafcgid: permission denied: the server (pid "
                                         f"{master}) runs as root; run this as root\n")
            assert setup.get().endswith(b"hello")
            assert run_as_nobody("status", "-c", str(setup.config), cwd=base).returncode == 0
        finally:
            setup.run("stop")
    finally:
        shutil.rmtree(base)


def test_stop_after_its_timeout_kills_the_processes_scripts_started(setup, tmp_path):
    child_pid = tmp_path / "child.pid"
    stuck = setup.script.with_name("stuck.lua")
    stuck.write_text(f"function main(env, con) os.execute([[sh -c 'echo $$ > {child_pid}; "
                     "exec sleep 60']]) end")
    assert setup.run("start").returncode == 0
    request = threading.Thread(target=lambda: fcgi_call_quietly(
        str(setup.socket), {"SCRIPT_FILENAME": str(stuck), "REQUEST_METHOD": "GET"}),
        daemon=True)
    request.start()
    sleeper = int(wait_until(lambda: child_pid.exists() and child_pid.read_text().strip(),
                             what="the script's child process"))
    stopped = setup.run("stop", "--timeout", "1")
    assert stopped.returncode == 0 and "killing it" in stopped.stderr
    wait_until(lambda: not psutil.pid_exists(sleeper) or gone(psutil.Process(sleeper)),
               timeout=5, what="the script's child process to be killed")


def fcgi_call_quietly(address: str, params: dict) -> None:
    try:
        fcgi_call(address, params)
    except OSError:
        pass  # the server is killed under it
