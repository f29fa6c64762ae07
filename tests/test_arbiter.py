"""The master's parts: the listening socket, the pidfile, and supervision with real processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from luafcgid import sock
from luafcgid.pidfile import Pidfile, PidfileError
from tests.support import Server, accepts, as_root, fcgi_call, free_port, wait_until, write_config

pytestmark = pytest.mark.slow

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

HELLO = 'function main(env, con) con:puts("hello") end'


def serving_workers(pidfile: Path) -> list:
    """Pids of the workers the master counts as serving (booted), from its status file."""
    try:
        status = json.loads(Path(f"{pidfile}.status").read_text())
    except (OSError, ValueError):
        return []
    return [w["pid"] for w in status["workers"] if w["state"] == "serving"]


def get(listen: str, script: Path) -> bytes:
    """One FastCGI request, straight to luafcgid."""
    return fcgi_call(listen, {"SCRIPT_FILENAME": str(script), "REQUEST_METHOD": "GET",
                              "DOCUMENT_ROOT": str(script.parent)})


def serve(tmp_path: Path, **settings: object) -> Server:
    """``luafcgid start -F`` on a config with a hello.lua script."""
    (tmp_path / "hello.lua").write_text(HELLO)
    settings = {"listen": f"127.0.0.1:{free_port()}", "processes": 1, "sweep": 100,
                "pidfile": str(tmp_path / "luafcgid.pid"), **as_root(), **settings}
    config = write_config(tmp_path / "config.lua", **settings)
    return Server(config, str(settings["listen"])).start()


@pytest.fixture
def servers():
    started = []
    yield started
    for server in started:
        server.stop()


# -- the listening socket -------------------------------------------------------------------


def test_unix_socket_gets_its_mode_and_a_stale_file_is_replaced(tmp_path):
    path = tmp_path / "s.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a crashed server leaves
    listener = sock.bind(str(path), 16, 0o600)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert accepts(str(path))
    finally:
        sock.close(listener)
    assert not path.exists()


def test_unix_socket_a_live_server_listens_on_is_refused(tmp_path):
    path = str(tmp_path / "s.sock")
    listener = sock.bind(path, 16)
    try:
        with pytest.raises(sock.SocketError, match="another server is listening"):
            sock.bind(path, 16)
        assert accepts(path)
    finally:
        sock.close(listener)


def test_a_path_that_is_not_a_socket_is_refused(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("keep me")
    with pytest.raises(sock.SocketError, match="not a socket"):
        sock.bind(str(path), 16)
    assert path.read_text() == "keep me"


@needs_root
def test_unix_socket_owner(tmp_path):
    path = tmp_path / "s.sock"
    listener = sock.bind(str(path), 16, 0o660, "nobody:nogroup")
    try:
        info = os.stat(path)
        assert (info.st_uid, info.st_gid) == (65534, 65534)
    finally:
        sock.close(listener)


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "[::1]:0", "*:0"])
def test_tcp_listeners(listen):
    if listen.startswith("[") and not socket.has_ipv6:
        pytest.skip("no IPv6")
    listener = sock.bind(listen, 16)
    try:
        assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        port = listener.getsockname()[1]
        host = "::1" if listen.startswith("[") else "127.0.0.1"
        socket.create_connection((host, port), timeout=2).close()
    finally:
        sock.close(listener)


def test_a_tcp_address_in_use_is_refused_with_the_reason():
    taken = sock.bind("127.0.0.1:0", 16)
    try:
        with pytest.raises(sock.SocketError, match="in use"):
            sock.bind(f"127.0.0.1:{taken.getsockname()[1]}", 16)
    finally:
        taken.close()


# -- the pidfile ----------------------------------------------------------------------------


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_stale_pidfiles_are_replaced(tmp_path):
    pidfile = Pidfile(str(tmp_path / "p.pid"))
    for stale in (dead_pid(), os.getppid()):  # gone; alive but not luafcgid
        Path(pidfile.path).write_text(f"{stale}\n")
        assert pidfile.running() is None
        pidfile.create(os.getpid())
        assert pidfile.read() == os.getpid()


def test_a_live_luafcgid_holds_its_pidfile(tmp_path):
    impostor = subprocess.Popen([sys.executable, "-c",
                                 "import setproctitle, time; "
                                 "setproctitle.setproctitle('luafcgid: master [x]'); "
                                 "time.sleep(30)"])
    try:
        pidfile = Pidfile(str(tmp_path / "p.pid"))
        pidfile.create(impostor.pid)
        wait_until(lambda: pidfile.running() == impostor.pid, what="the title")
        with pytest.raises(PidfileError, match="already running"):
            pidfile.create(os.getpid())
        pidfile.remove(os.getpid())  # not ours: stays
        assert pidfile.read() == impostor.pid
        pidfile.remove(impostor.pid)
        assert not os.path.exists(pidfile.path)
    finally:
        impostor.kill()
        impostor.wait()


# -- supervision ----------------------------------------------------------------------------

CANNOT_BOOT = """
import sys
from luafcgid import config, log
from luafcgid.arbiter import Arbiter
from luafcgid.workers.threaded import ThreadWorker

class CannotBoot(ThreadWorker):
    def run(self):
        raise RuntimeError("this worker cannot boot")

log.setup(None, "info")
arbiter = Arbiter(sys.argv[1], config.load(sys.argv[1]), worker_class=CannotBoot)
arbiter.prepare()
sys.exit(arbiter.run())
"""


def test_workers_that_never_boot_back_off_then_the_master_gives_up(tmp_path):
    config = write_config(tmp_path / "config.lua", listen=f"127.0.0.1:{free_port()}",
                          processes=1, pidfile=str(tmp_path / "p.pid"), **as_root())
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", CANNOT_BOOT, str(config)],
                            capture_output=True, text=True, timeout=30)
    elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert ("workers failed to boot 5 times in a row: RuntimeError: this worker cannot "
            "boot. Giving up") in result.stderr
    # Each attempt logged, the cause's traceback once: not one traceback per attempt.
    assert result.stderr.count("could not boot") == 5
    assert result.stderr.count("Traceback (most recent call last)") == 1
    # Growing delays between attempts, not a fork storm.
    for delay in ("0.1", "0.2", "0.4", "0.8"):
        assert f"retrying in {delay} s" in result.stderr
    assert elapsed >= 1.5
    assert not (tmp_path / "p.pid").exists()


def test_a_hung_worker_is_killed_and_replaced(tmp_path, servers):
    server = serve(tmp_path, timeout=1, graceful_timeout=1)
    servers.append(server)
    hung = psutil.Process(wait_until(lambda: serving_workers(tmp_path / "luafcgid.pid"))[0])
    hung.suspend()  # SIGSTOP: alive, but no heartbeat answered
    wait_until(lambda: not hung.is_running() or hung.status() == psutil.STATUS_ZOMBIE,
               timeout=10, what="the hung worker to be killed")
    wait_until(lambda: set(serving_workers(tmp_path / "luafcgid.pid")) - {hung.pid},
               what="its replacement")
    assert get(server.listen, tmp_path / "hello.lua").endswith(b"hello")
    assert "has not answered the heartbeat" in server.output()


def test_int_stops_fast_even_during_a_request(tmp_path, servers):
    (tmp_path / "slow.lua").write_text(
        'function main(env, con) io.open(env.DOCUMENT_ROOT .. "/started", "w"):close() '
        'local t = os.time() + 20 while os.time() < t do end end')
    server = serve(tmp_path, graceful_timeout=30)
    servers.append(server)
    client = fcgi_call_in_background(server.listen, tmp_path / "slow.lua")
    wait_until(lambda: (tmp_path / "started").exists(), what="the request to start")
    started = time.monotonic()
    server.signal(signal.SIGINT)
    assert server.process.wait(10) == 0
    assert time.monotonic() - started < 8
    assert not (tmp_path / "luafcgid.pid").exists()
    client.kill()


def fcgi_call_in_background(listen: str, script: Path) -> subprocess.Popen:
    return subprocess.Popen([shutil.which("cgi-fcgi"), "-bind", "-connect", listen],
                            env={"SCRIPT_FILENAME": str(script), "REQUEST_METHOD": "GET",
                                 "DOCUMENT_ROOT": str(script.parent)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_hup_moves_to_a_new_listen_address(tmp_path, servers):
    server = serve(tmp_path)
    servers.append(server)
    old_listen = server.listen
    new_listen = str(tmp_path / "new.sock")
    config = server.config.read_text().replace(f'"{old_listen}"', f'"{new_listen}"')
    server.config.write_text(config)
    server.signal(signal.SIGHUP)
    wait_until(lambda: accepts(new_listen), what="the new address")
    wait_until(lambda: not accepts(old_listen), what="the old address to close")
    assert get(new_listen, tmp_path / "hello.lua").endswith(b"hello")
    assert server.stop() == 0
    assert not os.path.exists(new_listen)


@needs_root
def test_root_refuses_root_workers_unless_told(tmp_path):
    config = write_config(tmp_path / "config.lua", listen=f"127.0.0.1:{free_port()}",
                          pidfile=str(tmp_path / "p.pid"))
    result = subprocess.run([sys.executable, "-m", "luafcgid", "start", "-F", "-c", str(config)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert f"{config}: user: refusing to run workers as root" in result.stderr


@needs_root
def test_workers_drop_privileges_the_master_keeps_them(tmp_path, servers):
    server = serve(tmp_path, user="nobody", group="nogroup")
    servers.append(server)
    for pid in wait_until(lambda: serving_workers(tmp_path / "luafcgid.pid")):
        worker = psutil.Process(pid)
        assert tuple(worker.uids()) == (65534,) * 3 and tuple(worker.gids()) == (65534,) * 3
    assert psutil.Process(server.pid).uids().effective == 0
    # nobody cannot look into pytest's private tmp dir; a 404 still shows a worker serving.
    assert b"404" in get(server.listen, Path("/nonexistent/hello.lua"))


def test_systemd_is_told_ready_and_stopping(tmp_path, servers):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(10)
    os.environ["NOTIFY_SOCKET"] = str(tmp_path / "notify")
    try:
        server = serve(tmp_path)
    finally:
        del os.environ["NOTIFY_SOCKET"]
    servers.append(server)
    assert notify.recv(256) == b"READY=1"
    server.signal(signal.SIGTERM)
    assert notify.recv(256) == b"STOPPING=1"
    assert server.process.wait(10) == 0
    notify.close()
