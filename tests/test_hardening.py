"""Hostile input end to end (issue #4): request limits, slow clients, broken streams, paths
outside the rules, clients not allowed, privileges, and a short load test."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import List

import psutil
import pytest

from luafcgid import protocol
from tests.support import (
    NGINX,
    RequestLoop,
    Server,
    Site,
    as_root,
    fcgi_call,
    fcgi_connect,
    fcgi_request_bytes,
    free_port,
    read_records,
    wait_until,
    write_config,
)

pytestmark = [pytest.mark.nginx, pytest.mark.slow]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
LOADTEST = Path(__file__).resolve().parent.parent / "scripts" / "loadtest"

HELLO = 'function main(env, con) con:puts("hello") end'
ECHO = 'function main(env, con) con:puts(#(con:gets() or "")) end'


@pytest.fixture
def running_site(tmp_path: Path):
    if not Path(NGINX).exists():
        pytest.skip("nginx is not installed")
    with Site(tmp_path, {"hello.lua": HELLO, "echo.lua": ECHO}, workers=2) as running:
        yield running


def worker_pids(server: Server) -> List[int]:
    return sorted(child.pid for child in psutil.Process(server.pid).children())


def serving_workers(pidfile: Path) -> List[int]:
    """Pids of the workers the master counts as booted (dropped privileges, serving)."""
    try:
        status = json.loads(Path(f"{pidfile}.status").read_text())
    except (OSError, ValueError):
        return []
    return [worker["pid"] for worker in status["workers"] if worker["state"] == "serving"]


def hello_params(site: Site, name: str = "hello.lua") -> dict:
    return {"SCRIPT_FILENAME": site.script_path(name), "REQUEST_METHOD": "GET",
            "DOCUMENT_ROOT": str(site.docroot)}


def closed_unanswered(sock: socket.socket) -> bool:
    """True when the server closed ``sock`` without a record (a reset counts: it closed
    with our bytes unread)."""
    try:
        return read_records(sock) == []
    except ConnectionResetError:
        return True


def status_of(output: bytes) -> int:
    assert output.startswith(b"Status: "), output[:200]
    return int(output[8:11])


# --- request limits and slow or broken clients ---------------------------------------------

def test_ten_byte_a_tick_clients_do_not_hold_the_two_lua_threads(running_site: Site) -> None:
    workers = wait_until(lambda: worker_pids(running_site.server), what="a worker")
    request = fcgi_request_bytes(hello_params(running_site))
    slow = [fcgi_connect(running_site.listen) for _ in range(10)]
    stop = threading.Event()

    def dribble() -> None:
        for position in range(len(request)):
            for sock in slow:
                sock.send(request[position:position + 1])
            if stop.wait(0.2):
                return

    dribbler = threading.Thread(target=dribble, daemon=True)
    dribbler.start()
    try:
        time.sleep(0.5)  # every slow connection has sent a few bytes: a request is begun
        for _ in range(30):
            started = time.monotonic()
            response = running_site.get("/hello.lua", timeout=5)
            assert (response.status, response.body) == (200, b"hello")
            assert time.monotonic() - started < 1.0
    finally:
        stop.set()
        dribbler.join(5)
        for sock in slow:
            sock.close()
    assert worker_pids(running_site.server) == workers


def test_clients_that_never_read_their_answer_do_not_hold_the_lua_threads(tmp_path: Path) -> None:
    (tmp_path / "big.lua").write_text(
        'function main(env, con) con:puts(string.rep("x", 8 * 1024 * 1024)) end')
    server = serve_hello(tmp_path, workers=2)
    stuck = [fcgi_connect(server.listen) for _ in range(2)]
    try:
        for sock in stuck:
            sock.sendall(fcgi_request_bytes({"SCRIPT_FILENAME": str(tmp_path / "big.lua")}))
        time.sleep(0.5)  # both big answers are being written (nothing to poll from here)
        with fcgi_connect(server.listen, timeout=3) as sock:
            output = fcgi_call(server.listen, {"SCRIPT_FILENAME": str(tmp_path / "hello.lua")},
                               sock=sock)
        assert output.endswith(b"hello")
    finally:
        for sock in stuck:
            sock.close()
        server.stop()


BROKEN_STREAMS = {
    "wrong version": b"\x02" + fcgi_request_bytes({"A": "b"})[1:],
    "END_REQUEST from the client": bytes([1, protocol.END_REQUEST, 0, 1, 0, 0, 0, 0]),
    "begin of 3 bytes": bytes([1, protocol.BEGIN_REQUEST, 0, 1, 0, 3, 5, 0]) + b"\0" * 8,
    "pair running past its data": fcgi_request_bytes({})[:16] + protocol.encode_record(
        protocol.PARAMS, 1, b"\x04\x85AB") + protocol.encode_record(protocol.PARAMS, 1),
    "pair length of 2 GiB": fcgi_request_bytes({})[:16] + protocol.encode_record(
        protocol.PARAMS, 1, b"\xff\xff\xff\xff\x01Nv") + protocol.encode_record(protocol.PARAMS, 1),
}


def test_broken_streams_close_only_their_connection(running_site: Site) -> None:
    workers = wait_until(lambda: worker_pids(running_site.server), what="a worker")
    with RequestLoop(running_site.port, ["/hello.lua"], lambda r: r.body == b"hello",
                     clients=4) as loop:
        for name, data in BROKEN_STREAMS.items():
            with fcgi_connect(running_site.listen, timeout=5) as sock:
                sock.sendall(data)
                assert closed_unanswered(sock), name
        for _ in range(5):  # truncated in the middle of a record, then the client goes
            with fcgi_connect(running_site.listen, timeout=5) as sock:
                sock.sendall(fcgi_request_bytes(hello_params(running_site))[:37])
        loop.wait_for(200)
    assert loop.failed == 0, loop.failures
    assert worker_pids(running_site.server) == workers
    closed = wait_until(lambda: running_site.server.output().count("closing a FastCGI connection")
                        >= len(BROKEN_STREAMS) and running_site.server.output(), what="log lines")
    assert closed.count("closing a FastCGI connection") == len(BROKEN_STREAMS)
    for reason in ("unknown FastCGI version 2", "unexpected END_REQUEST",
                   "BEGIN_REQUEST body of 3 bytes", "lengths 2147483647 and 1"):
        assert reason in closed


def test_a_stream_cut_inside_a_record_is_logged_once(running_site: Site) -> None:
    with fcgi_connect(running_site.listen, timeout=5) as sock:
        sock.sendall(fcgi_request_bytes(hello_params(running_site))[:37])
    wait_until(lambda: "truncated" in running_site.server.output(), timeout=3,
               what="a log line for the truncated stream")


def test_a_20_mib_body_is_a_413_without_the_worker_growing(running_site: Site) -> None:
    (worker,) = [psutil.Process(pid) for pid in
                 wait_until(lambda: worker_pids(running_site.server), what="a worker")]
    assert running_site.get("/echo.lua", method="POST", body=b"x" * 1000).body == b"1000"
    before = peak_rss(worker.pid)
    for _ in range(2):
        response = running_site.get("/echo.lua", method="POST", body=b"x" * (20 << 20), timeout=30)
        assert response.status == 413
    grown = peak_rss(worker.pid) - before
    assert grown < 4 << 20, f"worker peak RSS grew by {grown / 2**20:.1f} MiB"
    assert "request body over maxpost" in running_site.server.output()


def test_maxpost_0_means_no_limit(tmp_path: Path) -> None:
    """As nginx's client_max_body_size 0 and PHP's post_max_size = 0: no limit at all."""
    if not Path(NGINX).exists():
        pytest.skip("nginx is not installed")
    with Site(tmp_path, {"echo.lua": ECHO}, maxpost=0) as site:
        big = 3 << 20  # over the default maxpost (1 MiB)
        response = site.get("/echo.lua", method="POST", body=b"x" * big, timeout=30)
        assert (response.status, response.body) == (200, str(big).encode())
        assert site.get("/echo.lua", method="POST", body=b"").body == b"0"
    assert "request body over maxpost" not in site.server.output()


def peak_rss(pid: int) -> int:
    """The process's largest RSS so far (VmHWM), bytes: a body held even for a moment shows."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


# --- paths ----------------------------------------------------------------------------------

@pytest.fixture
def rooted(tmp_path: Path):
    """A server with ``root`` set to www/, and things around it that must not be served."""
    www = tmp_path / "www"
    www.mkdir()
    (www / "hello.lua").write_text(HELLO)
    (www / "notes.txt").write_text(HELLO)
    (tmp_path / "outside.lua").write_text(HELLO)
    (www / "escape.lua").symlink_to(tmp_path / "outside.lua")
    (www / "null.lua").symlink_to("/dev/null")
    (www / "dir.lua").mkdir()
    os.mkfifo(www / "fifo.lua")
    listen = f"127.0.0.1:{free_port()}"
    config = write_config(tmp_path / "config.lua", listen=listen, processes=1, workers=2,
                          root=str(www), pidfile=str(tmp_path / "p.pid"), **as_root())
    server = Server(config, listen).start()
    yield server, www
    server.stop()


@pytest.mark.parametrize("name, code", [
    ("../outside.lua", 403),
    ("sub/../../outside.lua", 403),
    ("/../outside.lua", 403),
    ("escape.lua", 403),            # a symlink out of root
    ("null.lua", 403),              # a symlink to /dev/null: real path not .lua
    ("notes.txt", 403),             # extension not allowed
    ("dir.lua", 404),               # a directory
    ("fifo.lua", 404),              # a FIFO: stat only, never opened
    ("hello.lua\0.txt", 404),       # NUL byte
    ("missing.lua", 404),
])
def test_paths_outside_the_rules_are_refused(rooted, name: str, code: int) -> None:
    server, www = rooted
    started = time.monotonic()
    output = fcgi_call(server.listen, {"SCRIPT_FILENAME": f"{www}/{name}"})
    assert status_of(output) == code
    assert time.monotonic() - started < 2
    assert fcgi_call(server.listen, {"SCRIPT_FILENAME": f"{www}//hello.lua"}).endswith(b"hello")


def test_a_fifo_does_not_block_the_worker(rooted) -> None:
    server, www = rooted
    for _ in range(4):  # more than the worker's 2 threads
        assert status_of(fcgi_call(server.listen, {"SCRIPT_FILENAME": f"{www}/fifo.lua"})) == 404
    assert fcgi_call(server.listen, {"SCRIPT_FILENAME": f"{www}/hello.lua"}).endswith(b"hello")


# --- access control -------------------------------------------------------------------------

def serve_hello(tmp_path: Path, **settings: object) -> Server:
    (tmp_path / "hello.lua").write_text(HELLO)
    listen = settings.pop("listen", f"127.0.0.1:{free_port()}")
    settings = {"listen": listen, "processes": 1, "pidfile": str(tmp_path / "p.pid"),
                **as_root(), **settings}
    config = write_config(tmp_path / "config.lua", **settings)
    return Server(config, str(listen)).start()


def connect_from(source: str, listen: str) -> socket.socket:
    host, _, port = listen.rpartition(":")
    return socket.create_connection((host, int(port)), timeout=5, source_address=(source, 0))


def test_allowed_clients_closes_other_peers_at_once_and_logs_them(tmp_path: Path) -> None:
    server = serve_hello(tmp_path, allowed_clients=["127.0.0.2"])
    params = {"SCRIPT_FILENAME": str(tmp_path / "hello.lua")}
    try:
        with connect_from("127.0.0.1", server.listen) as sock:
            sock.sendall(fcgi_request_bytes(params))
            assert closed_unanswered(sock)
        wait_until(lambda: "connection from 127.0.0.1 refused" in server.output(),
                   what="the refusal in the log")
        with connect_from("127.0.0.2", server.listen) as sock:
            assert fcgi_call(server.listen, params, sock=sock).endswith(b"hello")
    finally:
        server.stop()


def test_allowed_clients_lets_a_listed_peer_in(tmp_path: Path) -> None:
    server = serve_hello(tmp_path, allowed_clients=["127.0.0.1"])
    try:
        output = fcgi_call(server.listen, {"SCRIPT_FILENAME": str(tmp_path / "hello.lua")})
        assert output.endswith(b"hello")
        assert "refused" not in server.output()
    finally:
        server.stop()


@needs_root
def test_every_worker_runs_with_real_effective_and_saved_ids_dropped(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    server = serve_hello(tmp_path, user="nobody", group="nogroup", processes=2)
    try:
        workers = wait_until(lambda: len(serving_workers(tmp_path / "p.pid")) == 2
                             and serving_workers(tmp_path / "p.pid"), what="two booted workers")
        for pid in workers:
            process = psutil.Process(pid)
            assert tuple(process.uids()) == (65534, 65534, 65534)
            assert tuple(process.gids()) == (65534, 65534, 65534)
            groups = {int(g) for g in Path(f"/proc/{pid}/status").read_text()
                      .split("Groups:")[1].split("\n")[0].split()}
            assert 0 not in groups
        assert tuple(psutil.Process(server.pid).uids()) == (0, 0, 0)
    finally:
        server.stop()


@needs_root
def test_unix_socket_mode_and_owner_end_to_end(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    path = str(tmp_path / "fcgi.sock")
    server = serve_hello(tmp_path, listen=path, socket_mode="0600", socket_owner="nobody:nogroup",
                         user="nobody", group="nogroup")
    try:
        info = os.stat(path)
        assert (info.st_mode & 0o777, info.st_uid, info.st_gid) == (0o600, 65534, 65534)
        # nobody cannot look into pytest's private tmp dir: a 404 shows the worker answering.
        assert status_of(fcgi_call(path, {"SCRIPT_FILENAME": "/nonexistent/x.lua"})) == 404
    finally:
        server.stop()


@needs_root
def test_a_script_the_workers_user_cannot_reach_is_a_403_naming_the_user(tmp_path: Path) -> None:
    public = Path(tempfile.mkdtemp(prefix="luafcgid-permissions-"))
    try:
        public.chmod(0o755)
        secret = public / "secret.lua"
        secret.write_text(HELLO)
        secret.chmod(0o600)
        readable = public / "hello.lua"
        readable.write_text(HELLO)
        readable.chmod(0o644)
        server = serve_hello(tmp_path, user="nobody", group="nogroup")
        try:
            # pytest's tmp dir is private to root: nobody cannot enter it.
            hidden = tmp_path / "hello.lua"
            assert status_of(fcgi_call(server.listen, {"SCRIPT_FILENAME": str(hidden)})) == 403
            assert status_of(fcgi_call(server.listen, {"SCRIPT_FILENAME": str(secret)})) == 403
            assert fcgi_call(server.listen, {"SCRIPT_FILENAME": str(readable)}).endswith(
                b"hello")
        finally:
            server.stop()
    finally:
        shutil.rmtree(public)
    log = server.output()
    assert (f"{hidden}: permission denied for user nobody: a directory on the way cannot be "
            "entered (403)") in log, log
    assert f"{secret}: permission denied for user nobody: cannot read it (403)" in log, log


def test_the_running_config_file_is_never_served_as_a_script(tmp_path: Path) -> None:
    # Like examples/config.lua: the config beside the scripts, where nginx would pass it on.
    (tmp_path / "alias.lua").symlink_to(tmp_path / "config.lua")
    server = serve_hello(tmp_path)
    try:
        for name in ("config.lua", "alias.lua"):
            output = fcgi_call(server.listen, {"SCRIPT_FILENAME": str(tmp_path / name)})
            assert status_of(output) == 403
        assert fcgi_call(server.listen, {"SCRIPT_FILENAME": str(tmp_path / "hello.lua")}
                         ).endswith(b"hello")
    finally:
        server.stop()
    assert (f"{tmp_path}/config.lua: is the server's config file, never run as a script (403)"
            in server.output())


# --- load ------------------------------------------------------------------------------------

def test_short_load_test_answers_every_class_right(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(LOADTEST), "--seconds", "5", "--clients", "50",
         "--dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "wrong: 0" in result.stdout, result.stdout
