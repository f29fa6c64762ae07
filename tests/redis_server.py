"""A private redis-server for the session tests and the scale-out script.

It listens on a free 127.0.0.1 port, keeps nothing on disk (``--save ""``, no AOF),
works in its own directory, and answers PING before :meth:`RedisServer.start` returns.
Tests skip when ``REDIS_SERVER`` is missing (see :func:`installed`).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path
from typing import Optional

from tests.support import free_port, wait_until

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
MISSING = f"{REDIS_SERVER} is not installed (Debian package redis-server)"


def installed() -> bool:
    return Path(REDIS_SERVER).exists()


def answers_ping(port: int) -> bool:
    """True when a Redis server on 127.0.0.1:``port`` answers PING with PONG."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as client:
            client.sendall(b"PING\r\n")
            return client.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """``redis-server`` on loopback ``port`` (a free one by default), in ``directory``."""

    def __init__(self, directory: Path, port: Optional[int] = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.log_path = directory / "redis.log"
        self.process: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--daemonize", "no",
             "--dir", str(self.directory), "--logfile", str(self.log_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_until(lambda: answers_ping(self.port) or self.process.poll() is not None,
                   timeout=timeout, what=f"redis-server to answer on port {self.port}")
        if self.process.poll() is not None:
            raise RuntimeError("redis-server exited at start:\n" + self.log())
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (TERM, then KILL after ``timeout``) and wait for its exit."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

