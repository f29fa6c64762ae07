"""The pidfile: the master's pid, so the CLI and init scripts can find a running server.

A pidfile naming a process that is gone, or that is not luafcgid (the pid was reused
after a crash), is stale: it is replaced without complaint. One naming a live luafcgid
refuses a second copy.
"""

from __future__ import annotations

import os
from typing import Optional

import psutil


class PidfileError(Exception):
    """Another luafcgid runs on this pidfile, or the file cannot be written."""


class Pidfile:
    """The file at ``path`` holding one pid and a newline."""

    def __init__(self, path: str) -> None:
        self.path = path

    def read(self) -> Optional[int]:
        """The pid in the file, or None when there is no file or no number in it."""
        try:
            with open(self.path) as file:
                text = file.read(64).strip()
        except FileNotFoundError:
            return None
        return int(text) if text.isdigit() else None

    def running(self) -> Optional[int]:
        """The pid of the live luafcgid master the file names, or None."""
        pid = self.read()
        if pid is None or pid == os.getpid() or not is_luafcgid(pid):
            return None
        return pid

    def create(self, pid: int) -> None:
        """Write ``pid``, replacing a stale file; refuse when a live luafcgid holds it."""
        other = self.running()
        if other is not None and other != pid:
            raise PidfileError(f"luafcgid is already running (pid {other}, pidfile {self.path})")
        temporary = f"{self.path}.{pid}.tmp"
        try:
            with open(temporary, "w") as file:
                file.write(f"{pid}\n")
            os.chmod(temporary, 0o644)
            os.replace(temporary, self.path)
        except OSError as error:
            raise PidfileError(f"cannot write the pidfile {self.path}: {error.strerror}") from None

    def remove(self, pid: int) -> None:
        """Remove the file if it still names ``pid`` (a newer server may have taken it)."""
        if self.read() == pid:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def is_luafcgid(pid: int) -> bool:
    """True when ``pid`` is a live (not zombie) luafcgid process."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        # "luafcgid: master [...]" once titled; "python -m luafcgid" or ".../luafcgid" before.
        return any(word.startswith("luafcgid:") or os.path.basename(word) == "luafcgid"
                   for word in process.cmdline())
    except psutil.AccessDenied:
        return True  # alive, and not ours to inspect: assume the worst, refuse to start
    except psutil.Error:
        return False
