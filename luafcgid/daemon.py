"""Running the master as a daemon while ``luafcgid start`` waits to hear how it went.

The classic double fork (the daemon is no session leader, so it never gets a terminal
back), with one pipe from the daemon to the starter: the daemon writes ``ready`` once it
serves, or ``error: <reason>``; the starter returns accordingly. A daemon that dies
without a word closes the pipe, which the starter sees too.
"""

from __future__ import annotations

import os
import select
import time
from typing import Callable, Optional, Tuple

from luafcgid.log import log


def run_detached(main: Callable[[int], int], timeout: float) -> Tuple[str, str]:
    """Run ``main(ready_fd)`` in a daemon; ``(outcome, detail)`` as the daemon told it.

    outcome is "ready", "error" (detail: the daemon's reason), "silent" (it exited without
    a word) or "timeout".
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _become_daemon(main, write_fd)
    os.close(write_fd)
    os.waitpid(pid, 0)  # the middle process exits at once
    try:
        line = _read_line(read_fd, timeout)
    finally:
        os.close(read_fd)
    if line is None:
        return "timeout", ""
    outcome, _, detail = line.partition(":")
    if outcome == "ready":
        return "ready", ""
    if outcome == "error":
        return "error", detail.strip()
    return "silent", ""


def _become_daemon(main: Callable[[int], int], ready_fd: int) -> None:
    """In the first child: detach, fork the daemon, run ``main`` there; never returns."""
    code = 1
    try:
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
        _redirect_standard_streams()
        code = main(ready_fd)
    except BaseException:
        log.exception("the luafcgid daemon failed")
    finally:
        os._exit(code)


def _redirect_standard_streams() -> None:
    """The terminal may go away: stdin, stdout and stderr become /dev/null."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _read_line(fd: int, timeout: float) -> Optional[str]:
    """The first line written to ``fd`` ("" at end of file), or None after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0].decode(errors="replace")
