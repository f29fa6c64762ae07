"""The worker's fast paths (workers/threaded.py, luafcgid/sock.py), through a real server.

A new connection is read at once after accept(); a lone request without KEEP_CONN that
came whole is answered and closed without the connection ever joining the selector. These
tests drive every way such a connection can end: answered at once, answered in pieces the
client reads late, answered by a thread that lost the event loop meanwhile; and the
connections that must still be registered (a request in pieces, a kept connection).
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

from luafcgid import protocol, sock
from tests.support import (
    Server,
    as_root,
    fcgi_call,
    fcgi_connect,
    fcgi_request_bytes,
    free_port,
    read_records,
    wait_until,
    write_config,
)

SCRIPTS = {
    "hello.lua": 'function main(env, con) con:puts("hello") end',
    # 4 MiB: far more than a socket buffer holds, so the answer waits in the outbox.
    "big.lua": 'function main(env, con) con:puts(string.rep("x", 4 * 1024 * 1024)) end',
    # Holds the event loop well past the 5 ms after which the standby thread takes it over;
    # the file it names in its query string says it started.
    "slow.lua": 'function main(env, con) io.open(env.QUERY_STRING, "w"):close() '
                'local t = os.clock() while os.clock() - t < 0.5 do end con:puts("slow") end',
    # 512 KiB flushed 2 KiB at a time: more than a socket buffer, in pieces smaller than it.
    "flushes.lua": 'function main(env, con) for i = 1, 256 do '
                   'con:puts(string.rep("y", 2048)) con:flush() end end',
}


# Every test that takes this fixture starts a luafcgid: the mark goes with the params.
@pytest.fixture(params=[pytest.param("unix", marks=pytest.mark.slow),
                        pytest.param("tcp", marks=pytest.mark.slow)])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    for name, source in SCRIPTS.items():
        (tmp_path / name).write_text(source)
    listen = (str(tmp_path / "fcgi.sock") if request.param == "unix"
              else f"127.0.0.1:{free_port()}")
    config = write_config(tmp_path / "config.lua", listen=listen, processes=1, workers=2,
                          pidfile=str(tmp_path / "luafcgid.pid"), **as_root())
    running = Server(config, listen).start()
    try:
        yield running
    finally:
        running.stop()


def params(server: Server, script: str) -> Dict[str, str]:
    return {"SCRIPT_FILENAME": str(server.config.parent / script), "REQUEST_METHOD": "GET"}


def answer_then_end_of_stream(conn: socket.socket) -> bytes:
    """The STDOUT of the one answer on ``conn``; fails unless the server then closes it."""
    records = read_records(conn, until_end_request=False)  # reads to end of stream
    kinds = [kind for kind, _, _ in records]
    assert kinds.count(protocol.END_REQUEST) == 1 and kinds[-1] == protocol.END_REQUEST, kinds
    return b"".join(content for kind, _, content in records if kind == protocol.STDOUT)


def test_requests_sent_with_the_connect_are_answered_and_closed(server: Server) -> None:
    """Many connections, each with its whole request written before the worker accepts:
    the worker accepts them in batches, answers each and closes each."""
    conns: List[socket.socket] = []
    try:
        for _ in range(150):
            conn = fcgi_connect(server.listen)
            conn.sendall(fcgi_request_bytes(params(server, "hello.lua")))
            conns.append(conn)
        for conn in conns:
            assert answer_then_end_of_stream(conn).endswith(b"\r\n\r\nhello")
    finally:
        for conn in conns:
            conn.close()


def test_a_request_sent_in_pieces_is_read_to_its_end(server: Server) -> None:
    """A slow client: the first read after accept finds only part of the request, so the
    connection must join the selector for the rest."""
    request = fcgi_request_bytes(params(server, "hello.lua"))
    with fcgi_connect(server.listen) as conn:
        for start in range(0, len(request), 40):
            conn.sendall(request[start:start + 40])
            time.sleep(0.02)  # the pace of the slow client, not a synchronisation
        assert answer_then_end_of_stream(conn).endswith(b"hello")


def test_a_kept_connection_serves_request_after_request(server: Server) -> None:
    with fcgi_connect(server.listen) as conn:
        for _ in range(3):
            output = fcgi_call(server.listen, params(server, "hello.lua"), sock=conn,
                               keep_conn=True)
            assert output.endswith(b"hello")


def test_an_answer_read_late_is_written_whole_and_then_closed(server: Server) -> None:
    """The answer does not fit the socket: the loop writes the rest once the client reads,
    then closes; meanwhile other clients are served."""
    with fcgi_connect(server.listen, timeout=30) as late:
        late.sendall(fcgi_request_bytes(params(server, "big.lua")))
        for _ in range(3):
            assert fcgi_call(server.listen, params(server, "hello.lua")).endswith(b"hello")
        body = answer_then_end_of_stream(late).partition(b"\r\n\r\n")[2]
    assert body == b"x" * (4 * 1024 * 1024)


class SlowReader:
    """A client that reads 4 KiB at a time, with a pause before each read."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn

    def recv(self, size: int) -> bytes:
        time.sleep(0.0005)  # the pace of a slow client, not a synchronisation
        return self.conn.recv(min(size, 4096))


def test_flushes_into_a_full_socket_wait_for_room(server: Server) -> None:
    """A script flushing faster than its client reads finds the socket buffer full at the
    start of a flush: the flush waits for room, and the client gets every byte."""
    with fcgi_connect(server.listen, timeout=30) as conn:
        conn.sendall(fcgi_request_bytes(params(server, "flushes.lua")))
        records = read_records(SlowReader(conn), until_end_request=False)
    assert [kind for kind, _, _ in records][-1] == protocol.END_REQUEST
    stdout = b"".join(content for kind, _, content in records if kind == protocol.STDOUT)
    assert stdout.partition(b"\r\n\r\n")[2] == b"y" * (256 * 2048)


def test_a_request_that_outlasts_the_handoff_is_answered_and_closed(server: Server) -> None:
    """The slow request's thread loses the event loop to the standby; it still answers,
    the connection is still closed, and a request that came meanwhile is not held up."""
    outcome: Dict[str, bytes] = {}
    started = server.config.parent / "slow.started"

    def slow_client() -> None:
        with fcgi_connect(server.listen) as conn:
            conn.sendall(fcgi_request_bytes({**params(server, "slow.lua"),
                                             "QUERY_STRING": str(started)}))
            outcome["slow"] = answer_then_end_of_stream(conn)

    slow = threading.Thread(target=slow_client)
    slow.start()
    try:
        wait_until(started.exists, what="the slow request to start")
        with fcgi_connect(server.listen) as conn:
            conn.sendall(fcgi_request_bytes(params(server, "hello.lua")))
            assert answer_then_end_of_stream(conn).endswith(b"hello")
            assert "slow" not in outcome  # served while the slow one still ran
    finally:
        slow.join(30)
    assert not slow.is_alive()
    assert outcome["slow"].endswith(b"slow")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux socket options")
def test_tcp_listeners_defer_accept_and_give_accepted_connections_nodelay() -> None:
    listener = sock.bind("127.0.0.1:0", 16)
    try:
        assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) > 0
        with socket.create_connection(listener.getsockname(), timeout=5) as client:
            client.sendall(b"x")  # a deferred connection is handed over once data came
            listener.settimeout(5)
            accepted, _ = listener.accept()
            try:
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            finally:
                accepted.close()
    finally:
        sock.close(listener)


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_listeners_keep_their_family_and_type_for_accept(kind: str, tmp_path: Path) -> None:
    """bind() gives a Listener whose family and type are read once, as the same enums a
    plain socket gives; its accept() hands out C socket objects of that family and type,
    which take MSG_DONTWAIT."""
    listen = str(tmp_path / "fcgi.sock") if kind == "unix" else "127.0.0.1:0"
    family = socket.AF_UNIX if kind == "unix" else socket.AF_INET
    listener = sock.bind(listen, 16)
    try:
        assert isinstance(listener, sock.Listener)
        assert type(listener.family) is socket.AddressFamily and listener.family == family
        assert type(listener.type) is socket.SocketKind
        assert listener.type == socket.SOCK_STREAM
        with socket.socket(family, socket.SOCK_STREAM) as client:
            client.settimeout(5)
            client.connect(listener.getsockname())
            client.sendall(b"x")  # a deferred TCP connection is handed over once data came
            listener.settimeout(5)
            accepted, _ = listener.accept()
            try:
                assert type(accepted) is socket.SocketType
                assert (accepted.family, accepted.type) == (family, socket.SOCK_STREAM)
                assert accepted.recv(1, socket.MSG_DONTWAIT) == b"x"
                with pytest.raises(BlockingIOError):  # nothing more: never waits
                    accepted.recv(1, socket.MSG_DONTWAIT)
            finally:
                accepted.close()
    finally:
        sock.close(listener)
