"""The account the workers run as: switching to it, and what it can reach.

A master started as root binds the socket, then each worker switches to ``user``
(:func:`drop`). Whatever the workers need after that must be reachable by that account:
the master checks the document root and the startup script before it forks a single
worker (:func:`unreachable`), in a short-lived child that switches exactly as a worker
does, so the answer is the kernel's own (ACLs, group lists, root-squashed mounts and
all) rather than a guess from mode bits.
"""

from __future__ import annotations

import os
import pwd
import signal
from typing import Iterable, List, Optional, Tuple

# (uid, gid, user name) the workers switch to.
Owner = Tuple[int, int, str]

# What a probe looks at: a path, and "directory" (to list and enter) or "file" (to read).
Check = Tuple[str, str]


def drop(owner: Optional[Owner]) -> None:
    """Switch this process to ``owner`` for good (real, effective and saved ids)."""
    if owner is None:
        return
    uid, gid, user = owner
    os.initgroups(user, gid)
    os.setgid(gid)
    os.setuid(uid)


def user_name() -> str:
    """The name of the account this process runs as (its uid when it has none)."""
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def unreachable(owner: Owner, checks: List[Check]) -> Optional[str]:
    """Why ``owner`` cannot reach one of ``checks``, or None when it reaches them all.

    Forks a child that switches to ``owner`` and looks; every signal stays blocked in it
    (the master's handlers would otherwise write into the master's wakeup pipe).
    """
    try:
        pid, fd = fork_with_pipe(signal.valid_signals())
    except OSError as error:
        return f"cannot fork to check what user {owner[2]} can reach: {error.strerror}"
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            drop(owner)
            os.write(fd, (_first_problem(owner[2], checks) or "").encode())
            code = 0
        finally:
            os._exit(code)
    with os.fdopen(fd, "rb") as answer:
        problem = answer.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0 and not problem:
        return f"could not check what user {owner[2]} can reach (the probe failed)"
    return problem or None


def fork_with_pipe(blocked: Iterable[int]) -> Tuple[int, int]:
    """Fork a child (a worker, or a probe) with a pipe from it to this process.

    The ``blocked`` signals stay blocked across the fork: until the child has dropped the
    master's handlers, a signal reaching it would land in the master's wakeup pipe. The
    parent gets its signal mask back; the child keeps them blocked. Returns (pid, the
    pipe's read end) in the parent, (0, its write end) in the child. Raises OSError when
    it cannot fork, with nothing left open.
    """
    read_fd, write_fd = os.pipe()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        pid = os.fork()
    except OSError:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(read_fd)
        os.close(write_fd)
        raise
    if pid == 0:  # pragma: no cover - the child
        os.close(read_fd)
        return 0, write_fd
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    os.close(write_fd)
    return pid, read_fd


def _first_problem(user: str, checks: List[Check]) -> Optional[str]:
    """In the probe, as ``user``: what of ``checks`` it cannot reach, in a sentence."""
    for path, kind in checks:
        blocked = _closed_ancestor(path)
        if blocked is not None:
            return (f"user {user} cannot enter the directory {blocked}, so it cannot reach "
                    f"{path}")
        if kind == "directory" and not os.access(path, os.R_OK | os.X_OK):
            return f"user {user} cannot read the directory {path}"
        if kind == "file" and not os.access(path, os.R_OK):
            return f"user {user} cannot read {path}"
    return None


def _closed_ancestor(path: str) -> Optional[str]:
    """The first directory above ``path`` this process may not enter, if any."""
    parts = os.path.abspath(path).split("/")[1:-1]
    current = ""
    for part in parts:
        current += "/" + part
        if not os.access(current, os.X_OK):
            return current
    return None
