"""A private PostgreSQL server for the database tests.

``initdb`` makes a throwaway cluster in a fresh directory and ``postgres`` serves it on a
unix socket only (no TCP), as an unprivileged user: the ``postgres`` account (else
``nobody``) when the tests run as root, the current user otherwise. Durability is off
(``fsync=off``): the data is thrown away with the directory. Stopped by pid; restartable on
the same socket, to show scripts reconnecting.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import List, Optional

from tests.support import free_port, wait_until

USER = "luafcgid"  # the database role the scripts connect as (trust authentication)


def bin_dir() -> Optional[Path]:
    """The newest installed PostgreSQL's bin directory (Debian: /usr/lib/postgresql/N/bin)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda path: int(Path(path).parent.parent.name))
    return Path(found[-1]).parent if found else None


MISSING = "PostgreSQL is not installed (Debian package postgresql)"


def run_as() -> Optional[pwd.struct_passwd]:
    """The unprivileged account that runs the server when we are root (None: ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("no unprivileged account (postgres, nobody) to run PostgreSQL as")


class PostgresServer:
    """A throwaway cluster served on a unix socket in its own directory."""

    def __init__(self) -> None:
        binaries = bin_dir()
        if binaries is None:
            raise RuntimeError(MISSING)
        self.bin = binaries
        self.account = run_as()
        # Not under the test's tmp_path: the server's account must be able to enter it.
        self.directory = Path(tempfile.mkdtemp(prefix="luafcgid-pg-"))
        self.directory.chmod(0o755)
        self.data = self.directory / "data"
        self.socket_dir = self.directory  # workers (root or the test user) reach it here
        self.port = free_port()
        self.log_path = self.directory / "postgres.log"
        self.process: Optional[subprocess.Popen] = None
        if self.account is not None:
            os.chown(self.directory, self.account.pw_uid, self.account.pw_gid)

    @property
    def conninfo(self) -> str:
        """What a script passes to its driver (libpq's keyword=value form)."""
        return f"host={self.socket_dir} port={self.port} dbname=postgres user={USER}"

    def _demoted(self) -> None:
        if self.account is not None:
            os.setgid(self.account.pw_gid)
            os.setgroups([])
            os.setuid(self.account.pw_uid)

    def _run(self, command: List[str]) -> None:
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       preexec_fn=self._demoted, cwd=self.directory, timeout=120)

    def start(self) -> PostgresServer:
        if not self.data.exists():
            self._run([str(self.bin / "initdb"), "-D", str(self.data), "-U", USER,
                       "--auth=trust", "--no-sync", "--encoding=UTF8", "--locale=C"])
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
             "-k", str(self.socket_dir), "-c", "listen_addresses=", "-c", "fsync=off",
             "-c", "max_connections=50"],
            stdout=log, stderr=subprocess.STDOUT, preexec_fn=self._demoted,
            cwd=self.directory, start_new_session=True)
        log.close()
        wait_until(lambda: self.ready() or self.process.poll() is not None, timeout=60,
                   what="PostgreSQL to accept connections")
        if self.process.poll() is not None:
            raise RuntimeError("PostgreSQL exited at start:\n" + self.log())
        return self

    def ready(self) -> bool:
        result = subprocess.run([str(self.bin / "pg_isready"), "-q", "-h", str(self.socket_dir),
                                 "-p", str(self.port), "-U", USER], timeout=10)
        return result.returncode == 0

    def query(self, sql: str) -> str:
        """One statement through psql; its rows as text (|-separated fields)."""
        psql = shutil.which("psql") or str(self.bin / "psql")
        result = subprocess.run([psql, "-X", "-A", "-t", "-h", str(self.socket_dir), "-p",
                                 str(self.port), "-U", USER, "-d", "postgres", "-c", sql],
                                capture_output=True, text=True, timeout=30, check=True)
        return result.stdout.strip()

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT: clients are disconnected), then wait for the exit."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.remove()
